"""Training checkpoints: safetensors and JSON only, written atomically, the last K kept.

A checkpoint is a folder ``checkpoints/step-00000042/`` holding

- ``trainable.safetensors``: every trained parameter (music UNet, synapse);
- ``optimizer.safetensors`` + the JSON part of the optimizer state (steps,
  hyper-parameters) in ``state.json``;
- ``ema.safetensors`` when an average is kept;
- ``state.json``: the step, the learning-rate schedule, the config, the
  world size. It is written last: a folder without it is not a checkpoint.

The folder is written under a temporary name beside it and swapped into
place (:func:`melfusion.files.replace_folder`), so a run killed while writing
leaves the previous checkpoint as the latest one, and the next save removes
the half-written folder. Tensors holding NaN or infinities are never written.
Nothing here unpickles: optimizer state is split into tensors
(safetensors) and plain values (JSON).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checks import NonFiniteError, check_finite_tensors
from ..files import clean_leftovers, pid_alive, replace_folder

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "clean_checkpoint_leftovers", "optimizer_state_to_files", "optimizer_state_from_files",
           "read_optimizer_files",
           "CHECKPOINT_PATTERN"]

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
STATE_NAME = "state.json"
_LEFTOVER = re.compile(r"^\.(step-\d{8})\.melfusion-tmp-\d+-[0-9a-f]+$")  # files.replace_folder's temporary names
_LEGACY = re.compile(r"^\.(tmp|old)-step-(\d{8})-(\d+)$")  # those of melfusion 0.x


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder`` (those with a ``state.json``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _owned(entry: Path) -> bool:
    """Whether ``entry`` of an existing checkpoint folder is one a checkpoint holds (replaced with it)."""
    return entry.is_file() and (entry.name == STATE_NAME or entry.suffix == ".safetensors")


def clean_checkpoint_leftovers(folder: str | Path) -> None:
    """Remove what killed checkpoint writes left in ``folder`` (only of writers that are gone).

    Also the names older versions used: ``.tmp-step-*`` (a half-written folder) and ``.old-step-*`` (the
    previous checkpoint of a replaced step, put back if the replacement never arrived).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _LEFTOVER.match(p.name)
        if m:
            clean_leftovers(folder / m.group(1))
            continue
        m = _LEGACY.match(p.name)
        if not m or not p.is_dir() or pid_alive(int(m.group(3))):
            continue
        final = folder / f"step-{m.group(2)}"
        if m.group(1) == "old" and not final.exists() and (p / STATE_NAME).is_file():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write ``tensors`` (file stem -> state dict) and ``state`` as ``folder/step-XXXXXXXX``; prune to ``keep_last``.

    Refused before anything is written: a tensor holding NaN or infinities (:class:`NonFiniteError`), and
    an existing ``step-XXXXXXXX`` holding files a checkpoint does not (``ValueError``). The folder is
    written beside its target and swapped in (:func:`melfusion.files.replace_folder`): at every instant
    the step's folder is a complete old or new checkpoint, and leftovers of killed writes are removed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: expected a positive int or None, got {keep_last!r}")
    for stem, sd in tensors.items():
        check_finite_tensors(sd, f"checkpoint step {step}: {stem}")
    try:
        text = json.dumps(state, indent=2, allow_nan=False)
    except ValueError:
        raise NonFiniteError(f"checkpoint step {step}: the state holds NaN or infinite values; not saved") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    with replace_folder(final, "checkpoint", owned=_owned) as tmp:
        for stem, sd in tensors.items():
            file = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(file))
            _fsync(file)
        state_file = tmp / STATE_NAME
        state_file.write_text(text, encoding="utf-8")
        _fsync(state_file)
    _fsync(folder)
    if keep_last is not None:
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    clean_checkpoint_leftovers(folder)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``(tensors by file stem, state)`` of a checkpoint folder, or one ``OSError`` line naming the file.

    Refused: a folder without ``state.json``, a ``state.json`` that is not a JSON object, an unreadable
    (truncated, corrupt) safetensors file, and tensors holding NaN or infinities (:class:`NonFiniteError`).
    """
    path = Path(path)
    if not path.is_dir():
        raise OSError(f"resume: no checkpoint folder {str(path)!r}")
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise OSError(f"resume: {str(path)!r} is not a complete checkpoint (no {STATE_NAME})")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OSError(f"resume: {str(state_file)!r} is not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(state, dict):
        raise OSError(f"resume: {str(state_file)!r} holds a {type(state).__name__}, not a checkpoint state")
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            tensors[file.stem] = load_file(str(file))
        except Exception as exc:  # truncated or corrupt
            raise OSError(f"resume: cannot read {str(file)!r} ({' '.join(str(exc).split())})") from None
        check_finite_tensors(tensors[file.stem], f"resume: {str(file)!r}")
    return tensors, state


def optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<name>``) and JSON-able values."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain}


def read_optimizer_files(group_shapes: list[list[tuple[int, ...]]], tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Check and parse what :func:`optimizer_state_to_files` wrote, for an optimizer whose parameter groups hold
    parameters of ``group_shapes``: ``(state by parameter index, param_groups)``, as ``state_dict()`` gives them.

    A ``ValueError`` names what does not fit. Used without an optimizer when the state goes elsewhere than
    ``load_state_dict`` (DeepSpeed ZeRO's partitions, :mod:`melfusion.training.zero`).
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in meta["param_groups"]):
        raise ValueError("resume: the checkpoint's optimizer state has no valid param_groups (corrupt checkpoint?)")
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    if [len(shapes) for shapes in group_shapes] != [len(g["params"]) for g in groups]:
        raise ValueError("resume: the checkpoint's optimizer has different parameter groups than this run "
                         "(was it written with another mode or model?)")
    ids = [i for g in groups for i in g["params"]]
    if sorted(ids) != list(range(len(ids))):
        raise ValueError("resume: the checkpoint's optimizer param_groups do not index this run's parameters")
    shape_of = {index: tuple(shape) for index, shape in zip(ids, (s for shapes in group_shapes for s in shapes),
                                                                strict=True)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in shape_of:
            raise ValueError(f"resume: unexpected optimizer tensor {key!r} in the checkpoint")
        index, name = int(parts[1]), parts[2]
        if value.ndim > 0 and tuple(value.shape) != shape_of[index]:
            raise ValueError(f"resume: optimizer tensor {key!r} has shape {tuple(value.shape)}, its parameter "
                             f"{shape_of[index]} (written by another model?)")
        state.setdefault(index, {})[name] = value
    plain_state = meta.get("plain_state", {})
    if not isinstance(plain_state, dict):
        raise ValueError("resume: the checkpoint's optimizer plain_state is not a mapping (corrupt checkpoint?)")
    for index, entry in plain_state.items():
        if not str(index).isdigit() or int(index) not in shape_of or not isinstance(entry, dict):
            raise ValueError(f"resume: unexpected optimizer state entry {index!r} in the checkpoint")
        state.setdefault(int(index), {}).update(entry)
    return state, groups


def optimizer_state_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                               meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_to_files`; a ``ValueError`` naming what does not fit ``optimizer``."""
    shapes = [[tuple(p.shape) for p in g["params"]] for g in optimizer.param_groups]
    state, groups = read_optimizer_files(shapes, tensors, meta)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"resume: the checkpoint's optimizer state does not load ({' '.join(str(exc).split())})") \
            from None
