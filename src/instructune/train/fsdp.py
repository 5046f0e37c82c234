"""FSDP2 (`torch.distributed.fsdp.fully_shard`): sharding the model, and its full state for checkpoints.

Every decoder layer (the classes the model lists in `_no_split_modules`) becomes one FSDP unit and
the rest (embeddings, final norm, LM head) belongs to the root, `LossModule`. Parameters become
DTensor shards; a layer's weights are all-gathered just before its forward and backward and freed
after, and gradients are reduce-scattered with SUM (divide factor 1, see `instructune.train.distributed`).

Checkpoints hold the *full* state, exactly as a single process writes it: the weights and the
optimizer state are gathered to rank 0 (`get_model_state_dict` / `get_optimizer_state_dict` with
`full_state_dict=True, cpu_offload=True`), and the optimizer state is keyed by parameter index like
`optimizer.state_dict()`. So a run can resume under FSDP, DDP or on one process, whatever wrote it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from instructune.errors import UserError


def shard(root: nn.Module, model: nn.Module, device: torch.device) -> None:
    """Apply `fully_shard` to every decoder layer of `model`, then to `root` (which holds `model`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through PEFT
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise UserError(f"distributed: fsdp: {type(base).__name__} names no decoder layer class "
                        "(_no_split_modules); use distributed: ddp")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            # Sum over ranks (the loss is already globally normalised), as a plain SUM: a divide factor
            # alone becomes a PREMUL_SUM reduction, which gloo does not have.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def full_model_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights on rank 0's CPU (empty elsewhere), named as in the wrapped model.

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(root, options=_options(cpu_offload=True))
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def _parameter_names(root: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): name for name, p in root.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state on rank 0's CPU, keyed by index like `optimizer.state_dict()` (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(root, optimizer, options=_options(cpu_offload=True))
    if not state:  # ranks other than 0
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(root, optimizer))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an index-keyed full optimizer state (as `full_optimizer_state` returns) into the shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _parameter_names(root, optimizer)
    by_name = {"state": {names[int(i)]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(root, optimizer, by_name, options=_options())
