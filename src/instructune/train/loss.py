"""Masked, token-normalised cross-entropy over the response positions only (docs/masking.md, rules 11-12).

The loss runs the model *body* (the decoder without its LM head), shifts by one (the hidden state at
position t predicts the label at t+1), gathers only the positions whose shifted label is not -100, and
applies the LM head to those rows alone, in fp32. Prompt positions never reach the head, which saves
the head's share of compute and the logits memory in proportion to the prompt fraction.

Normalisation is the caller's job, because only the caller sees the whole optimizer step:

- **token** (the default, rule 11): ``loss = Σ out.loss_sum / step_normalizer(all micro-batches)``,
  with the denominator summed over every micro-batch of the step and, under data parallelism,
  all-reduced over ranks. Then 1 micro-batch of 8 rows equals 8 micro-batches of 1 and 2 ranks x 4
  rows equals 1 rank x 8 rows. Dividing each micro-batch by its own count and averaging those means
  (the 2024 gradient-accumulation bug) weights a token in a short micro-batch more than one in a long
  one; never do that.
- **sequence** (``loss_normalization: sequence``, an explicit option): the mean of per-row means.
  Call ``masked_lm_loss(..., per_row=True)``, sum ``row_mean_sum(out)`` over the step's micro-batches
  and divide by ``step_row_count(all micro-batches)`` (all-reduced over ranks too).

**Instruction weight** (``instruction_weight: w``, docs/masking.md, "Instruction weight"): a batch collated
with w > 0 also carries ``instruction_labels``, and ``masked_lm_loss(..., instruction_weight=w)`` scores
those targets too, each position's cross-entropy times its weight (1 for a response, w for an
instruction). The head sees exactly the positions of nonzero weight. The token denominator is the
sum of the step's weights, ``n_response + w * n_instruction`` over every micro-batch and rank
(`step_plan.step_counts`); sequence normalisation divides each row's weighted sum by its weight sum.
With w = 0 (the default) nothing of this runs: the code path is the masked one, bit for bit.

Batches come from `instructune.data.batching`: padded (`input_ids`, `labels`, `attention_mask`) or
packed (`input_ids`, `labels`, `position_ids`, `cu_seq_lens`, batch size 1, no `attention_mask`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from instructune import IGNORE_INDEX
from instructune.model.varlen_attention import NAME as VARLEN_ATTENTION
from instructune.model.varlen_attention import rows_given
from instructune.train.fused_head import (
    chunk_rows,
    fused_linear_cross_entropy,
    keep_gradient_for_reuse,
    transform_logits,
)

__all__ = [
    "LossOutput",
    "count_instruction_targets",
    "count_targets",
    "masked_lm_loss",
    "recycle_head_gradient",
    "row_mean_sum",
    "row_target_counts",
    "split_model",
    "step_normalizer",
    "step_row_count",
    "token_losses",
]


@dataclass
class LossOutput:
    """What `masked_lm_loss` returns for one micro-batch; divide `loss_sum` by the step's target count."""

    loss_sum: torch.Tensor
    """Differentiable fp32 scalar: the sum of -log p(target) over every scored target of the micro-batch."""
    num_targets: int
    """How many targets `loss_sum` sums over (after the shift)."""
    num_correct: torch.Tensor | None = None
    """Targets where argmax of the logits equals the target (only with `compute_accuracy=True`)."""
    row_loss_sums: torch.Tensor | None = None
    """Per-row sums of -log p, differentiable, shape [rows] (only with `per_row=True`)."""
    row_num_targets: torch.Tensor | None = None
    """Per-row target counts, shape [rows] (only with `per_row=True`)."""
    response_loss_sum: torch.Tensor | None = None
    """With an instruction weight: Σ -log p over the response targets alone (weight 1), detached."""
    instruction_loss_sum: torch.Tensor | None = None
    """With an instruction weight: Σ -log p over the instruction targets, unweighted, detached."""
    num_instruction_targets: int = 0
    """With an instruction weight: how many instruction targets `loss_sum` also sums over (times w)."""
    row_weight_sums: torch.Tensor | None = None
    """With an instruction weight and `per_row=True`: each row's sum of target weights, shape [rows]."""


