"""What the trainer needs to run under accelerate's DeepSpeed engine, ZeRO stages 1 and 2.

ZeRO-1 and ZeRO-2 keep every weight whole on every process and split the optimizer state (and, at stage 2, the
gradients) between them: each process updates its own slice of a flat float32 copy of the trained weights.
The trainer's checkpoints hold one tensor per parameter and state, by name, whatever the engine; here they are
gathered from, and scattered back into, DeepSpeed's partitions through DeepSpeed's own per-parameter accessors
(``deepspeed.utils.safe_get_full_*`` / ``safe_set_full_*``). A checkpoint written under ZeRO resumes a run
without it and the other way round.

The trainer keeps the weights in float32 under DeepSpeed: mixed precision comes from DeepSpeed's
``torch_autocast`` section (bf16 compute, float32 weights and optimizer), not its ``bf16``/``fp16`` sections,
which cast the whole trained module (the frozen parts of the music denoiser included) to half precision.
ZeRO-3 (weights split too) and offloading are refused: FSDP covers ZeRO-3's case (docs/training.md).

Every function here that gathers is a collective: every process calls it, in the same order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .checkpoints import read_optimizer_files
from .sharding import swapped_parameters

__all__ = ["check_zero_config", "fill_zero_config", "zero_trainable", "zero_optimizer_state",
           "load_zero_optimizer_state", "load_zero_weights", "own_storage"]

_DOC = "docs/training.md, 'Sharded training'"


def _plugin(accelerator: Any) -> Any:
    return getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)


def _flag(value: Any, what: str) -> bool | None:
    """A DeepSpeed on/off setting as a bool (None for "auto" or absent); DeepSpeed itself reads any string
    as true, so only true/false (any case) are taken."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"accelerate: the DeepSpeed config's {what} is {value!r}; give true, false or \"auto\"")


def _number(value: Any, what: str) -> float | None:
    if value is None or value == "auto":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"accelerate: the DeepSpeed config's {what} is {value!r}, not a number or "
                         "\"auto\"") from None
    if not math.isfinite(number):
        raise ValueError(f"accelerate: the DeepSpeed config's {what} is {value!r}, not a finite number")
    return number


def check_zero_config(accelerator: Any, mixed_precision: str = "no") -> None:
    """Refuse, with one line naming the setting, a DeepSpeed configuration the trainer does not run."""
    if mixed_precision == "fp16":
        raise ValueError("mixed_precision: fp16 is not supported under DeepSpeed by melfusion's trainer (untested: "
                         "ZeRO's loss scaling beside the trainer's clipping and checks); use bf16 (" + _DOC + ")")
    plugin = _plugin(accelerator)
    config = getattr(plugin, "deepspeed_config", None)
    if not isinstance(config, dict):
        raise ValueError("accelerate: DeepSpeed was selected but its plugin carries no configuration; launch with "
                         "--config_file examples/accelerate/deepspeed_zero2.yaml (" + _DOC + ")")
    zero = config.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise ValueError("accelerate: the DeepSpeed config's zero_optimization is not a mapping")
    stage = zero.get("stage", 0)
    if isinstance(stage, str) and stage.strip().isdigit():
        stage = int(stage)  # DeepSpeed reads "2" as 2
    if isinstance(stage, bool) or stage not in (1, 2):
        raise ValueError(f"accelerate: DeepSpeed zero_optimization.stage {stage!r} is not supported by "
                         "melfusion's trainer; it runs stages 1 and 2 (the weights whole on every process). For "
                         "weights split between processes (ZeRO-3), use FSDP: examples/accelerate/fsdp.yaml ("
                         + _DOC + ")")
    for key in ("offload_optimizer", "offload_param"):
        device = zero[key].get("device", "none") if isinstance(zero.get(key), dict) else "none"
        if str(device).lower() not in ("none", "auto"):
            raise ValueError(f"accelerate: DeepSpeed zero_optimization.{key} (device {device}) is not supported by "
                             f"melfusion's trainer (untested); remove it (" + _DOC + ")")
    for key in ("bf16", "fp16"):
        section = config.get(key)
        if isinstance(section, dict) and _flag(section.get("enabled", False), f"{key}.enabled"):
            raise ValueError(
                f"accelerate: DeepSpeed {key}.enabled casts the trained module's weights, frozen ones included, to "
                f"half precision; melfusion's trainer keeps them in float32. For {key} compute set {key}.enabled "
                f"false and torch_autocast: {{enabled: true, dtype: "
                f"{'bfloat16' if key == 'bf16' else 'float16'}}} (examples/accelerate/deepspeed_zero2.json; "
                + _DOC + ")")
    for key, instead in (("optimizer", "optim.* in the training config"),
                         ("scheduler", "optim.lr_scheduler and optim.warmup_steps in the training config")):
        if key in config:
            # the trainer builds both (its learning-rate groups); DeepSpeed would build and step its own too
            raise ValueError(f"accelerate: the DeepSpeed config has a {key!r} section; melfusion's trainer builds "
                             f"its own (set {instead}): remove it (" + _DOC + ")")


