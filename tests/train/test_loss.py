"""The selective-head masked loss equals the full-logits loss, and token normalisation is exact (rules 11-12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instructune import IGNORE_INDEX
from instructune.data.batching import collate_packed, collate_padded
from instructune.testing import make_tiny_family_model
from instructune.train.fused_head import CHUNK_BYTES, MIN_CHUNK_ROWS, chunk_rows
from instructune.train.loss import (
    _body_inputs,
    count_targets,
    masked_lm_loss,
    recycle_head_gradient,
    row_mean_sum,
    row_target_counts,
    step_normalizer,
    step_row_count,
    token_losses,
)

VOCAB = 64


def _tiny(family: str):
    return make_tiny_family_model(family, VOCAB)


def _rows(lengths, seed: int = 0, prompt_fraction: float = 0.5) -> list[dict]:
    """Random rows whose first part is prompt (-100) and the rest response."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        prompt = max(1, int(length * prompt_fraction))
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _full_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: every position through the model's own head, then shifted cross-entropy (sum)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    loss = F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    scored = targets != IGNORE_INDEX
    correct = (flat_logits[scored].argmax(-1) == targets[scored]).sum()
    return loss, correct


def _loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b, atol=1e-5, rtol=1e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "gemma3", "cohere", "granite"])
@pytest.mark.parametrize("max_chunk_tokens", [4096, 5])
def test_selective_head_equals_full_logits(family, max_chunk_tokens):
    model = _tiny(family)
    batch = collate_padded(_rows([7, 12, 4, 10]), pad_token_id=0)
    reference = _loss_and_grads(model, lambda: _full_loss(model, batch)[0])
    selective = _loss_and_grads(
        model, lambda: masked_lm_loss(model, batch, max_chunk_tokens=max_chunk_tokens).loss_sum)
    _assert_same(reference, selective)
    assert len(selective[1]) == len(list(model.parameters()))  # every parameter got its gradient


def test_softcapping_is_applied_not_skipped():
    model = _tiny("gemma3")
    batch = collate_padded(_rows([9, 11]), pad_token_id=0)
    with torch.no_grad():
        capped = masked_lm_loss(model, batch).loss_sum
        model.config.final_logit_softcapping = None
        uncapped = masked_lm_loss(model, batch).loss_sum
    assert abs(float(capped) - float(uncapped)) > 1e-3


@pytest.mark.parametrize("max_chunk_tokens", [4096, 3])
def test_accuracy_counts_argmax_hits(max_chunk_tokens):
    model = _tiny("llama")
    batch = collate_padded(_rows([8, 13, 6]), pad_token_id=0)
    _, expected = _full_loss(model, batch)
    out = masked_lm_loss(model, batch, compute_accuracy=True, max_chunk_tokens=max_chunk_tokens)
    assert int(out.num_correct) == int(expected)
    assert masked_lm_loss(model, batch).num_correct is None


def test_lora_model_goes_through_the_base_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B so the adapters change the output
            torch.nn.init.normal_(param, std=0.1)
    batch = collate_padded(_rows([6, 9]), pad_token_id=0)
    _assert_same(_loss_and_grads(model, lambda: _full_loss(model, batch)[0]),
                 _loss_and_grads(model, lambda: masked_lm_loss(model, batch, max_chunk_tokens=2).loss_sum))


def test_token_losses_are_per_target_in_row_major_order():
    model = _tiny("llama")
    batch = collate_padded(_rows([5, 9, 7]), pad_token_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits[:, :-1][targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX],
                               reduction="none")
    with torch.no_grad():
        chunked = token_losses(model, batch, max_chunk_tokens=2)
    torch.testing.assert_close(token_losses(model, batch), expected)
    torch.testing.assert_close(chunked, expected.detach())
    assert chunked.shape == (count_targets(batch["labels"]),)


