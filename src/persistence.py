"""Saving and loading a MelFusion model: ``save_pretrained`` / ``from_pretrained`` and the folder they own.

A saved model is a folder: the config (``melfusion_config.json``), a weights index
(``melfusion_weights.json``), the denoiser's own sub-folder(s) (``MusicDenoiser.save_weights``: a diffusers
UNet or transformer folder, loadable by diffusers alone), the synapse (``synapse.safetensors``) and, for parts
not loaded from published weights, ``<part>.<module>.safetensors`` (``Part.stored_modules``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .backbones.loading import is_hub_id
from .config import MelFusionConfig

__all__ = ["save_model", "load_model", "read_index", "is_model_entry", "owned_entry", "load_safetensors_into",
           "SHIPPED_MODELS", "shipped_model_path", "PARTS", "CONFIG_NAME", "INDEX_NAME"]

PARTS = ("feature_source", "denoiser", "text_encoder", "codec", "vocoder")
CONFIG_NAME = "melfusion_config.json"
INDEX_NAME = "melfusion_weights.json"


def frozen_to_store(model: Any) -> dict[tuple[str, str], torch.nn.Module]:
    """The modules of the frozen parts that a save copies: those not loaded from published weights."""
    out = {}
    for part_name in PARTS:
        if part_name == "denoiser":
            continue
        part = getattr(model, part_name)
        published = part.published_modules() if model.built_with_weights else set()
        for attr, module in part.stored_modules().items():
            referenced = model.built_with_weights and config_reference(model.config, part_name, attr)
            if attr in published or referenced or not module.state_dict():
                continue
            out[(part_name, attr)] = module
    return out


def config_reference(config: MelFusionConfig, part_name: str, attr: str) -> bool:
    """Whether the config names published weights (``pretrained``) for module ``attr`` of a part: its own model
    spec's, or the part's top-level ``pretrained``. Such a module is loaded from there, so a save need not copy it."""
    params = getattr(config, part_name).params
    spec = params.get(attr)
    if isinstance(spec, dict):
        return bool(spec.get("pretrained"))
    return bool(params.get("pretrained"))


def save_model(model: Any, path: str | Path) -> Path:
    """:meth:`MelFusion.save_pretrained` (see there)."""
    from safetensors.torch import save_model as save_module

    from .checks import check_finite_tensors
    from .files import replace_folder

    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"path: expected a folder path, got {path!r}")
    if getattr(model, "lora", None):  # adapters: a small folder naming the base, never a copy of it
        from .lora import save_lora_model

        return save_lora_model(model, path)
    path = Path(path)
    frozen = frozen_to_store(model)
    for name, module in model.denoiser.stored_modules().items():
        check_finite_tensors(module.state_dict(), f"model: the denoiser's {name}")
    for (part_name, attr), module in frozen.items():
        check_finite_tensors(module.state_dict(), f"model: {part_name}.{attr}")
    if model.synapse is not None:
        check_finite_tensors(model.synapse.state_dict(), "model: the synapse")
    with replace_folder(path, "path", owned=owned_entry) as tmp:
        model.config.save(tmp / CONFIG_NAME)
        main = model.denoiser.save_weights(tmp)
        folders = sorted(p.name for p in tmp.iterdir() if p.is_dir())
        stored: dict[str, list[str]] = {}
        for (part_name, attr), module in frozen.items():
            save_module(module, str(tmp / f"{part_name}.{attr}.safetensors"))
            stored.setdefault(part_name, []).append(attr)
        if model.synapse is not None:
            save_module(model.synapse, str(tmp / "synapse.safetensors"))
        index = {"format": "melfusion", "version": 1, "unet": main, "denoiser_folders": folders,
                 "stored_frozen_modules": stored,
                 "synapse": "synapse.safetensors" if model.synapse is not None else None}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return path


def load_model(cls: Any, path: str | Path, *, device: Any = None, dtype: torch.dtype | None = None,
               revision: str | None = None) -> Any:
    """:meth:`MelFusion.from_pretrained` (see there)."""
    from .checks import check_finite_tensors
    from .pipeline import check_device, check_dtype

    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"path: expected a model folder or a shipped model name, got {path!r}")
    device, dtype = check_device(device), check_dtype(dtype)
    folder = _resolve_model_folder(path, revision)
    index = read_index(folder)
    if index is None:
        from .lora import load_lora_model, read_lora_index

        lora_index = read_lora_index(folder)
        if lora_index is not None:
            return load_lora_model(cls, folder, lora_index, device=device, dtype=dtype)
        raise OSError(f"model: {str(folder)!r} has no {INDEX_NAME}; was it written by save_pretrained?")
    config = MelFusionConfig.load(folder / CONFIG_NAME, name="model config")
    stored = index.get("stored_frozen_modules", {})
    common = dict(device=device, dtype=dtype)
    parts = {}
    for part_name in PARTS:
        part_cfg = getattr(config, part_name)
        if part_name == "denoiser":
            denoiser = _loading(folder / index.get("unet", "unet"), part_cfg, dict(common, weights=False))
            denoiser.load_weights(folder)
            for name, module in denoiser.stored_modules().items():
                check_finite_tensors(module.state_dict(), f"model: the denoiser's {name} in {str(folder)!r}",
                                     "refused to load")
            parts[part_name] = denoiser
            continue
        saved = stored.get(part_name, [])
        part = part_cfg.build(weights=not saved, **common)
        modules = part.stored_modules()
        for attr in saved:
            module = modules.get(attr)
            file = folder / f"{part_name}.{attr}.safetensors"
            if module is None:
                raise OSError(f"model: {str(folder / INDEX_NAME)!r} lists {part_name}.{attr}, which the "
                              f"config's {part_name} does not have")
            if not file.is_file():
                raise OSError(f"model: missing weights file {str(file)!r}")
            load_safetensors_into(module, file, device)
            if dtype is not None:
                module.to(dtype=dtype)
        parts[part_name] = part
    synapse = None
    if config.synapse.enabled:
        try:
            synapse = cls.build_synapse(config, parts["feature_source"], parts["denoiser"], parts["codec"])
        except ValueError as exc:
            raise OSError(f"model: the parts saved in {str(folder)!r} do not fit together ({exc})") from None
        file = folder / (index.get("synapse") or "synapse.safetensors")
        if not file.is_file():
            raise OSError(f"model: missing weights file {str(file)!r}")
        load_safetensors_into(synapse, file, None)
        if device is not None:  # as from_config: the synapse stays float32, on the model's device
            synapse = synapse.to(device)
    model = cls(config, **parts, synapse=synapse)
    model.name_or_path = str(folder.resolve()) if Path(path).is_dir() else str(path)
    model.revision = revision  # a hub revision, kept so adapters saved on this model name it too
    return model


#: models that ship inside the package, by name: ``MelFusion.from_pretrained("mini")``
SHIPPED_MODELS = {"mini": "weights/mini"}


def shipped_model_path(name: str = "mini") -> Path:
    """The folder of a model that ships inside the package (see :data:`SHIPPED_MODELS`)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"name: unknown shipped model {name!r}; shipped: {', '.join(sorted(SHIPPED_MODELS))}")
    folder = Path(__file__).resolve().parent / SHIPPED_MODELS[name]
    if not (folder / INDEX_NAME).is_file():
        raise OSError(f"model: the shipped {name!r} weights are missing from this install ({str(folder)!r}); "
                      f"train them with `python scripts/train_mini.py --install`")
    return folder


