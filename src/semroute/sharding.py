"""Fully sharded data parallel training (torch's `fully_shard`, FSDP2) and its checkpoints.

With `train.fsdp: true` under `accelerate launch` on several processes, the parts of every DiT block and
then the rest of the DiT are sharded over the processes (`shard_model`): each holds 1/N of the weights,
gradients, optimizer state and EMA, and gathers a part's weights only while it runs. accelerate still runs
the processes, splits the batches and keeps the precision; it does not wrap the model (its own FSDP plugin
needs GPUs, this works on CPUs too).

Checkpoints hold the full, unsharded state in the single-process layout (weights and EMA by name, the
optimizer state keyed by parameter index), so a run resumes under one process, under DDP or under FSDP on
any number of processes, whatever wrote it. Gathering is collective: every process calls the functions
below, and only the main process gets (and writes) the full state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .blocks import CrossAttention
from .checkpoint import TrainingSnapshot, snapshot_of

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from .dit import SemanticRoutingDiT

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: SemanticRoutingDiT) -> None:
    """Shard the DiT over the process group accelerate started, in place: one unit per part of each block
    (gathered only while it runs), then the rest (embedders, fusion, final layer, and every block's
    cross-attention keys/values projection, which `route_text` runs for all blocks before any of them)."""
    for block in model.dit_blocks:
        for child in block.children():
            if isinstance(child, CrossAttention):
                units = [m for n, m in child.named_children() if n not in CrossAttention.TEXT_SIDE]
            else:
                units = [child]
            for unit in units:
                if any(True for _ in unit.parameters()):
                    fully_shard(unit)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU (collective when sharded: every process calls; the others get {})."""
    if not is_sharded(model):
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    full: dict[str, Any] = get_model_state_dict(model, options=FULL)
    return {k: v.contiguous() for k, v in full.items()}


def full_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor whole on the CPU: DTensor shards gathered (collective), plain tensors as they are."""
    return [(t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().contiguous() for t in tensors]


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a plain or sharded model (each process keeps its own shard)."""
    if is_sharded(model):
        set_model_state_dict(model, cast(Any, weights), options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights)


def load_ema(ema: EMAModel, tensors: list[torch.Tensor]) -> None:
    """Load full EMA tensors into the shadow parameters, each process keeping its own shard."""
    for p, full in zip(ema.shadow_params, tensors, strict=True):
        if isinstance(p, DTensor):
            full = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        p.data.copy_(full)


def _names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order `optimizer.state_dict()` numbers them."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state in the single-process layout (keyed by parameter index), on the CPU.

    Collective when the model is sharded: every process calls; the others get {}."""
    if not is_sharded(model):
        return optimizer.state_dict()
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    by_name: dict[str, Any] = cast(Any, get_optimizer_state_dict(model, optimizer, options=FULL))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    return {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process optimizer state (keyed by parameter index) into a plain or sharded run."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    optimizer = getattr(optimizer, "optimizer", optimizer)
    names = _names(model, optimizer)
    by_name: dict[str, Any] = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]} for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def snapshot(
    model: torch.nn.Module, ema: EMAModel, optimizer: torch.optim.Optimizer, main: bool
) -> TrainingSnapshot | None:
    """The run's full state for a checkpoint, on the main process (`main`); None on the others.

    Collective when the model is sharded: every process must call it."""
    if not is_sharded(model):
        return snapshot_of(model, ema, optimizer) if main else None
    weights = full_weights(model)
    shadow = full_tensors(list(ema.shadow_params))
    state = full_optimizer_state(model, optimizer)
    return TrainingSnapshot(weights, shadow, state) if main else None


def plain_copy(model: SemanticRoutingDiT, weights: dict[str, torch.Tensor]) -> SemanticRoutingDiT:
    """An unsharded DiT of `model`'s config holding `weights`, on the CPU."""
    from .dit import SemanticRoutingDiT

    copy = SemanticRoutingDiT.from_config(model.config)
    copy.load_state_dict(weights)
    return copy


def unsharded(model: SemanticRoutingDiT) -> SemanticRoutingDiT:
    """`model` itself, or for a sharded one an unsharded copy on every process (collective)."""
    if not is_sharded(model):
        return model
    state = model.state_dict()
    return plain_copy(model, dict(zip(state, full_tensors(list(state.values())), strict=True)))