@pytest.mark.parametrize("max_chunk_tokens", [4096, 1])
def test_batch_without_targets_gives_zero_and_finite_gradients(max_chunk_tokens):
    model = _tiny("llama")
    batch = collate_padded(_rows([6, 8], prompt_fraction=1.0), pad_token_id=0)
    assert count_targets(batch["labels"]) == 0
    out = masked_lm_loss(model, batch, compute_accuracy=True, max_chunk_tokens=max_chunk_tokens)
    assert out.num_targets == 0 and float(out.loss_sum.detach()) == 0.0 and int(out.num_correct) == 0
    model.zero_grad(set_to_none=True)
    out.loss_sum.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)


LENGTHS = [5, 17, 9, 3, 12, 20, 7, 14]


def _accumulate(model, micro_batches, **kwargs):
    """One optimizer step's loss and gradients under token normalisation (rule 11)."""
    normalizer = step_normalizer(micro_batches)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro_batches:
        loss = masked_lm_loss(model, batch, **kwargs).loss_sum / normalizer
        loss.backward()
        total += float(loss.detach())
    return torch.tensor(total), {n: p.grad.clone() for n, p in model.named_parameters()}


def _split(rows, size, collate=collate_padded):
    return [collate(rows[i:i + size], pad_token_id=0) for i in range(0, len(rows), size)]


@pytest.mark.parametrize("max_chunk_tokens", [4096, 6])
def test_token_normalisation_is_invariant_to_micro_batching(max_chunk_tokens):
    model = _tiny("llama")
    rows = _rows(LENGTHS, prompt_fraction=0.4)
    one_of_8 = _accumulate(model, _split(rows, 8), max_chunk_tokens=max_chunk_tokens)
    _assert_same(one_of_8, _accumulate(model, _split(rows, 1), max_chunk_tokens=max_chunk_tokens))
    _assert_same(one_of_8, _accumulate(model, _split(rows, 4), max_chunk_tokens=max_chunk_tokens))
    _assert_same(one_of_8, _accumulate(model, _split(rows, 3, collate_packed), max_chunk_tokens=max_chunk_tokens))
    # Two "ranks" of 4 rows: each rank's sum over the globally summed (all-reduced) target count.
    ranks = _split(rows, 4)
    assert step_normalizer(ranks[:1]) + step_normalizer(ranks[1:]) == step_normalizer(_split(rows, 8))


def test_mean_of_micro_batch_means_is_the_bug_normalisation_prevents():
    model = _tiny("llama")
    rows = _rows(LENGTHS, prompt_fraction=0.4)
    correct = _accumulate(model, _split(rows, 8))[0]
    micro = _split(rows, 1)
    with torch.no_grad():
        naive = sum(float(masked_lm_loss(model, b).loss_sum) / count_targets(b["labels"]) for b in micro) / len(micro)
    assert abs(naive - float(correct)) > 1e-3


@pytest.mark.parametrize("collate", [collate_padded, collate_packed])
def test_sequence_normalisation_is_the_mean_of_per_row_means(collate):
    model = _tiny("llama")
    rows = _rows(LENGTHS, prompt_fraction=0.4)
    with torch.no_grad():
        per_row_means = [float(masked_lm_loss(model, collate_padded([r], 0)).loss_sum)
                         / count_targets(collate_padded([r], 0)["labels"]) for r in rows]
    expected = sum(per_row_means) / len(per_row_means)
    for size in (8, 3, 1):
        micro = _split(rows, size, collate)
        total = sum(row_mean_sum(masked_lm_loss(model, b, per_row=True)) for b in micro) / step_row_count(micro)
        assert abs(float(total.detach()) - expected) < 1e-5
    out = masked_lm_loss(model, collate(rows, pad_token_id=0), per_row=True)
    torch.testing.assert_close(out.row_num_targets, row_target_counts(collate(rows, pad_token_id=0)))
    torch.testing.assert_close(out.row_loss_sums.sum(), out.loss_sum)


