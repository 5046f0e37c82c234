"""Padding-free batches with per-row SDPA attention equal padded batches, loss and gradients."""

from __future__ import annotations

import json

import pytest
import torch

from instructune import IGNORE_INDEX
from instructune.data.batching import collate_packed, collate_padded
from instructune.model.varlen_attention import (
    NAME,
    _mask,
    rows_given,
    takes_row_boundaries,
    use_varlen_attention,
)
from instructune.testing import make_tiny_family_model
from instructune.train.loss import masked_lm_loss

VOCAB = 64


def _tiny(family: str):
    return make_tiny_family_model(family, VOCAB)


def _rows(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        prompt = max(1, length // 3)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = masked_lm_loss(model, batch).loss_sum
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral_window"])
@pytest.mark.parametrize("lengths", [[9, 17, 4, 12], [6], [11, 11, 3]])
def test_padding_free_batch_equals_padded_batch(family, lengths):
    model = _tiny(family)
    rows = _rows(lengths)
    reference = _loss_and_grads(model, collate_padded(rows, pad_token_id=0))
    assert use_varlen_attention(model) and takes_row_boundaries(model)
    flat = collate_packed(rows, pad_token_id=0)
    assert flat["input_ids"].shape == (1, sum(lengths))  # no padding at all
    ours = _loss_and_grads(model, flat)
    torch.testing.assert_close(ours[0], reference[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == reference[1].keys()
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_rows_do_not_see_each_other():
    # Changing one row's tokens leaves every other row's per-token logits untouched.
    model = _tiny("llama")
    use_varlen_attention(model)
    rows = _rows([7, 10, 5])
    changed = [dict(r) for r in rows]
    changed[1] = {**rows[1], "input_ids": [5] * 10}

    def logits(rows_):
        batch = collate_packed(rows_, pad_token_id=0)
        cu = batch["cu_seq_lens"]
        with rows_given(), torch.no_grad():
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=cu,
                         cu_seq_lens_k=cu, max_length_q=10, max_length_k=10).logits[0]

    a, b = logits(rows), logits(changed)
    torch.testing.assert_close(a[:7], b[:7], atol=0, rtol=0)
    torch.testing.assert_close(a[17:], b[17:], atol=0, rtol=0)
    assert not torch.equal(a[7:17], b[7:17])


def test_without_row_boundaries_it_is_sdpa_with_its_masks():
    # Evaluation and generation pass padded (here left-padded) batches: same logits as plain SDPA.
    reference, model = _tiny("qwen2"), _tiny("qwen2")
    use_varlen_attention(model)
    batch = collate_padded(_rows([8, 5, 3]), pad_token_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    left_ids = torch.stack([torch.roll(i, int((m == 0).sum())) for i, m in zip(ids, mask)])
    left_mask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in mask])
    with torch.no_grad():
        expected = reference(input_ids=left_ids, attention_mask=left_mask).logits
        got = model(input_ids=left_ids, attention_mask=left_mask).logits
    torch.testing.assert_close(got[left_mask.bool()], expected[left_mask.bool()], atol=1e-6, rtol=1e-6)


def test_no_mask_is_built_while_rows_are_given(monkeypatch):
    import transformers.masking_utils as masking

    calls = []
    real = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    with rows_given():
        assert _mask(batch_size=1) is None
    # The loss opens rows_given() for a padding-free batch: the model builds no mask at all ...
    model = _tiny("gemma3")  # sliding and full layers: two masks per forward otherwise
    use_varlen_attention(model)
    masked_lm_loss(model, collate_packed(_rows([9, 6]), pad_token_id=0)).loss_sum.backward()
    assert calls == []
    # ... and a padded batch gets SDPA's masks as before.
    batch = collate_padded(_rows([9, 6]), pad_token_id=0)
    batch["attention_mask"][1] = torch.roll(batch["attention_mask"][1], 3)  # left padding: the mask stays
    batch["input_ids"][1] = torch.roll(batch["input_ids"][1], 3)
    batch["labels"][1] = torch.roll(batch["labels"][1], 3)
    masked_lm_loss(model, batch)
    assert calls


def test_saved_model_does_not_name_the_implementation(tmp_path):
    model = _tiny("llama")
    use_varlen_attention(model)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    json.loads((tmp_path / "config.json").read_text())


def test_soft_capped_attention_and_eager_models_are_left_alone():
    import transformers as tf

    gemma2 = tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=1, head_dim=16))
    assert gemma2.config.attn_logit_softcapping is not None
    assert not use_varlen_attention(gemma2) and not takes_row_boundaries(gemma2)
    eager = _tiny("llama")
    eager.set_attn_implementation("eager")
    assert not use_varlen_attention(eager)

