"""The fused LM head for training: head, log-softmax and cross-entropy in chunks, gradients in the forward.

`loss.masked_lm_loss` runs it on the gathered target rows whenever gradients are needed. Only one
chunk's [chunk, V] logits exist at a time, nothing is recomputed in backward, and the [V, H] head
gradient can be written into last step's gradient tensor (`keep_gradient_for_reuse`) instead of a
freshly mapped one.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F

from instructune.train.precision import autocast_dtype


def transform_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The model's own output transform of the head's logits: scale, then soft-cap."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


CHUNK_BYTES = 32 * 2 ** 20
"""fp32 logits per chunk of the fused head (the log-probabilities take as much again): [chunk, V] x 4 B."""

MIN_CHUNK_ROWS = 128
"""Rows per chunk however large the vocabulary: every chunk reads the [V, H] weight twice and reads and
writes its gradient once, so below ~128 rows those passes over memory, not the products, set the time
(Gemma-3's 262k x 640 head, 35 rows: 461 ms as 32 + 3 rows, 368 ms as one chunk)."""


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy of (head(hidden)) over chunks, with the gradients computed during the forward.

    Only one chunk's [chunk, V] logits exist at a time and nothing is recomputed in backward: the
    gradient w.r.t. the hidden rows ([N, H]) and the head weight ([V, H], fp32) are kept instead.
    Per chunk: logits (written into one reused buffer), log-softmax (one row-wise kernel), the loss
    gathered from it, its exp (the softmax) minus the one-hot targets as the logits' gradient, and the
    two products of that with the rows and the weight. The kept gradients are scaled in place in
    backward, which may therefore run once (no `retain_graph`).

    With `target_weights` ([N] fp32, the instruction weight's per-target weights) the loss is
    Σ weight x -log p and each row's logits gradient is multiplied by its weight before the products;
    the per-target -log p are returned too (third output, not differentiable). Without them (None),
    the third output is empty and nothing else changes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, count_correct, spare,
                target_weights=None):
        # Under bf16 autocast (`precision: bf16-mixed`) the products run in bf16, as autocast would run
        # them; the logits, log-softmax, loss and the head gradient's sum stay fp32. The casts are made
        # here, with autocast off, so that no op of the function is cast behind its back.
        compute = autocast_dtype(hidden.device.type) or weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            return FusedLinearCrossEntropy._forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap,
                                                    count_correct, spare, target_weights, compute)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, count_correct, spare,
                 target_weights, compute):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        chunk_size = max(1, min(chunk_size, n))
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        plain = weight.dtype == compute == torch.float32 and bias is None and scale == 1.0 and softcap is None
        param_dtype, weight = weight.dtype, weight.to(compute)
        bias = bias.to(compute) if bias is not None else None
        logits_buffer = torch.empty(chunk_size, weight.shape[0], dtype=torch.float32, device=hidden.device)
        per_target = torch.empty(n if target_weights is not None else 0, dtype=torch.float32, device=hidden.device)
        # The plain head's log-softmax overwrites its logits (row by row, after reading them: bitwise what a
        # second buffer gets, tested), so one chunk-sized buffer is live, not two (A: 33 MB, Gemma-3: 134 MB).
        logp_buffer = logits_buffer if plain else torch.empty_like(logits_buffer)
        for start in range(0, n, chunk_size):
            rows = hidden[start:start + chunk_size].to(compute)
            tgt = targets[start:start + chunk_size]
            if plain:
                logits = torch.mm(rows, weight.t(), out=logits_buffer[:rows.shape[0]])
            else:
                logits = transform_logits(F.linear(rows, weight, bias).float(), scale, softcap)
            if count_correct:  # before the log-softmax, which may overwrite the logits
                correct += (logits.argmax(dim=-1) == tgt).sum()
            logp = torch.log_softmax(logits, dim=-1, out=logp_buffer[:rows.shape[0]])
            if target_weights is None:
                loss -= logp.gather(1, tgt[:, None]).sum()
            else:
                nll = torch.neg(logp.gather(1, tgt[:, None])[:, 0], out=per_target[start:start + chunk_size])
                loss += (nll * target_weights[start:start + chunk_size]).sum()
            # d(-log softmax[target]) / d logits = softmax - onehot(target), computed in place.
            grad = logp.exp_()
            grad.scatter_add_(1, tgt[:, None], torch.full_like(tgt[:, None], -1, dtype=grad.dtype))
            if softcap is not None:
                grad.mul_(1.0 - (logits / softcap).square())
            if scale != 1.0:
                grad.mul_(scale)
            if target_weights is not None:  # d(w * nll) / d logits = w * d nll / d logits, row by row
                grad.mul_(target_weights[start:start + chunk_size, None])
            grad = grad.to(compute)
            if need_hidden and grad_hidden.dtype == compute:
                torch.mm(grad, weight, out=grad_hidden[start:start + chunk_size])
            elif need_hidden:  # fp32 hidden rows under autocast: the bf16 product, stored in fp32
                grad_hidden[start:start + chunk_size] = grad @ weight
            if need_weight:
                if grad_weight is None:  # the first chunk's product, not a zero-filled [V, H] plus it
                    grad_weight = (torch.mm(grad.t(), rows, out=spare) if _fits(spare, weight, plain)
                                   else (grad.t() @ rows).float())
                elif compute == torch.float32:
                    grad_weight.addmm_(grad.t(), rows)
                else:
                    grad_weight += (grad.t() @ rows).float()
            if need_bias:
                grad_bias += grad.float().sum(0)
        if need_weight and grad_weight is None:  # no targets: an exact zero gradient
            grad_weight = spare.zero_() if _fits(spare, weight, plain) else torch.zeros_like(weight, dtype=torch.float32)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.param_dtype = param_dtype
        ctx.mark_non_differentiable(correct, per_target)
        return loss, correct, per_target

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_per_target):
        if ctx.grads is None:
            raise RuntimeError("the fused LM-head loss can be back-propagated only once (no retain_graph)")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None  # handed on below: the engine may then add into them in place
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        # The head gradients were accumulated in fp32; hand them back in the parameters' dtype.
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.param_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_loss).to(ctx.param_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _fits(spare: torch.Tensor | None, weight: torch.Tensor, plain: bool) -> bool:
    return (plain and spare is not None and spare.shape == weight.shape and spare.dtype == weight.dtype
            and spare.device == weight.device)


_spare_grads: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
"""id(LM head weight) -> (the weight, weakly; last step's gradient tensor for its next fused head to write into).
Keyed by id because tensors compare element-wise; the entry goes when the weight does."""


def _take_spare(weight: torch.Tensor) -> torch.Tensor | None:
    entry = _spare_grads.pop(id(weight), None)
    return entry[1] if entry is not None and entry[0]() is weight else None


def chunk_rows(max_chunk_tokens: int, vocab: int) -> int:
    """Rows per chunk of the fused head: `max_chunk_tokens`, fewer when their logits would pass CHUNK_BYTES,
    but not fewer than MIN_CHUNK_ROWS for that (a 262k vocabulary: 128 rows, 128 MB of logits)."""
    return max(1, min(max_chunk_tokens, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))))