def test_step_normalizer_counts_shifted_targets():
    batch = collate_padded([{"input_ids": [1, 2, 3, 4], "labels": [1, -100, 3, 4]},
                            {"input_ids": [5, 6], "labels": [5, 6]}], pad_token_id=0)
    # The first label of a row is never a target after the shift.
    assert count_targets(batch["labels"]) == 3
    assert step_normalizer([batch, batch]) == 6
    assert row_target_counts(batch).tolist() == [2, 1]


def test_packed_batch_inputs_for_each_attention_implementation():
    batch = collate_packed(_rows([3, 5]), pad_token_id=0)
    sdpa = _body_inputs(batch, "sdpa")
    assert "attention_mask" not in sdpa and "cu_seq_lens_q" not in sdpa
    assert sdpa["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    flash = _body_inputs(batch, "flash_attention_2")
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 8] and flash["max_length_q"] == 5
    assert flash["cu_seq_lens_q"].dtype == torch.int32
    with pytest.raises(ValueError, match="attention_mask"):
        _body_inputs({**batch, "attention_mask": torch.ones_like(batch["input_ids"])}, "sdpa")


def test_chunked_head_in_bf16_matches_unchunked():
    # The GPU dtype: logits are upcast to fp32 and the head gradient comes back in the weight's dtype.
    model = _tiny("llama").to(torch.bfloat16)
    batch = collate_padded(_rows([9, 14]), pad_token_id=0)
    whole = _loss_and_grads(model, lambda: masked_lm_loss(model, batch).loss_sum)
    chunked = _loss_and_grads(model, lambda: masked_lm_loss(model, batch, max_chunk_tokens=4).loss_sum)
    assert whole[0].dtype == chunked[0].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in chunked[1].values())
    _assert_same(whole, chunked, atol=2e-2, rtol=2e-2)


