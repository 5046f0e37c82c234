"""Data parallelism on PyTorch's own engine: `torchrun` starts the ranks, `torch.distributed` joins them.

What a run on N ranks does differently from one on a single process:

- **The global batch.** `batch_size` x `grad_accum` rows make one optimizer step whatever N is. The
  step's micro-batches are chosen exactly as on one process (`step_plan.StepPlan`, same seed, same
  order); `rank_share` then gives each rank its part of every micro-batch, balanced by tokens. A rank
  whose share is empty (fewer rows than ranks) runs a row with every label masked
  (`without_targets`): its loss is a differentiable zero, so it still joins every collective.
- **The loss** (docs/masking.md, rule 11). The step's target count is summed over the ranks once, before any
  backward pass; each rank back-propagates Σ -log p over its own targets divided by that *global*
  count, so the gradient of the step's loss is the *sum* of the ranks' gradients. DDP and FSDP divide
  by N by default; here DDP all-reduces with a SUM comm hook (`_sum_gradients`) and FSDP2
  reduce-scatters with a plain SUM (divide factor 1), so nothing is rescaled and 2 ranks x 2 rows
  equal 1 rank x 4 rows. (Multiplying the loss by N would do the same in exact arithmetic, but it
  scales what backward sees and rounds twice when N is not a power of 2.)
- **The wrappers** (`distributed: ddp | fsdp`). Both wrap `LossModule`, whose forward calls
  `masked_lm_loss`: the loss runs the decoder body and the head separately, so calling it on the bare
  model would skip DDP's and FSDP's forward hooks. DDP skips the all-reduce (`no_sync`) on all but a
  step's last micro-batch; FSDP2 reduce-scatters after every micro-batch, which keeps only sharded
  gradients in memory (the point of FSDP).
- **Rank 0** alone prints, writes metrics and checkpoints (the others wait at a barrier until the
  checkpoint is complete); every rank evaluates its share of the eval batches and the sums are
  all-reduced. Checkpoints hold the full state (`instructune.train.fsdp` gathers it under FSDP), so a run
  resumes on any number of ranks: the plan, and so the global batches, do not depend on it. With
  several ranks, torch's RNG is reseeded per (seed, step, rank), so resuming on the same number of
  ranks redraws the same dropout masks (bitwise the same run); on another number the rows meet other
  masks, and without dropout the run is the same to float rounding.
- **The process group** comes from torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
  `MASTER_ADDR`, ...): gloo on CPU, nccl on CUDA (device `cuda:LOCAL_RANK`). A rank that dies is
  noticed by torchrun, which stops the others within seconds; `dist_timeout_s` bounds every wait, so
  a rank that hangs without dying ends the job too, instead of stalling it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from instructune import IGNORE_INDEX
from instructune.errors import UserError
from instructune.train.loss import LossOutput, masked_lm_loss

if TYPE_CHECKING:
    from instructune.train.config import TrainConfig

T = TypeVar("T")

_OWNED_GROUP = False  # whether `init_distributed` created the process group (and so must destroy it)


def is_main_process() -> bool:
    """True on rank 0 or without torchrun; readable before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_share(batch: Sequence[int], lengths: Sequence[int], world_size: int, rank: int) -> list[int]:
    """Rank `rank`'s rows of a global micro-batch: each row, longest first, goes to the least-loaded rank.

    Loads are counted in tokens, ties go to the lower rank, and the rows keep their order within a share,
    so the split is a pure function of the batch. With fewer rows than ranks, the last ranks get none.
    """
    if world_size == 1:
        return list(batch)
    loads = [0] * world_size
    owner = {}
    for index in sorted(batch, key=lambda i: (-lengths[i], i)):
        target = min(range(world_size), key=lambda r: (loads[r], r))
        owner[index] = target
        loads[target] += lengths[index]
    return [i for i in batch if owner[i] == rank]