def count_targets(labels: torch.Tensor) -> int:
    """Number of scored targets after the shift: labels[..., 1:] != -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def count_instruction_targets(batch: dict[str, torch.Tensor]) -> int:
    """Instruction targets after the shift (scored at the instruction weight); 0 without `instruction_labels`."""
    instruction = batch.get("instruction_labels")
    return 0 if instruction is None else count_targets(instruction)


def _weighted(batch: dict[str, torch.Tensor], instruction_weight: float) -> bool:
    """Whether the instruction-weight path runs: a weight above 0 and a batch collated with it."""
    return instruction_weight > 0 and "instruction_labels" in batch


def step_normalizer(micro_batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """The token-normalisation denominator of one optimizer step on this rank: Σ count_targets."""
    return sum(count_targets(batch["labels"]) for batch in micro_batches)


def _row_ids(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Row index of every position [B, T] and the number of rows (packed segments count as rows)."""
    labels = batch["labels"]
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"].to(device=labels.device, dtype=torch.long)
        num_rows = cu.numel() - 1
        ids = torch.repeat_interleave(torch.arange(num_rows, device=labels.device), cu.diff())
        return ids.view(1, -1), num_rows
    batch_size, length = labels.shape
    return torch.arange(batch_size, device=labels.device).view(-1, 1).expand(batch_size, length), batch_size


def row_target_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets per row after the shift, shape [rows]; a packed batch counts each packed row."""
    labels = batch["labels"]
    row_ids, num_rows = _row_ids(batch)
    scored = labels[..., 1:] != IGNORE_INDEX
    return torch.bincount(row_ids[..., :-1][scored], minlength=num_rows)


def step_row_count(micro_batches: Sequence[dict[str, torch.Tensor]], instruction_weight: float = 0.0) -> int:
    """The sequence-normalisation denominator: rows with at least one target, over the step's micro-batches.

    With an instruction weight above 0, a row whose only targets are instruction targets counts too.
    """
    total = 0
    for batch in micro_batches:
        counts = row_target_counts(batch)
        if _weighted(batch, instruction_weight):
            counts = counts + row_target_counts({**batch, "labels": batch["instruction_labels"]})
        total += int((counts > 0).sum())
    return total


def row_mean_sum(out: LossOutput) -> torch.Tensor:
    """Σ over rows with targets of (row loss sum / row target count); needs `per_row=True`."""
    if out.row_loss_sums is None or out.row_num_targets is None:
        raise ValueError("row_mean_sum needs masked_lm_loss(..., per_row=True)")
    if out.row_weight_sums is not None:  # instruction weight: each row's weighted sum over its weight sum
        has_targets = out.row_weight_sums > 0
        counts = torch.where(has_targets, out.row_weight_sums, torch.ones_like(out.row_weight_sums))
        return torch.where(has_targets, out.row_loss_sums / counts, torch.zeros_like(out.row_loss_sums)).sum()
    has_targets = out.row_num_targets > 0
    counts = out.row_num_targets.clamp(min=1).to(out.row_loss_sums.dtype)
    # A row without targets contributes an exact (graph-connected) zero, never 0/0.
    return torch.where(has_targets, out.row_loss_sums / counts, torch.zeros_like(out.row_loss_sums)).sum()


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module, object]:
    """The (body, head, text config) of a causal LM, looking through a PEFT wrapper.

    The body is `get_decoder()` (it returns final-normed hidden states); the head is
    `get_output_embeddings()`. Prompt-learning PEFT methods insert virtual tokens in the wrapper's own
    forward, so they cannot be split and are refused.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise NotImplementedError("prompt-learning PEFT methods are not supported by the selective head; use LoRA")
    if hasattr(model, "get_base_model"):  # peft.PeftModel: the LoRA layers live inside the base model
        model = model.get_base_model()
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "get_decoder"):
        raise TypeError(
            f"{type(model).__name__} is not a Hugging Face causal LM (no get_output_embeddings/get_decoder); "
            "under DistributedDataParallel, wrap a module whose forward calls masked_lm_loss instead, so that "
            "DDP's forward still runs and the gradients are all-reduced"
        )
    head = model.get_output_embeddings()
    body = model.get_decoder()
    if head is None or body is model:
        raise TypeError(f"cannot find the LM head and decoder body of {type(model).__name__}")
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return body, head, text_config


