"""What differs between model families in a GGUF file: hyper-parameter keys and how weights are stored.

Each supported Hugging Face architecture maps to a llama.cpp architecture with two functions: one
writes the hyper-parameters llama.cpp reads, one turns an HF weight into the GGUF one.

- Llama (SmolLM, SmolLM2, Llama 2/3): llama.cpp applies rotary embeddings to interleaved pairs
  (x0, x1), (x2, x3)..., HF to the two halves of each head (x_i, x_{i+d/2}). The rows of q_proj and
  k_proj are permuted so that each half-pair lands next to its partner (the inverse of the
  un-permutation transformers applies when it reads a GGUF file).
- Gemma 3: HF's RMSNorm multiplies by (1 + weight), llama.cpp's by weight, so every norm weight is
  stored plus one. The query scale, the embedding scale (sqrt(hidden)) and the sliding-window layers
  follow from the keys written here; llama.cpp fixes the local layers' rotary base at 10000 and their
  period at 6, which the export checks the model agrees with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from instructune.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face model family is written as a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    write_parameters: Callable[[gguf.GGUFWriter, object], None]
    convert: Callable[[str, torch.Tensor, object], torch.Tensor]
    """(HF name, weight, config) -> the weight as GGUF stores it (before type conversion)."""


def _rope_theta(config, layer_type: str | None = None) -> float:
    """The rotary base of a config (transformers 5 keeps it in `rope_parameters`, per layer type for Gemma 3)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in parameters:
        parameters = parameters[layer_type]
    kind = parameters.get("rope_type", "default")
    if kind != "default":
        raise UserError(f"GGUF export does not support rotary scaling of type {kind!r} yet")
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("the model config has no rotary base (rope_theta)")
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _common_parameters(writer: gguf.GGUFWriter, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _llama_parameters(writer: gguf.GGUFWriter, config) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"llama.cpp's llama architecture uses SiLU; this model uses {config.hidden_act!r}")
    _common_parameters(writer, config)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(_head_dim(config))


def rotary_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's half-split rotary layout to llama.cpp's interleaved one.

    Within each head the rows are [x_0..x_{d/2-1}, y_0..y_{d/2-1}]; the result is [x_0, y_0, x_1, y_1, ...].
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _llama_convert(name: str, weight: torch.Tensor, config) -> torch.Tensor:
    if ".q_proj." in name:
        return rotary_interleave(weight, config.num_attention_heads)
    if ".k_proj." in name:
        return rotary_interleave(weight, config.num_key_value_heads or config.num_attention_heads)
    return weight


_GEMMA3_LOCAL_THETA = 10000.0
_GEMMA3_PERIOD = 6


def _gemma3_parameters(writer: gguf.GGUFWriter, config) -> None:
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        raise UserError("llama.cpp's Gemma 3 has no logit soft-capping, but this model's config sets it")
    if getattr(config, "query_pre_attn_scalar", _head_dim(config)) != _head_dim(config):
        raise UserError("llama.cpp's Gemma 3 scales queries by 1/sqrt(head_dim); this model's query_pre_attn_scalar "
                        "differs from its head_dim")
    layer_types = list(getattr(config, "layer_types", None) or [])
    expected = ["full_attention" if (i + 1) % _GEMMA3_PERIOD == 0 else "sliding_attention"
                for i in range(config.num_hidden_layers)]
    if layer_types and layer_types != expected:
        raise UserError(f"llama.cpp's Gemma 3 makes every {_GEMMA3_PERIOD}th layer a global one; this model's "
                        f"layer_types differ: {layer_types}")
    if "sliding_attention" in (getattr(config, "rope_parameters", None) or {}):
        if _rope_theta(config, "sliding_attention") != _GEMMA3_LOCAL_THETA:
            raise UserError(f"llama.cpp's Gemma 3 uses rotary base {_GEMMA3_LOCAL_THETA:g} on its local layers; "
                            f"this model uses {_rope_theta(config, 'sliding_attention'):g}")
    _common_parameters(writer, config)
    writer.add_rope_freq_base(_rope_theta(config, "full_attention"))
    writer.add_sliding_window(config.sliding_window)


def _gemma3_convert(name: str, weight: torch.Tensor, config) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return weight + 1.0  # HF multiplies by (1 + w); llama.cpp by w
    return weight


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, _llama_parameters, _llama_convert),
    "Gemma3ForCausalLM": Architecture(gguf.MODEL_ARCH.GEMMA3, _gemma3_parameters, _gemma3_convert),
}
"""The Hugging Face architectures (config.architectures / class names) GGUF export supports."""


def architecture_of(model) -> Architecture:
    """The export recipe for a loaded model, or a `UserError` naming what is supported."""
    name = type(model).__name__
    if name.startswith("Peft"):
        raise UserError("this model carries a LoRA adapter: merge it first, or export the saved adapter folder")
    if name not in ARCHITECTURES:
        raise UserError(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {name}")
    return ARCHITECTURES[name]