def test_right_padding_on_cpu_leaves_the_mask_out_and_other_masks_stay():
    right = collate_padded(_rows([3, 6]), pad_token_id=0)
    assert right["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert "attention_mask" not in _body_inputs(right, "sdpa")  # SDPA's causal path; same result (test above)
    left = {**right, "attention_mask": right["attention_mask"].flip(1)}
    assert _body_inputs(left, "sdpa")["attention_mask"] is left["attention_mask"]
    hole = {**right, "attention_mask": torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}
    assert "attention_mask" in _body_inputs(hole, "sdpa")


def test_left_padded_batch_keeps_its_mask_and_equals_the_full_logits_loss():
    model = _tiny("llama")
    rows = _rows([5, 11, 8])
    width = max(len(r["input_ids"]) for r in rows)
    pad = [width - len(r["input_ids"]) for r in rows]
    batch = {"input_ids": torch.tensor([[0] * p + r["input_ids"] for p, r in zip(pad, rows)]),
             "labels": torch.tensor([[IGNORE_INDEX] * p + r["labels"] for p, r in zip(pad, rows)]),
             "attention_mask": torch.tensor([[0] * p + [1] * len(r["input_ids"]) for p, r in zip(pad, rows)])}
    _assert_same(_loss_and_grads(model, lambda: _full_loss(model, batch)[0]),
                 _loss_and_grads(model, lambda: masked_lm_loss(model, batch).loss_sum))


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_tied_head_gradient_accumulates_densely_over_micro_batches(family):
    # The tied embedding runs with a sparse gradient inside the loss only; the summed .grad stays dense
    # and equals the full-logits reference accumulated over the same micro-batches.
    model = _tiny(family)
    rows = _rows(LENGTHS, prompt_fraction=0.4)
    micro = _split(rows, 3)
    normalizer = step_normalizer(micro)
    reference = _loss_and_grads(model, lambda: sum(_full_loss(model, b)[0] for b in micro) / normalizer)
    ours = _accumulate(model, micro)
    _assert_same(reference, ours)
    embedding = model.get_input_embeddings()
    assert not embedding.sparse and embedding.weight.grad.layout == torch.strided


def test_tied_embedding_is_restored_when_the_body_raises():
    model = _tiny("llama_tied")
    batch = collate_padded(_rows([4, 6]), pad_token_id=0)
    batch["input_ids"][0, 0] = VOCAB + 5  # out of range: the embedding lookup raises
    with pytest.raises(IndexError):
        masked_lm_loss(model, batch)
    assert not model.get_input_embeddings().sparse


def test_fused_head_loss_refuses_a_second_backward():
    model = _tiny("llama")
    batch = collate_padded(_rows([6, 9]), pad_token_id=0)
    loss = masked_lm_loss(model, batch).loss_sum
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_recycled_head_gradient_is_reused_in_place_and_changes_nothing(family):
    # Two steps of micro-batches: the second step's head gradient is written into the first step's
    # tensor (same memory, no fresh [V, H] allocation), and equals the reference computed without it.
    model = _tiny(family)
    head = model.get_output_embeddings()
    steps = [_split(_rows(LENGTHS, seed=seed, prompt_fraction=0.4), 2) for seed in (1, 2)]
    reference = []
    for micro in steps:
        reference.append(_accumulate(model, micro))
        model.zero_grad(set_to_none=True)
    ours, addresses = [], []
    for micro in steps:
        ours.append(_accumulate(model, micro))
        addresses.append(head.weight.grad.data_ptr())
        recycle_head_gradient(model)
        assert head.weight.grad is None
        model.zero_grad(set_to_none=True)
    assert addresses[0] == addresses[1]
    for a, b in zip(ours, reference):
        _assert_same(a, b)


@pytest.mark.parametrize("holder", ["variable", "view"])
def test_head_gradient_held_elsewhere_is_never_overwritten(holder):
    model = _tiny("llama")
    head = model.get_output_embeddings()
    micro = _split(_rows(LENGTHS, prompt_fraction=0.4), 1)
    _accumulate(model, micro)
    # A user's reference to last step's gradient: the tensor itself, or a view of it.
    kept = head.weight.grad if holder == "variable" else head.weight.grad[2:]
    before = kept.clone()
    recycle_head_gradient(model)
    model.zero_grad(set_to_none=True)
    _accumulate(model, _split(_rows(LENGTHS, seed=3, prompt_fraction=0.4), 1))
    assert head.weight.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, before, atol=0, rtol=0)


def test_fused_head_chunks_keep_a_row_floor_for_large_vocabularies():
    # ~32 MB of logits a chunk, but never fewer than MIN_CHUNK_ROWS rows for it: each chunk costs a full
    # pass over the [V, H] weight and its gradient. A caller's smaller max_chunk_tokens still wins.
    assert MIN_CHUNK_ROWS == 128
    assert chunk_rows(4096, 49152) == CHUNK_BYTES // (4 * 49152) == 170  # SmolLM2: the byte budget
    assert chunk_rows(4096, 262144) == 128  # Gemma-3: the budget alone would give 32 rows
    assert chunk_rows(4096, 2_000_000) == 128
    assert chunk_rows(5, 262144) == 5 and chunk_rows(100, 64) == 100


@pytest.mark.parametrize("rows, vocab", [(1, 7), (5, 64), (170, 49152), (3, 262144)])
def test_log_softmax_written_over_its_logits_equals_a_separate_buffer_bitwise(rows, vocab):
    """The fused head's plain path overwrites each chunk's logits with their log-softmax (one buffer, not
    two); that must be exactly what writing into a second buffer gives, for the vocabulary sizes in use."""
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen) * 8
    separate = torch.empty_like(logits)
    torch.log_softmax(logits, dim=-1, out=separate)
    in_place = logits.clone()
    torch.log_softmax(in_place, dim=-1, out=in_place)
    assert torch.equal(in_place, separate)