def _resolve_model_folder(path: str | Path, revision: str | None) -> Path:
    folder = Path(path)
    if folder.is_symlink() and not folder.exists():
        raise OSError(f"model: {str(path)!r} is a broken or looping symbolic link")
    if not folder.exists():
        from .files import clean_leftovers

        clean_leftovers(folder)  # a save killed mid-swap where no atomic exchange exists: put the model back
    if folder.is_dir():
        return folder
    if str(path) in SHIPPED_MODELS and not folder.exists():
        return shipped_model_path(str(path))
    shipped = f"shipped models: {', '.join(sorted(SHIPPED_MODELS))}"
    if folder.exists():
        raise OSError(f"model: {str(path)!r} is a file, not a folder written by save_pretrained ({shipped})")
    if not is_hub_id(str(path)) or _looks_local(str(path)):
        raise OSError(f"model: no such folder {str(path)!r} ({shipped})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), revision=revision))
    except Exception as exc:  # offline, unknown repo, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"model: no such folder {str(path)!r}, and it could not be fetched as a hub id "
                      f"({first}); {shipped}") from None


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def read_index(folder: Path) -> dict[str, Any] | None:
    """The weights index of a folder written by save_pretrained, checked field by field; None if there is none.

    An ``OSError`` naming the file when it is not one save_pretrained writes (wrong types, paths that leave
    the folder).
    """
    import json

    path = folder / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise OSError(f"model: {str(path)!r} is not valid JSON ({exc})") from None
    bad = f"model: {str(path)!r} is not a melfusion weights index"
    if not isinstance(index, dict) or index.get("format", "melfusion") != "melfusion":
        raise OSError(bad)
    stored = index.get("stored_frozen_modules", {})
    if not isinstance(stored, dict) or not all(
            k in PARTS and isinstance(v, list) and all(_plain_name(a) for a in v) for k, v in stored.items()):
        raise OSError(f"{bad} (stored_frozen_modules: expected part names mapped to lists of module names)")
    for key in ("unet", "synapse"):
        value = index.get(key, "unet" if key == "unet" else None)
        if value is not None and not _plain_name(value):
            raise OSError(f"{bad} ({key}: expected a file name inside the folder, got {value!r})")
    folders = index.get("denoiser_folders", [index.get("unet", "unet")])
    if not isinstance(folders, list) or not all(_plain_name(f) for f in folders):
        raise OSError(f"{bad} (denoiser_folders: expected a list of folder names inside the folder)")
    return index


