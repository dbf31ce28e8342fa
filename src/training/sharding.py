"""What the trainer needs to run under accelerate's FSDP2 engine (``fully_shard``): whole tensors from sharded ones.

Under FSDP2 every parameter of the trained module is a ``DTensor`` holding one process's slice. Checkpoints,
saved models and logged alphas must hold whole tensors, and a resumed run must slice them again. Each
function here that gathers is a collective: every process must call it, in the same order. On plain tensors
``local``, ``shard_like``, ``shard_optimizer_state`` and ``whole_parameters`` change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support: nothing can be sharded
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (one process's part of a tensor spread over processes)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def whole(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """The whole tensor (gathered from every process if sharded; a collective then), detached, on the CPU.

    ``keep=False``: take part in the gathering and return None (the processes that do not write).
    """
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu() if keep else None


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (itself when not sharded); no communication."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` (a whole tensor) on ``like``'s device, in ``dtype`` (default ``like``'s), sliced as ``like`` is
    when ``like`` is sharded.

    Every process must pass the same ``value`` (e.g. read from the same checkpoint); each keeps its own slice,
    with no communication.
    """
    dtype = like.dtype if dtype is None else dtype
    if not is_sharded(like):
        return value.to(like.device, dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(local(like).device, dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of whole tensors: slice each per-parameter state tensor as its parameter is."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param) or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == param.shape:
                    state[name] = shard_like(value, param)


def fsdp_modules(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` (itself included) that ``fully_shard`` made into FSDP units."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return []
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole_parameters(root: nn.Module, parts: Iterable[nn.Module] | None = None, keep: bool = True
                     ) -> Iterator[None]:
    """Inside, the parameters of ``parts`` (default: all of ``root``) are whole, plain tensors.

    Each sharded parameter is gathered (a collective: every process calls this, with the same ``parts``) and
    put in its module's place of the slice, which comes back on leaving. ``keep=False``: this process only
    takes part in the gathering and keeps its slices (e.g. every process but the one that writes). A no-op
    when nothing is sharded. Changes to the whole tensors are not written back: use it to read (save, log).

    FSDP2's own ``unshard`` is not enough for saving: ``state_dict()`` puts the slices back first.
    """
    modules = [root] if parts is None else list(parts)
    for unit in fsdp_modules(root):
        # FSDP2 puts a unit's slices back in place (its state_dict pre-hook) unless the unit is already split:
        # split every unit first, so the whole tensors swapped in below stay (no-op when already split)
        unit.reshard()

    def gathered(param: nn.Parameter) -> nn.Parameter | None:
        if not is_sharded(param):
            return None
        full = param.full_tensor().detach().cpu()  # every process, the same order
        return nn.Parameter(full, requires_grad=param.requires_grad) if keep else None

    with swapped_parameters(modules, gathered):
        yield


@contextlib.contextmanager
def swapped_parameters(modules: Iterable[nn.Module], replacement) -> Iterator[None]:
    """Inside, each parameter of ``modules`` (and their submodules) for which ``replacement(parameter)`` gives a
    parameter is that one, in its module's place; the originals come back on leaving. ``replacement`` is called
    once per parameter (a shared one once), in the modules' order; None leaves the parameter in place."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    made: dict[int, nn.Parameter | None] = {}
    try:
        for module in modules:
            for owner in module.modules():
                for name, param in list(owner.named_parameters(recurse=False)):
                    if id(param) not in made:
                        made[id(param)] = replacement(param)
                    if made[id(param)] is not None:
                        owner.register_parameter(name, made[id(param)])
                        swapped.append((owner, name, param))
        yield
    finally:
        for owner, name, param in reversed(swapped):
            owner.register_parameter(name, param)