#: how a DeepSpeed config may spell bfloat16
_BF16_NAMES = {"bfloat16", "bf16", "torch.bfloat16"}


def fill_zero_config(accelerator: Any, *, batch_size: int, gradient_accumulation_steps: int,
                     max_grad_norm: float | None, mixed_precision: str = "no") -> None:
    """Put the run's batch size, accumulation, clipping and mixed precision in the DeepSpeed configuration
    before ``prepare``.

    ``"auto"`` (or absent) values take the training config's; a value that differs from it is refused, naming
    both, since DeepSpeed would otherwise train otherwise than the config says. What is written is always the
    training config's value, in the type DeepSpeed reads. Mixed precision is DeepSpeed's ``torch_autocast``
    (``mixed_precision: bf16``; the trainer refuses fp16 under DeepSpeed).
    """
    config = _plugin(accelerator).deepspeed_config
    autocast = config.setdefault("torch_autocast", {})
    if not isinstance(autocast, dict):
        raise ValueError("accelerate: the DeepSpeed config's torch_autocast is not a mapping")
    want_on = mixed_precision == "bf16"
    on = _flag(autocast.get("enabled", "auto"), "torch_autocast.enabled")
    if on is not None and on != want_on:
        raise ValueError(f"accelerate: the DeepSpeed config sets torch_autocast.enabled {on}, the training "
                         f"config's mixed_precision is {mixed_precision!r}; set it to \"auto\" in the DeepSpeed "
                         "config (melfusion fills it in)")
    autocast["enabled"] = want_on
    dtype = autocast.get("dtype", "auto")
    if want_on:
        if dtype not in ("auto", None) and str(dtype) not in _BF16_NAMES:
            raise ValueError(f"accelerate: the DeepSpeed config's torch_autocast.dtype is {dtype}; melfusion's "
                             "trainer runs bfloat16 (mixed_precision: bf16) under DeepSpeed")
        autocast["dtype"] = "bfloat16"
    elif dtype in ("auto", None):
        autocast.pop("dtype", None)
    world = int(accelerator.num_processes)
    wanted = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": batch_size * gradient_accumulation_steps * world,
        "gradient_clipping": 0.0 if max_grad_norm is None else float(max_grad_norm),
    }
    names = {"train_micro_batch_size_per_gpu": "batch_size",
             "gradient_accumulation_steps": "gradient_accumulation_steps",
             "train_batch_size": f"batch_size x gradient_accumulation_steps x {world} processes",
             "gradient_clipping": "optim.max_grad_norm"}
    for key, value in wanted.items():
        given = _number(config.get(key, "auto"), key)
        if given is not None and given != float(value):
            raise ValueError(f"accelerate: the DeepSpeed config sets {key} {config[key]}, the training config's "
                             f"{names[key]} gives {value}; set it to \"auto\" in the DeepSpeed config "
                             f"(melfusion fills it in)")
        config[key] = value
    # the trainer hands DeepSpeed a torch AdamW (its learning-rate groups), which ZeRO runs as a client optimizer
    config.setdefault("zero_allow_untested_optimizer", True)


def _full(value: torch.Tensor | None, like: torch.Tensor, keep: bool) -> torch.Tensor | None:
    if value is None:
        raise RuntimeError("DeepSpeed holds no float32 copy for a trained parameter (is it in the optimizer?)")
    return value.detach().to("cpu", torch.float32).reshape(like.shape).clone() if keep else None


def zero_trainable(trained: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor | None]:
    """The float32 weights DeepSpeed updates (its master copy), whole, by name; a collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: _full(safe_get_full_fp32_param(p), p, keep) for name, p in trained.items()}


def _base(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer ZeRO steps (accelerate's wrapper holds ZeRO's, which holds it)."""
    inner = optimizer
    for _ in range(3):
        if isinstance(inner, torch.optim.Optimizer) and type(inner).__module__.startswith("torch."):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise TypeError(f"DeepSpeed: no torch optimizer found inside {type(optimizer).__name__}")