def without_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every label masked: its loss is an exact, graph-connected zero."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step `step` on `rank`: dropout becomes a pure function of where the run is."""
    digest = hashlib.sha256(f"instructune-{seed}-{step}-{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class LossModule(nn.Module):
    """What DDP or FSDP wraps: a forward that is the masked loss, so their hooks see every computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], **options) -> dict[str, Any]:
        # A dict rather than the LossOutput dataclass: DDP and FSDP find the output tensors in containers
        # they know (dicts, tuples), and FSDP hooks its backward onto them.
        return vars(masked_lm_loss(self.model, batch, **options))


def _sum_gradients(state, bucket):
    """DDP comm hook: all-reduce a gradient bucket with SUM (DDP's built-in hook divides by the world size)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


@dataclass
class Parallel:
    """This process's place among the ranks, and the collectives the training loop needs.

    On a single process every method is a no-op or a plain call, so the loop has one code path.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    """ddp or fsdp; only used with several ranks."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    module: nn.Module | None = None
    """`LossModule` behind DDP or FSDP (set by `wrap`); None until then."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True when the parameters are FSDP shards (state must be gathered to be saved)."""
        return self.world_size > 1 and self.strategy == "fsdp"

    def wrap(self, model: nn.Module) -> None:
        """Put `model` behind DDP or FSDP2 (one process: behind nothing). Build the optimizer after this."""
        module = LossModule(model)
        if self.world_size > 1 and self.strategy == "fsdp":
            from instructune.train.fsdp import shard

            shard(module, model, self.device)
        elif self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Buffers (rotary tables) are the same on every rank and never trained: no broadcast per forward.
            device_ids = [self.device] if self.device.type == "cuda" else None
            try:
                module = DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
            except TypeError:  # torch before 2.13
                module = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
            module.register_comm_hook(None, _sum_gradients)
        self.module = module

    def loss(self, batch: dict[str, torch.Tensor], *, sync: bool = True, **options) -> LossOutput:
        """`masked_lm_loss` through the wrapper; `sync=False` (DDP) keeps the gradients local for now."""
        if self.module is None:
            raise RuntimeError("Parallel.wrap(model) must be called first")
        if self.world_size == 1:
            return masked_lm_loss(self.module.model, batch, **options)
        skip = self.module.no_sync() if not sync and self.strategy == "ddp" else nullcontext()
        with skip:
            return LossOutput(**self.module(batch, **options))

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks, in one all-reduce (float64: counts stay exact below 2**53)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait until every rank gets here (bounded by `dist_timeout_s`)."""
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (any picklable object) on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """`work()` on rank 0 alone, its result on every rank; a UserError there is raised on every rank."""
        if self.world_size == 1:
            return work()
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except UserError as failure:
                error = str(failure)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise UserError(error)
        return result

    @contextmanager
    def local_main_first(self):
        """Let local rank 0 run the block before the others (it fills the caches they then read)."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def gather_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """(weights, optimizer state) for a checkpoint: under FSDP the full ones, gathered from the shards
        to rank 0 (a collective: every rank calls it); otherwise (None, None), the model's own will do."""
        if not self.sharded:
            return None, None
        from instructune.train.fsdp import full_model_state, full_optimizer_state

        return full_model_state(self.module), full_optimizer_state(self.module, optimizer)

    def load_optimizer_state(self, checkpoint: os.PathLike, optimizer: torch.optim.Optimizer) -> None:
        """Restore the optimizer from a checkpoint's full state (scattered into the shards under FSDP)."""
        from instructune.train.checkpoint import load_optimizer_state, read_optimizer_state

        if not self.sharded:
            load_optimizer_state(checkpoint, optimizer)
            return
        from instructune.train.fsdp import load_full_optimizer_state

        saved = read_optimizer_state(checkpoint, "cpu")
        load_full_optimizer_state(self.module, optimizer, saved)

    def seed_step(self, seed: int, step: int) -> None:
        """Several ranks: reseed torch per (seed, step, rank), so resuming redraws the same dropout masks."""
        if self.world_size > 1:
            torch.manual_seed(step_seed(seed, step, self.rank))


def init_distributed(config: TrainConfig, device: torch.device) -> Parallel:
    """Join the ranks torchrun started (gloo on CPU, nccl on CUDA); without torchrun, a single process.

    A process group that already exists (the caller made it) is used as it is and left to the caller.
    """
    global _OWNED_GROUP
    strategy, timeout_s = config.distributed, config.dist_timeout_s
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        return Parallel(strategy=strategy, device=device)
    if strategy == "fsdp" and config.merge_lora:
        raise UserError("merge_lora is not available with distributed: fsdp on several ranks (the weights are "
                        "sharded); train without it, then merge on one process: the same config without "
                        "torchrun, with resume=true merge_lora=true")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                        "start at most that many processes per node (torchrun --nproc-per-node)")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        _OWNED_GROUP = True
    return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    strategy=strategy, device=device)


def shutdown() -> None:
    """Destroy the process group if `init_distributed` created it."""
    global _OWNED_GROUP
    if _OWNED_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False


class NoMetrics:
    """The metrics logger of ranks other than 0: they write nothing."""

    def log(self, record: dict[str, Any]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""