def _logit_transform(config: object) -> tuple[float, float | None]:
    """(scale, softcap) that the model's own forward applies to the head's output.

    Llama and Qwen2 apply nothing; Gemma 2/3 soft-cap with `final_logit_softcapping`
    (cap * tanh(logits / cap)); Cohere multiplies by `logit_scale`; Granite divides by `logits_scaling`.
    """
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)
    if isinstance(logit_scale, (int, float)):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)
    if isinstance(logits_scaling, (int, float)):
        scale /= float(logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, float(softcap) if softcap else None


def _body_inputs(batch: dict[str, torch.Tensor], attn_implementation: str | None) -> dict[str, object]:
    """Keyword arguments for the decoder body: padded or packed, never both."""
    inputs: dict[str, object] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if "cu_seq_lens" in batch:
        if "attention_mask" in batch:
            # A 2-D mask switches off transformers' packed-sequence detection: rows would attend to each other.
            raise ValueError("a packed batch (cu_seq_lens) must not carry an attention_mask")
        if batch["input_ids"].shape[0] != 1 or "position_ids" not in batch:
            raise ValueError("a packed batch has batch size 1 and position_ids that restart at every row")
        if attn_implementation and ("flash" in attn_implementation or attn_implementation == VARLEN_ATTENTION):
            # Padding-free variable-length attention: hand the row boundaries over directly so flash-attention
            # (or varlen_attention.py on CPU) runs per row without re-deriving them from position_ids.
            cu = batch["cu_seq_lens"].to(device=batch["input_ids"].device, dtype=torch.int32)
            max_len = int(cu.diff().max())
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
        # sdpa/eager/flex: transformers' masking_utils sees position_ids restart with no attention_mask and
        # builds the block-diagonal causal mask itself (sliding windows included), so nothing else is passed.
    elif "attention_mask" in batch and not _right_padded_on_cpu(batch["attention_mask"]):
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def _right_padded_on_cpu(mask: torch.Tensor) -> bool:
    """Whether a CPU padding mask is ones then zeros in every row, so that leaving it out changes nothing.

    Under the causal mask a real position attends only to earlier positions, which right padding keeps
    real, and padded positions are never scored. Without the mask, SDPA takes its causal path, which
    skips the blocks above the diagonal instead of masking them. The check reads the mask, so on
    CUDA (a host sync) the mask is passed on as is.
    """
    return mask.device.type == "cpu" and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all())


def _gather_targets(model: nn.Module, batch: dict[str, torch.Tensor], *, fused_training: bool = False,
                    instruction_weight: float = 0.0):
    """Run the body; return (hidden rows [N, H], targets [N], head, head weight, scale, softcap, selection,
    target weights [N] or None).

    With `fused_training` and an LM head tied to the input embedding, the body runs with a sparse
    embedding gradient and the head reads its weight through `_LateGrad`; see `_tied_embedding`. With an
    instruction weight above 0 (and `instruction_labels` in the batch), the instruction targets are
    gathered too, in row-major order with the response targets; a position of weight 0 is never gathered.
    """
    body, head, config = split_model(model)
    inputs = _body_inputs(batch, getattr(config, "_attn_implementation", None))
    embedding = _tied_embedding(model, head) if fused_training else None
    weight = head.weight
    with rows_given() if "cu_seq_lens_q" in inputs else contextlib.nullcontext():
        if embedding is None:
            out = body(**inputs)
        else:
            weight = _LateGrad.apply(head.weight)  # before the body runs: see _LateGrad
            embedding.sparse = True
            try:
                out = body(**inputs)
            finally:
                embedding.sparse = False
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    labels = batch["labels"].to(hidden.device)
    weights = None
    if _weighted(batch, instruction_weight):
        response = labels != IGNORE_INDEX
        labels = torch.where(response, labels, batch["instruction_labels"].to(hidden.device))
        # Response 1, instruction w: in fp32, so w = 1 multiplies by an exact 1.
        position_weights = torch.where(response, 1.0, float(instruction_weight)).to(torch.float32)[:, 1:]
    shifted = labels[:, 1:]
    selected = shifted != IGNORE_INDEX
    if _weighted(batch, instruction_weight):
        weights = position_weights[selected]
    scale, softcap = _logit_transform(config)
    return hidden[:, :-1][selected], shifted[selected], head, weight, scale, softcap, selected, weights