def keep_gradient_for_reuse(weight: torch.Tensor) -> None:
    """Take `weight`'s gradient off it for the next fused head on that weight to write into.

    Instead of `zero_grad(set_to_none=True)` freeing it: a [V, H] gradient (113 MB for SmolLM2, 671 MB
    for Gemma-3's 262k vocabulary) is above glibc's mmap threshold, so a fresh one is mapped anew and
    page-faulted in every step (164k faults, ~0.1 s a step for Gemma-3 on the 2-core machine). The
    fused head overwrites it with its first chunk's product, so nothing needs zeroing. A gradient that
    anything else still refers to (a user's variable, a view) is only dropped, never reused.
    """
    grad = weight.grad
    if grad is None or grad.is_sparse or grad.device.type != "cpu" or not hasattr(grad, "_use_count"):
        return
    weight.grad = None
    # `grad` here must be the only reference left: none from Python (getrefcount counts its own argument
    # too) and none from C++ (a view's base, an autograd graph).
    if sys.getrefcount(grad) == 2 and grad._use_count() == 1:
        key = id(weight)
        _spare_grads[key] = (weakref.ref(weight, lambda _, key=key: _spare_grads.pop(key, None)), grad)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, chunk_size: int, scale: float, softcap: float | None,
                               count_correct: bool, parameter: torch.Tensor,
                               target_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(Σ -log p of `targets`, correct argmax count) through `FusedLinearCrossEntropy`.

    `weight` is what the head multiplies by (it may be a view of `parameter`, see loss._LateGrad);
    `parameter` is the head's weight itself, whose recycled gradient (`keep_gradient_for_reuse`) the
    head gradient is written into when there is one. With `target_weights` ([N] fp32): (Σ weight x -log p,
    correct count, per-target -log p [N]).
    """
    loss, correct, per_target = FusedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, chunk_size, scale, softcap, count_correct, _take_spare(parameter),
        target_weights)
    return (loss, correct) if target_weights is None else (loss, correct, per_target)
