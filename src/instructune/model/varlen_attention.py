"""Padding-free attention on SDPA: a micro-batch's rows as one sequence, attention within each row.

A padded batch of rows with lengths [1800, 1790, 1770, 1700] pushes 4 x 1800 positions through every
projection, norm and MLP of the model, padding included (8 % of workload A's positions, more where
lengths vary). Concatenated without padding (`collate_packed`: positions restart at every row, the
row boundaries in `cu_seq_lens`) only the real tokens go through them. Attention is the one place
that must see the rows apart. Flash-attention's varlen kernel does that on CUDA; on CPU, this
module registers an attention implementation for transformers' `AttentionInterface` that, given the
row boundaries, lays the rows out as a padded batch for one causal SDPA call (batched: per-row calls
leave one of two threads idle on 9 heads) and gathers the real positions back. Called without row
boundaries (evaluation, generation, a padded batch), it is transformers' own SDPA attention, with
SDPA's masks.

The loss (`loss._body_inputs`) passes the boundaries as flash-attention's keyword arguments
(`cu_seq_lens_q`, ...), which the decoder layers hand through to the attention function, and holds
`rows_given()` open meanwhile so that transformers does not build the block-diagonal [T, T] mask that
no one would read.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

NAME = "instructune_varlen_sdpa"
"""The attention implementation's name in transformers' registries (never saved: `_attn_implementation`)."""

_rows_given: contextvars.ContextVar[bool] = contextvars.ContextVar("instructune_rows_given", default=False)


@contextlib.contextmanager
def rows_given() -> Iterator[None]:
    """While open, the model's attention receives row boundaries: no attention mask is built."""
    token = _rows_given.set(True)
    try:
        yield
    finally:
        _rows_given.reset(token)


_last_layout: list = [None, None]
"""[the cu_seq_lens tensor, its layout]: every layer of one forward gets the same tensor, so it is computed once."""


def _row_layout(cu_seq_lens: torch.Tensor, device: torch.device) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(rows, longest, padded->flat gather index [rows * longest], flat->padded gather index [T]), cached.

    Padded slots past a row's end read the row's first position: they are keys no real query attends
    to (causal) and queries whose outputs are dropped, so what they hold never matters, and their
    gradients are exact zeros.
    """
    if _last_layout[0] is cu_seq_lens:
        return _last_layout[1]
    cu = cu_seq_lens.to(device=device, dtype=torch.long)
    starts, lengths = cu[:-1], cu.diff()
    rows, longest = int(lengths.shape[0]), int(lengths.max())
    offsets = torch.arange(longest, device=device)
    real = offsets[None, :] < lengths[:, None]                                  # [rows, longest]
    to_padded = torch.where(real, starts[:, None] + offsets[None, :], starts[:, None]).reshape(-1)
    to_flat = real.reshape(-1).nonzero().squeeze(1)
    _last_layout[:] = [cu_seq_lens, (rows, longest, to_padded, to_flat)]
    return _last_layout[1]


def _window_mask(longest: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal and sliding-window as one [longest, longest] bool mask (True: attend), as transformers defines it."""
    q = torch.arange(longest, device=device)[:, None]
    kv = torch.arange(longest, device=device)[None, :]
    return (kv <= q) & (kv > q - window)


def varlen_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for `AttentionInterface`: per row when `cu_seq_lens_q` is given, else transformers' SDPA.

    query [1, heads, T, d] and key/value [1, kv_heads, T, d] (T = all rows' tokens); returns [1, T, heads, d].
    """
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("padding-free SDPA attention has no logit soft-capping; set padding_free: false")
    if query.shape[0] != 1:
        raise ValueError("a padding-free batch is one sequence (batch size 1)")
    rows, longest, to_padded, to_flat = _row_layout(cu_seq_lens, query.device)
    heads, kv_heads = query.shape[1], key.shape[1]

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, h, T, d] -> [rows, h, longest, d]
        # Gathered as [T, h, d] rows (the projections' own layout: contiguous h x d blocks); SDPA reads
        # the [rows, longest, h, d] result through a transposed view, as transformers hands it tensors.
        h, d = x.shape[1], x.shape[3]
        return x[0].transpose(0, 1).index_select(0, to_padded).view(rows, longest, h, d).transpose(1, 2)

    q, k, v = padded(query), padded(key), padded(value)
    window = kwargs.get("sliding_window")
    mask = None
    if window is not None and longest > window:
        mask = _window_mask(longest, window, query.device)
    if heads != kv_heads and mask is not None:  # GQA in the kernel only without a mask
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                         scale=scaling, enable_gqa=heads != kv_heads and mask is None)
    # [rows, heads, longest, d] -> [rows * longest, heads, d] -> the real positions, [1, T, heads, d]
    out = out.transpose(1, 2).reshape(rows * longest, heads, out.shape[-1]).index_select(0, to_flat)
    return out.unsqueeze(0), None


def _mask(*args, **kwargs):
    """SDPA's own mask, except while `rows_given()`: then none (the attention uses the row boundaries)."""
    if _rows_given.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make `NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(NAME, _mask)


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch a model that attends with SDPA to this module's attention; returns whether it did.

    Models on another implementation (eager-only architectures, flash-attention) and models with
    attention logit soft-capping (Gemma 2) are left as they are.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):  # an architecture without transformers' attention interface
        return False
    return True


def takes_row_boundaries(model: nn.Module) -> bool:
    """Whether the model's attention keeps rows apart given `cu_seq_lens` (this module's, or flash-attention)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return implementation == NAME or "flash" in implementation