def _tied_embedding(model: nn.Module, head: nn.Module) -> nn.Embedding | None:
    """The input embedding when it shares its weight with a trainable plain-Linear head (one process only).

    Its gradient is then made cheap. By default the embedding's backward writes a dense [V, H] zero
    tensor to scatter its few rows into, and autograd adds that to the head's [V, H] gradient out of
    place: two vocabulary-sized allocations and three passes per micro-batch (with Gemma's 262k
    vocabulary, 670 MB each), for a gradient that touches only the batch's token rows. With a sparse
    embedding gradient that arrives first, autograd adds it into the head's dense gradient in place
    (`InputBuffer::accumulate`), which is an index-add of those rows. The sum is the same either way.
    Left out under torch.distributed, whose wrappers hook into the gradients themselves.
    """
    if not torch.is_grad_enabled() or type(head) is not nn.Linear or not head.weight.requires_grad:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding) or embedding.weight is not head.weight or embedding.sparse:
        return None
    return embedding


class _LateGrad(torch.autograd.Function):
    """Identity on the head weight whose backward runs after the body's, so the sparse gradient comes first.

    Autograd runs the ready node with the highest sequence number first, and this node is created
    before the body's forward, so it hands the head's dense gradient on only once the embedding's
    sparse one has reached the weight; autograd then adds the sparse one into it in place. Should the
    order ever differ, the sum is still right, only made out of place.
    """

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad


def recycle_head_gradient(model: nn.Module) -> None:
    """After the optimizer step: keep the LM head's gradient for the next step's fused head to write into.

    See `fused_head.keep_gradient_for_reuse`. Left alone under torch.distributed, whose wrappers own
    the gradients.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    weight = getattr(split_model(model)[1], "weight", None)
    if weight is not None:
        keep_gradient_for_reuse(weight)


def _use_fused(head: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Train through the fused function whenever its gradients are needed and the head is a plain Linear.

    It needs less memory than autograd (which keeps the logits and their log-softmax for backward)
    and less time (no log-softmax backward, no zero-filled [V, H] gradient), at any size.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # Only a plain Linear: a LoRA-wrapped or quantised head computes something other than hidden @ W^T.
    return needs_grad and type(head) is nn.Linear


def _per_token_ce(hidden, targets, head, scale, softcap, chunk_size: int,
                  count_correct: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-target -log p [N] and the argmax hits; without autograd only one chunk's logits are alive."""
    if torch.is_grad_enabled():
        # Autograd would keep every chunk's logits for backward anyway: one call is as small and faster.
        chunk_size = hidden.shape[0]
    chunk_size = max(chunk_size, 1)
    losses, correct = [], torch.zeros((), dtype=torch.long, device=hidden.device)
    # At least one pass, also for zero targets, so that the head stays connected to the graph.
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        logits = transform_logits(head(hidden[start:start + chunk_size]).float(), scale, softcap)
        tgt = targets[start:start + chunk_size]
        losses.append(F.cross_entropy(logits, tgt, reduction="none"))
        if count_correct:
            correct += (logits.detach().argmax(dim=-1) == tgt).sum()
    return torch.cat(losses), correct if count_correct else None


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, compute_accuracy: bool = False,
                   max_chunk_tokens: int = 4096, per_row: bool = False,
                   instruction_weight: float = 0.0) -> LossOutput:
    """Sum of -log p over the batch's targets through the selective LM head; see the module docstring.

    When gradients are needed, the head and cross-entropy run in chunks of at most `max_chunk_tokens`
    targets (fewer for a large vocabulary: about 32 MB of logits, at least 128 rows) whose gradients are
    computed in the forward pass, capping the logits memory at one chunk. Without gradients (evaluation)
    the chunks are `max_chunk_tokens` long. `per_row=True` also returns per-row sums for sequence
    normalisation; it takes the unchunked autograd path, so it does not cap the logits memory.
    `instruction_weight` > 0 with a batch that has `instruction_labels`: see `_weighted_loss`.
    """
    if max_chunk_tokens < 1:
        raise ValueError("max_chunk_tokens must be at least 1")
    if _weighted(batch, instruction_weight):
        return _weighted_loss(model, batch, compute_accuracy, max_chunk_tokens, per_row, instruction_weight)
    hidden, targets, head, weight, scale, softcap, selected, _ = _gather_targets(
        model, batch, fused_training=not per_row)
    num_targets = int(targets.shape[0])
    if not per_row and _use_fused(head, hidden, weight):
        loss_sum, correct = fused_linear_cross_entropy(
            hidden, weight, head.bias, targets, chunk_rows(max_chunk_tokens, weight.shape[0]), scale, softcap,
            compute_accuracy, head.weight)
        return LossOutput(loss_sum, num_targets, correct if compute_accuracy else None)

    # Zero targets run the head on an empty [0, H] input: the sum is an exact 0 that is still connected to
    # the graph (all gradients exist and are zero), never a NaN from 0/0.
    losses, correct = _per_token_ce(hidden, targets, head, scale, softcap, max_chunk_tokens, compute_accuracy)
    out = LossOutput(losses.sum(), num_targets, correct)
    if per_row:
        row_ids, num_rows = _row_ids(batch)
        row_ids = row_ids.to(losses.device)[:, :-1][selected]
        out.row_loss_sums = torch.zeros(num_rows, dtype=losses.dtype, device=losses.device).index_add(
            0, row_ids, losses)
        out.row_num_targets = torch.bincount(row_ids, minlength=num_rows)
    return out