def _link(base: torch.optim.Optimizer, groups: list[list[torch.Tensor]]) -> None:
    """Point each parameter's view of the optimizer state at its slice of ZeRO's flat partition.

    DeepSpeed links them once, right after its first step of the first parameter group, when the other groups
    have no state yet (DeepSpeed 0.19: their views stay empty, and reading them fails); linking again is cheap
    (views, no copies).
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    if len(base.param_groups) != len(groups):
        raise ValueError("DeepSpeed's optimizer has other parameter groups than the trainer built")
    for group, params in zip(base.param_groups, groups, strict=True):
        for flat in group["params"]:
            if flat in base.state:
                lazy_init_hp_params_optimizer_state(params, flat, base.state)


def zero_optimizer_state(optimizer: torch.optim.Optimizer, groups: list[list[torch.Tensor]], keep: bool = True
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state as :func:`~melfusion.training.checkpoints.optimizer_state_to_files` writes it for an
    unsharded run (``state.<index>.<name>``, indices in the order of ``groups``, the parameters of each group as
    they were handed to the optimizer), gathered from ZeRO's partitions; a collective. Other processes than the
    writing one (``keep=False``) get empty tensors."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base(optimizer)
    _link(base, groups)
    per_param, scalars = [], {}
    for group in base.param_groups:  # one flat float32 partition per group on each process
        for flat in group["params"]:
            for name, value in base.state.get(flat, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == flat.shape and value.ndim > 0:
                    if name not in per_param:
                        per_param.append(name)
                else:
                    scalars[name] = value
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    index = 0
    for params in groups:
        for p in params:
            for name in per_param:
                full = _full(safe_get_full_optimizer_state(p, name), p, keep)
                if keep:
                    tensors[f"state.{index}.{name}"] = full
            for name, value in scalars.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{index}.{name}"] = value.detach().cpu().clone()
                else:
                    plain.setdefault(str(index), {})[name] = value
            index += 1
    meta_groups, start = [], 0
    for group, params in zip(base.param_groups, groups, strict=True):
        entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        entry["params"] = list(range(start, start + len(params)))
        start += len(params)
        meta_groups.append(entry)
    return tensors, {"param_groups": meta_groups, "plain_state": plain}


def load_zero_optimizer_state(optimizer: torch.optim.Optimizer, groups: list[list[torch.Tensor]],
                              tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`zero_optimizer_state`: each process keeps its own slices of the whole saved state.

    Checked (a ``ValueError`` naming what does not fit) before anything changes. No communication.
    """
    from deepspeed.utils import safe_set_full_optimizer_state

    state, saved_groups = read_optimizer_files([[tuple(p.shape) for p in params] for params in groups],
                                               tensors, meta)
    base = _base(optimizer)
    params = [p for ps in groups for p in ps]
    saved_index = [i for g in saved_groups for i in g["params"]]  # as load_state_dict pairs them: in group order
    per_param: dict[str, None] = {}
    scalars: dict[str, Any] = {}
    for entry in state.values():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                per_param[name] = None
            else:
                scalars.setdefault(name, value)
    # a run that has not stepped yet has no state for ZeRO's partitions: make it, as the optimizer's first
    # step would, and link each parameter's slice of it
    for group in base.param_groups:
        for flat in group["params"]:
            entry = base.state[flat]
            for name in per_param:
                if name not in entry:
                    entry[name] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            for name, value in scalars.items():
                entry[name] = value.clone() if isinstance(value, torch.Tensor) else value
    _link(base, groups)
    for k, p in enumerate(params):
        for name, value in state.get(saved_index[k], {}).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), name)
    for group, saved in zip(base.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def load_zero_weights(trained: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Set the trained weights (the module's and DeepSpeed's float32 copy) to whole ``saved`` tensors, on every
    process alike. No communication."""
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        for name, p in trained.items():
            value = saved[name].to(p.device, torch.float32)
            safe_set_full_fp32_param(p, value)
            p.copy_(value.to(p.dtype))


@contextlib.contextmanager
def own_storage(root: nn.Module) -> Iterator[None]:
    """Inside, every trained parameter of ``root`` is a copy with storage of its own; no communication.

    ZeRO makes the trained weights views into one flat buffer, which safetensors refuses to save (shared
    storage). Under ZeRO-1/2 each process holds them whole, and in float32 (the trainer refuses DeepSpeed's
    half-precision weights) they equal DeepSpeed's master copy. Changes inside are not written back.
    """
    def copy(param: nn.Parameter) -> nn.Parameter | None:
        return nn.Parameter(param.detach().clone(), requires_grad=True) if param.requires_grad else None

    with swapped_parameters([root], copy):
        yield
