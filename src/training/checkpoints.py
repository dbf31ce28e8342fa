"""Training checkpoints: safetensors and JSON only, written atomically, the last K kept.

A checkpoint is a folder ``checkpoints/step-00000042/`` holding

- ``trainable.safetensors``: every trained parameter (music UNet, synapse);
- ``optimizer.safetensors`` + the JSON part of the optimizer state (steps,
  hyper-parameters) in ``state.json``;
- ``ema.safetensors`` when an average is kept;
- ``state.json``: the step, the learning-rate schedule, the config, the
  world size. It is written last: a folder without it is not a checkpoint.

The folder is written under a temporary name and renamed into place, so a
run killed while writing leaves the previous checkpoint as the latest one.
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

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "optimizer_state_to_files", "optimizer_state_from_files", "CHECKPOINT_PATTERN"]

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
STATE_NAME = "state.json"


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


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write ``tensors`` (file stem -> state dict) and ``state`` as ``folder/step-XXXXXXXX``; prune to ``keep_last``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for stem, sd in tensors.items():
            file = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(file))
            _fsync(file)
        state_file = tmp / STATE_NAME
        state_file.write_text(json.dumps(state, indent=2))
        _fsync(state_file)
        if final.exists():  # a checkpoint of the same step (a repeated run): replace it
            old = folder / f".old-step-{step:08d}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    # leftovers of runs killed while writing
    for p in folder.glob(".tmp-step-*"):
        if p != tmp:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``(tensors by file stem, state)`` of a checkpoint folder, or a clear error naming it."""
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise OSError(f"resume: {str(path)!r} is not a complete checkpoint (no {STATE_NAME})")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise OSError(f"resume: {str(state_file)!r} is not valid JSON ({exc})") from None
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            tensors[file.stem] = load_file(str(file))
        except Exception as exc:  # truncated or corrupt
            raise OSError(f"resume: cannot read {str(file)!r} ({exc})") from None
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


def optimizer_state_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                               meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_to_files`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta.get("plain_state", {}).items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in current] != [len(g["params"]) for g in groups]:
        raise ValueError("resume: the checkpoint's optimizer has different parameter groups than this run "
                         "(was it written with another mode or model?)")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
