"""Batches: exact padded/packed tensors, packed == padded with no cross-row attention (rule 12), samplers."""

from __future__ import annotations

import pytest
import torch

from instructune import IGNORE_INDEX
from instructune.data.batching import collate_packed, collate_padded, length_grouped_batches, pack_rows
from instructune.data.encoded import EncodedRow
from instructune.testing import make_tiny_model
from instructune.train.loss import count_targets, masked_lm_loss, token_losses

VOCAB = 64


def _rows(lengths, seed: int = 0) -> list[dict]:
    """Random rows: the first 40 % prompt (-100), the rest trained."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        prompt = max(1, int(length * 0.4))
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _model(family: str = "llama", attn: str = "sdpa"):
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  query_pre_attn_scalar=8, max_position_embeddings=256, pad_token_id=0,
                                  sliding_window=4, layer_types=["sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(config).float()
    else:
        model = make_tiny_model(VOCAB)
    model.set_attn_implementation(attn)
    return model


def test_collate_padded_exact_tensors():
    rows = [EncodedRow(row=0, input_ids=[5, 6, 7], labels=[-100, 6, 7], roles=[2, 3, 3]),
            {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = collate_padded(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    padded = collate_padded(rows, pad_token_id=0, pad_to_multiple_of=4)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_collate_packed_exact_tensors_and_no_target_across_rows():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},  # fully trained rows: the edge case of rule 12
            {"input_ids": [8, 9], "labels": [8, 9]},
            {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}]
    batch = collate_packed(rows, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    # The first token of every row (8 and 10 here) is never the target of the previous row's last position.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 8] and batch["cu_seq_lens"].dtype == torch.int32
    assert count_targets(batch["labels"]) == count_targets(collate_padded(rows, 0)["labels"]) == 5
    tail = collate_packed(rows, pad_token_id=0, pad_to_multiple_of=6)
    assert tail["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0, 0]]
    assert tail["labels"][0, 8:].tolist() == [-100] * 4
    assert tail["position_ids"][0, 8:].tolist() == [0, 1, 2, 3]
    assert tail["cu_seq_lens"].tolist() == [0, 3, 5, 8, 12]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = masked_lm_loss(model, batch).loss_sum
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa")])
def test_packed_equals_padded_loss_and_gradients(family, attn):
    model = _model(family, attn)
    rows = _rows([6, 11, 3, 9])
    rows[2]["labels"] = list(rows[2]["input_ids"])  # fully trained: its first token must not become a target
    padded_loss, padded_grads = _loss_and_grads(model, collate_padded(rows, pad_token_id=0))
    packed_loss, packed_grads = _loss_and_grads(model, collate_packed(rows, pad_token_id=0, pad_to_multiple_of=8))
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa")])
def test_packed_rows_do_not_attend_to_each_other(family, attn):
    model = _model(family, attn)
    rows = _rows([7, 10, 8])
    changed = [dict(rows[0], input_ids=[(t + 1) % VOCAB for t in rows[0]["input_ids"]]), rows[1], rows[2]]
    with torch.no_grad():
        before = token_losses(model, collate_packed(rows, pad_token_id=0))
        after = token_losses(model, collate_packed(changed, pad_token_id=0))
        alone = torch.cat([token_losses(model, collate_padded([row], pad_token_id=0)) for row in rows[1:]])
    first = count_targets(collate_padded(rows[:1], 0)["labels"])
    assert not torch.allclose(before[:first], after[:first])  # the changed row's own losses did change
    torch.testing.assert_close(after[first:], before[first:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(before[first:], alone, atol=1e-5, rtol=1e-5)


def test_length_grouped_batches():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1000,), generator=gen).tolist()
    batches = length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 8 for b in batches)
    assert batches == length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=1, epoch=1)
    assert batches != length_grouped_batches(lengths, 8, seed=2, epoch=0)
    # Grouped: the spread of lengths inside a batch is a small fraction of a random batch's spread.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    random_batches = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_batches)
    assert spread < 0.2 * random_spread / len(random_batches)
    # The first batches are not simply the longest ones: the order is shuffled.
    assert [b[0] for b in batches] != sorted((b[0] for b in batches), key=lambda i: -lengths[i])
    unshuffled = length_grouped_batches(lengths, 8, seed=1, epoch=0, shuffle=False)
    assert sorted(i for b in unshuffled for i in b) == list(range(1000))
    assert unshuffled == length_grouped_batches(lengths, 8, seed=5, epoch=3, shuffle=False)


def test_pack_rows():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (500,), generator=gen).tolist() + [700, 512]
    bins = pack_rows(lengths, 512, seed=0, epoch=0)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [b for b in bins if sum(lengths[i] for i in b) > 512] == [[500]]  # too long: a bin of its own
    assert [501] in bins
    # Best-fit decreasing wastes little: within 5 % of the lower bound on the number of bins.
    assert len(bins) <= 1.05 * (sum(lengths) / 512) + 2
    assert bins == pack_rows(lengths, 512, seed=0, epoch=0)
    assert bins != pack_rows(lengths, 512, seed=0, epoch=1)
    assert pack_rows([], 16, seed=0, epoch=0) == []
