"""What an audio embedder is, and the loading helpers the concrete ones share.

An audio embedder has a ``name``, the ``sample_rate`` it expects, the names
of its ``outputs`` (``("embedding",)``, or ``("embedding", "logits")`` for
PANNs), ``embed_outputs(waveform) -> {output: (frames, dim) array}`` on a
mono float32 waveform at ``sample_rate``, and ``identity()``: a string that
changes whenever the numbers it would produce change (its class, settings
and a sha256 of its weights), used as the embedding-cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ...checks import NonFiniteError, non_finite_names

__all__ = ["Embedder", "AudioEmbedder", "state_dict_sha256", "read_checkpoint", "resolve_weights_file",
           "check_waveform"]

_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@runtime_checkable
class Embedder(Protocol):
    """The protocol every audio embedder follows (see the module docstring)."""

    name: str
    sample_rate: int
    outputs: tuple[str, ...]

    def embed_outputs(self, waveform: np.ndarray) -> dict[str, np.ndarray]: ...

    def embed(self, waveform: np.ndarray) -> np.ndarray: ...

    def identity(self) -> str: ...


def state_dict_sha256(module: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in sorted name order."""
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_waveform(waveform: Any, name: str = "waveform") -> np.ndarray:
    """A 1-D finite float32 array, or a ``ValueError`` naming ``name``."""
    arr = np.asarray(waveform, dtype=np.float32)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty mono (samples,) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite samples")
    return arr


class AudioEmbedder:
    """Shared behaviour: ``embed`` returns the first output; ``identity`` hashes the weights once."""

    name = "audio"
    sample_rate = 16_000
    outputs: tuple[str, ...] = ("embedding",)
    source: str | None = None

    def settings(self) -> dict[str, Any]:
        """Everything besides the weights that changes the numbers (part of the identity)."""
        return {}

    def weights_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def identity(self) -> str:
        cached = getattr(self, "_identity", None)
        if cached is None:
            settings = json.dumps(self.settings(), sort_keys=True, default=str)
            cached = f"{self.name}:{type(self).__name__}:{settings}:{state_dict_sha256(self.weights_module())}"
            self._identity = cached
        return cached

    def embed_outputs(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def embed(self, waveform: np.ndarray) -> np.ndarray:
        return self.embed_outputs(waveform)[self.outputs[0]]

    @property
    def device(self) -> torch.device:
        return next(self.weights_module().parameters()).device


def read_checkpoint(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``torch.save`` file read with ``weights_only=True``.

    A checkpoint wrapping its state dict under ``"model"`` (PANNs) or
    ``"state_dict"`` is unwrapped; non-tensor entries are dropped.
    """
    from ...backbones.loading import read_checkpoint as read_state

    path = Path(path)
    if not path.is_file():
        raise OSError(f"{what}: no such weights file {str(path)!r}")
    state = read_state(path, what)
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{what}: no tensors in {str(path)!r}")
    bad = non_finite_names(tensors)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"{what}: {len(bad)} tensor(s) in {str(path)!r} hold NaN or infinite values ({shown}); "
                             "every embedding would be NaN")
    return tensors


def resolve_weights_file(source: str | os.PathLike, candidates: tuple[str, ...], what: str) -> Path:
    """A local weights file from a file path, a folder holding one of ``candidates``, or a hub repo id.

    A hub id may name the file after a colon (``owner/repo:file.pth``);
    otherwise the first of ``candidates`` found in the repo is used.
    Failures are an ``OSError`` naming ``source``.
    """
    src = str(source)
    path = Path(src).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                return path / name
        raise OSError(f"{what}: none of {list(candidates)} in the folder {src!r}; give the weights file itself")
    repo, _, filename = src.partition(":")
    looks_like_file = repo.lower().endswith((".pth", ".pt", ".bin", ".ckpt", ".safetensors"))
    if not _HUB_REPO.match(repo) or ".." in repo or looks_like_file:
        raise OSError(f"{what}: no such file or folder {src!r} (and it is not a hub id 'owner/repo[:file]')")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in (filename,) if filename else candidates:
        try:
            return Path(hf_hub_download(repo, name))
        except Exception as exc:  # offline, missing file, missing repo: all end in the same message
            errors.append(f"{name}: {type(exc).__name__}")
    raise OSError(f"{what}: could not fetch weights from the hub repo {repo!r} ({'; '.join(errors)}). "
                  "Give a local weights file, or allow hub downloads (HF_HUB_OFFLINE unset).")