def _plain_name(value: Any) -> bool:
    """A file or folder name inside the model folder (no path separators, no ``..``)."""
    return isinstance(value, str) and bool(value) and "/" not in value and "\\" not in value \
        and value not in (".", "..")


def owned_entry(entry: Path) -> bool:
    """Whether a save may replace ``entry``: written by save_pretrained, for a whole model or for adapters."""
    from .lora import is_lora_entry

    return is_model_entry(entry) or is_lora_entry(entry)


def is_model_entry(entry: Path) -> bool:
    """Whether ``entry`` (a path inside a folder) was written by save_pretrained, so a new save may replace it.

    Only a folder holding a valid weights index owns anything: its config and index, the UNet folder and
    weight files the index names (a folder of diffusers' config and safetensors only), the synapse file.
    A file of any other name, or any file in a folder without an index, is the user's.
    """
    try:
        index = read_index(entry.parent)
    except OSError:
        return False
    if index is None or entry.is_symlink():
        return False
    if entry.name in (CONFIG_NAME, INDEX_NAME):
        return entry.is_file()
    if entry.name == index.get("synapse") and entry.is_file():
        return True
    stored = index.get("stored_frozen_modules", {})
    if entry.is_file() and any(entry.name == f"{part}.{attr}.safetensors"
                               for part, attrs in stored.items() for attr in attrs):
        return True
    folders = index.get("denoiser_folders", [index.get("unet", "unet")])
    if entry.name in folders and entry.is_dir():  # diffusers' save_pretrained, safetensors only
        return all(f.is_file() and not f.is_symlink() and (
            f.name == "config.json" or re.fullmatch(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors"
                                                     r"(\.index\.json)?", f.name) is not None)
            for f in entry.iterdir())
    return False


def safetensors_device(device: Any) -> str:
    """``device`` as safetensors names it: an indexed CPU (``cpu:0``, what accelerate gives CPU processes) is
    plain ``cpu``, which safetensors requires."""
    device = torch.device(device or "cpu")
    return "cpu" if device.type == "cpu" else str(device)


def load_safetensors_into(module: torch.nn.Module, file: Path, device: Any) -> None:
    """``safetensors.load_model`` with every failure as one ``OSError`` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not file.is_file():
        raise OSError(f"model: missing weights file {str(file)!r}")
    try:
        load_model(module, str(file), device=safetensors_device(device))
    except (SafetensorError, RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"model: cannot load {str(file)!r}: it is corrupt or does not fit the model its config "
                      f"describes ({first[:200]})") from None
    from .checks import check_finite_tensors

    check_finite_tensors(module.state_dict(), f"model: {str(file)!r}", "refused to load")


def _loading(where: Path, part_cfg: Any, common: dict[str, Any]) -> Any:
    """Build a part from saved weights; a corrupt or mismatched weights file is one ``OSError`` naming ``where``."""
    from safetensors import SafetensorError

    try:
        return part_cfg.build(**{"weights": True, **common})
    except (SafetensorError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"model: cannot load {str(where)!r}: it is corrupt or does not fit the model its config "
                      f"describes ({first[:200]})") from None


