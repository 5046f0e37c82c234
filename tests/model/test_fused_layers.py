"""The lean RMSNorm and gated MLP give the model's own outputs and gradients, with fewer saved tensors."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from instructune.data.batching import collate_padded
from instructune.model.fused_layers import GATED_MLPS, RMS_NORMS, apply_fused_layers
from instructune.train.loss import masked_lm_loss

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)


def _model(family: str, **extra):
    torch.manual_seed(0)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, **extra))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, **extra))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=8, **extra))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**COMMON, **extra))
    elif family == "granite":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(**COMMON, **extra))
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**COMMON, head_dim=8, query_pre_attn_scalar=8,
                                                         sliding_window=4, **extra))
    else:
        raise ValueError(family)
    with torch.no_grad():  # norm scales away from their initial ones and zeros, so a wrong formula shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.5, 0.3)
    return model.float()


def _batch():
    gen = torch.Generator().manual_seed(1)
    rows = []
    for length in (7, 12, 5):
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return collate_padded(rows, pad_token_id=0)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = masked_lm_loss(model, batch).loss_sum
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "granite", "gemma3"])
def test_fused_layers_give_the_same_loss_gradients_and_logits(family):
    reference_model, model = _model(family), _model(family)
    layers = model.config.num_hidden_layers
    norms_per_layer = 4 if family == "gemma3" else 2  # Gemma 3: pre/post norms around attention and MLP
    extra_norms = 2 * layers if family in ("qwen3", "gemma3") else 0  # q_norm and k_norm
    assert apply_fused_layers(model) == layers * norms_per_layer + 1 + extra_norms + layers
    batch = _batch()
    loss, grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = _loss_and_grads(reference_model, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # the forward is the model's own ops: bitwise the same
        ids = batch["input_ids"]
        assert torch.equal(model(input_ids=ids).logits, reference_model(input_ids=ids).logits)


def test_gated_mlp_with_bias_and_frozen_weights():
    reference_model, model = _model("llama", mlp_bias=True), _model("llama", mlp_bias=True)
    apply_fused_layers(model)
    for m in (reference_model, model):
        for name, param in m.named_parameters():
            param.requires_grad_("down_proj" in name or "up_proj.bias" in name)  # a mix of frozen and trained
    batch = _batch()
    loss, grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = _loss_and_grads(reference_model, batch)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any("down_proj.bias" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lora_on_down_proj_keeps_the_models_mlp():
    peft = pytest.importorskip("peft")
    reference_model = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["down_proj", "q_proj"]))
    model = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["down_proj", "q_proj"]))
    for m in (reference_model, model):
        for name, param in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(3))
    layers = model.config.num_hidden_layers
    assert apply_fused_layers(model) == 2 * layers + 1  # the norms only
    loss, grads = _loss_and_grads(model, _batch())
    ref_loss, ref_grads = _loss_and_grads(reference_model, _batch())
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n and "down_proj" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_an_activation_it_does_not_know_is_left_alone():
    model = _model("llama", hidden_act="gelu")
    assert apply_fused_layers(model) == 2 * model.config.num_hidden_layers + 1


def test_the_mlp_keeps_half_as_many_activations():
    model = _model("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 5, 32, requires_grad=True)

    def saved_elements():
        count = 0

        def pack(tensor):
            nonlocal count
            count += tensor.numel() if tensor.dtype.is_floating_point and tensor.dim() > 1 else 0
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x).sum()
        return count

    before = saved_elements()
    apply_fused_layers(model)
    after = saved_elements()
    weights = sum(p.numel() for p in mlp.parameters())
    # Saved per use. Before: x (by gate_proj and up_proj), gate, act(gate), up, product; after: x twice, gate, up.
    assert before - weights == 15 * (2 * 32 + 4 * 64)
    assert after - weights == 15 * (2 * 32 + 2 * 64)


@pytest.mark.parametrize("name", sorted(RMS_NORMS))
def test_every_listed_rms_norm_class_matches_its_own_forward(name):
    cls = _find_class(name)
    norm, reference = cls(16, eps=1e-5), cls(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(0.5, 0.3)
        reference.weight.copy_(norm.weight)
    assert apply_fused_layers(norm) == 1
    x = torch.randn(2, 3, 16, requires_grad=True)
    out, ref = norm(x), reference(x)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, norm.weight), grad)
    expected = torch.autograd.grad(ref, (x, reference.weight), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(GATED_MLPS))
def test_every_listed_mlp_class_exists_in_transformers(name):
    # The forward itself is checked per family above; this catches a renamed or removed class.
    assert _find_class(name) is not None


def _find_class(name: str):
    import importlib

    family = name.removesuffix("RMSNorm").removesuffix("MLP").lower()
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(module, name)


def _kept_bytes(model, batch, recompute_norms: bool) -> tuple[int, torch.Tensor, dict]:
    """Bytes of the distinct storages autograd keeps after the forward (a kept recipe counts nothing of
    its own: it refers to tensors the norm keeps anyway), and the loss and gradients after backward."""
    from instructune.model import fused_layers

    kept: dict[int, int] = {}

    def count(packed):
        if isinstance(packed, torch.Tensor):
            storage = packed.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
        return packed

    model.zero_grad(set_to_none=True)
    if recompute_norms:
        original = fused_layers._pack_norm_output
        fused_layers._pack_norm_output = lambda t: count(original(t))
        try:
            with fused_layers.recomputed_norm_outputs():
                out = masked_lm_loss(model, batch)
        finally:
            fused_layers._pack_norm_output = original
    else:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            out = masked_lm_loss(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(kept.values()), out.loss_sum.detach(), grads


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_recomputed_norm_outputs_give_bitwise_the_same_gradients_and_keep_two_vectors_a_layer_less(family):
    model = _model(family)
    apply_fused_layers(model)
    batch = _batch()
    kept, loss, grads = _kept_bytes(model, batch, recompute_norms=False)
    kept_less, loss_again, grads_again = _kept_bytes(model, batch, recompute_norms=True)
    assert torch.equal(loss, loss_again) and grads.keys() == grads_again.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_again[name]), name
    # Each decoder layer's two norms feed projections that keep their input: [tokens, hidden] fp32 each.
    tokens = batch["input_ids"].numel()
    assert kept - kept_less == model.config.num_hidden_layers * 2 * tokens * COMMON["hidden_size"] * 4


def test_a_norm_output_changed_in_place_is_kept_not_recomputed():
    from instructune.model import fused_layers

    norm = tf.models.llama.modeling_llama.LlamaRMSNorm(8)
    apply_fused_layers(norm)
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(8, 5, requires_grad=True)
    with fused_layers.recomputed_norm_outputs():
        out = norm(x)
        out.mul_(2.0)  # after this, the norm's own formula no longer gives what the product sees
        (out @ weight).sum().backward()
    expected = (fused_layers._rms_norm(x.detach(), norm.weight.detach(), 1e-6, False)[0] * 2.0).t() @ torch.ones(3, 5)
    torch.testing.assert_close(weight.grad, expected)


def test_a_norm_output_changed_in_place_after_it_was_kept_is_refused_as_autograd_would():
    from instructune.model import fused_layers

    norm = tf.models.llama.modeling_llama.LlamaRMSNorm(8)
    apply_fused_layers(norm)
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(8, 5, requires_grad=True)
    with fused_layers.recomputed_norm_outputs():
        out = norm(x)
        product = out @ weight
    with torch.no_grad():
        out.mul_(2.0)
    with pytest.raises(RuntimeError, match="in-place"):
        product.sum().backward()


def test_the_graph_keeps_no_recipe_and_outside_the_block_nothing_is_recorded():
    from instructune.model import fused_layers

    norm = tf.models.llama.modeling_llama.LlamaRMSNorm(8)
    apply_fused_layers(norm)
    out = norm(torch.randn(3, 8, requires_grad=True))
    assert out.grad_fn.recipe is None  # the graph would otherwise hold x and rsqrt after backward
    assert fused_layers._norm_outputs is None