def _weighted_loss(model: nn.Module, batch: dict[str, torch.Tensor], compute_accuracy: bool,
                   max_chunk_tokens: int, per_row: bool, instruction_weight: float) -> LossOutput:
    """`masked_lm_loss` with instruction targets at weight w: `loss_sum` = Σ weight x -log p, with the
    response and instruction sums beside it (unweighted, detached) so that their curves stay comparable."""
    hidden, targets, head, weight, scale, softcap, selected, weights = _gather_targets(
        model, batch, fused_training=not per_row, instruction_weight=instruction_weight)
    response = (batch["labels"][:, 1:].to(selected.device) != IGNORE_INDEX)[selected]  # the rest: instruction
    if not per_row and _use_fused(head, hidden, weight):
        loss_sum, correct, losses = fused_linear_cross_entropy(
            hidden, weight, head.bias, targets, chunk_rows(max_chunk_tokens, weight.shape[0]), scale, softcap,
            compute_accuracy, head.weight, target_weights=weights)
    else:
        losses, correct = _per_token_ce(hidden, targets, head, scale, softcap, max_chunk_tokens, compute_accuracy)
        loss_sum = (losses * weights).sum()
    detached = losses.detach()
    num_response = int(response.sum())
    out = LossOutput(loss_sum, num_response, correct if compute_accuracy else None,
                     response_loss_sum=detached[response].sum(), instruction_loss_sum=detached[~response].sum(),
                     num_instruction_targets=int(targets.shape[0]) - num_response)
    if per_row:
        row_ids, num_rows = _row_ids(batch)
        row_ids = row_ids.to(losses.device)[:, :-1][selected]
        out.row_loss_sums = torch.zeros(num_rows, dtype=losses.dtype, device=losses.device).index_add(
            0, row_ids, losses * weights)
        out.row_num_targets = torch.bincount(row_ids[response], minlength=num_rows)
        instruction = torch.bincount(row_ids[~response], minlength=num_rows)
        # From the counts, in float64: a row's weight sum is exactly n_response + w * n_instruction.
        out.row_weight_sums = (out.row_num_targets.double() + instruction_weight * instruction.double()).to(
            losses.dtype)
    return out


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor], *, max_chunk_tokens: int = 4096,
                 instruction_weight: float = 0.0) -> torch.Tensor:
    """Per-target -log p [N], in the row-major order of `labels[:, 1:] != -100` (same selective path).

    Target i is the token at `(b, t + 1)` for the i-th `(b, t)` of `torch.nonzero(labels[:, 1:] != -100)`.
    Call it under `torch.no_grad()` for evaluation: then only one chunk's logits exist at a time. With an
    `instruction_weight` above 0 and `instruction_labels` in the batch, the instruction targets are in the
    same order too (unweighted): positions where either label is set.
    """
    hidden, targets, head, _, scale, softcap, _, _ = _gather_targets(
        model, batch, instruction_weight=instruction_weight)
    return _per_token_ce(hidden, targets, head, scale, softcap, max_chunk_tokens)[0]
