"""LoRA adapters on the music denoiser's attention projections (through ``peft``), saved apart from their base.

Low-rank adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") add ``B A x`` (rank
``r``, scaled by ``alpha / r``, ``B`` zero at the start) to each targeted linear layer, so a fine-tune trains a
few million parameters instead of the 866 M of Tango's UNet, and its optimizer state fits a small GPU.

A model with adapters saves as a small folder: the adapters (``adapters.safetensors``), the synapse
(``synapse.safetensors``), the model config, and ``melfusion_lora.json``, which names the base model (a folder
written by ``save_pretrained``, a shipped model name, or none when every part loads from published weights).
The base is never written to; ``MelFusion.from_pretrained`` on the small folder loads the base, adds the
adapters and loads them and the synapse.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["LORA_INDEX", "ADAPTERS_NAME", "DEFAULT_TARGETS", "lora_settings", "add_lora", "lora_parameters", "lora_state", "load_lora_state",
           "check_lora_base", "save_lora_model", "load_lora_model", "read_lora_index", "is_lora_entry"]

LORA_INDEX = "melfusion_lora.json"
ADAPTERS_NAME = "adapters.safetensors"
#: diffusers' attention projections: query, key, value and output (self- and cross-attention alike)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft package: pip install 'melfusion[lora]' (or pip install peft)") from None
    return peft


def lora_settings(rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                  target_modules: Sequence[str] = DEFAULT_TARGETS) -> dict[str, Any]:
    """The adapters' settings, checked and in the form ``model.lora`` and ``melfusion_lora.json`` keep them
    (``alpha`` defaults to the rank)."""
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    targets = [str(t) for t in target_modules]
    if not targets:
        raise ValueError("target_modules: expected at least one module name, e.g. ['to_q', 'to_k']")
    return {"rank": rank, "alpha": float(alpha if alpha is not None else rank), "dropout": float(dropout),
            "target_modules": targets}


def add_lora(model: Any, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             target_modules: Sequence[str] = DEFAULT_TARGETS) -> dict[str, Any]:
    """Add LoRA adapters to every trainable module of ``model.denoiser`` (``MusicDenoiser.trainable_modules``);
    only the adapters require gradients afterwards. Returns the settings, which ``model.lora`` keeps."""
    peft = _peft()
    if getattr(model, "lora", None):
        raise ValueError("model: it has LoRA adapters already")
    settings = lora_settings(rank, alpha, dropout, target_modules)
    targets = settings["target_modules"]
    for name, module in model.denoiser.trainable_modules().items():
        config = peft.LoraConfig(r=rank, lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                                 target_modules=targets, init_lora_weights=True)
        try:
            peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as exc:  # peft: no module matched the targets
            raise ValueError(f"target_modules: {targets} match no layer of the denoiser's {name} ({exc})") from None
        for param_name, param in module.named_parameters():
            param.requires_grad_("lora_" in param_name)
    model.lora = settings
    return settings


def lora_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The adapters' parameters (empty without adapters)."""
    return [p for module in model.denoiser.trainable_modules().values()
            for name, p in module.named_parameters() if "lora_" in name]


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapters' tensors, keyed ``<denoiser module>.<peft name>`` (e.g. ``unet.down_blocks.1...lora_A.weight``)."""
    peft = _peft()
    out = {}
    for name, module in model.denoiser.trainable_modules().items():
        for key, value in peft.get_peft_model_state_dict(module, adapter_name=ADAPTER).items():
            out[f"{name}.{key}"] = value
    return out


def load_lora_state(model: Any, state: dict[str, torch.Tensor], where: str) -> None:
    """Load adapter tensors written by :func:`lora_state` into ``model``'s adapters, strictly."""
    expected = lora_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [k for k in sorted(set(expected) & set(state)) if expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise OSError(f"model: the adapters in {where!r} do not fit the base model (missing {missing[:3]}, "
                      f"unexpected {unexpected[:3]}, other shapes {mismatched[:3]})")
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)  # get_peft_model_state_dict returns the adapters' own tensors


def check_lora_base(model: Any, what: str = "model") -> str | None:
    """The base a LoRA save of ``model`` will name (``model.name_or_path``), or None when every weight it needs
    comes from published checkpoints; a ``ValueError`` when the base could not be loaded again (random weights)."""
    from .persistence import frozen_to_store

    base = getattr(model, "name_or_path", None)
    if base is not None:
        return base
    denoiser_published = set(model.denoiser.trainable_modules()) <= model.denoiser.published_modules()
    if model.built_with_weights and denoiser_published and not frozen_to_store(model):
        return None
    raise ValueError(f"{what}: LoRA adapters are saved apart from the model they adapt, and this model's weights "
                     "are random, so they could not be loaded again: save the model first (save_pretrained) and "
                     "load it (from_pretrained, or init_from in training), or start from published weights")


def save_lora_model(model: Any, path: str | Path) -> Path:
    """Write the adapters, the synapse, the config and the index naming the base to folder ``path``."""
    from safetensors.torch import save_file
    from safetensors.torch import save_model as save_module

    from .checks import check_finite_tensors
    from .files import replace_folder
    from .persistence import CONFIG_NAME, owned_entry

    base = check_lora_base(model, "path")
    if base is not None and os.path.isdir(base):
        base = str(Path(base).resolve())
        target = Path(path).resolve()
        if target == Path(base) or Path(base) in target.parents:
            raise ValueError(f"path: {str(path)!r} is (or is inside) the base model {base!r} these adapters adapt; "
                             "the base is never written to: save the adapters to another folder")
    state = {k: v.detach().contiguous() for k, v in lora_state(model).items()}
    check_finite_tensors(state, "model: the LoRA adapters")
    if model.synapse is not None:
        check_finite_tensors(model.synapse.state_dict(), "model: the synapse")
    path = Path(path)
    with replace_folder(path, "path", owned=owned_entry) as tmp:
        model.config.save(tmp / CONFIG_NAME)
        save_file(state, str(tmp / ADAPTERS_NAME))
        if model.synapse is not None:
            save_module(model.synapse, str(tmp / "synapse.safetensors"))
        index = {"format": "melfusion-lora", "version": 1, "base": base,
                 "revision": getattr(model, "revision", None), "lora": model.lora,
                 "adapters": ADAPTERS_NAME, "synapse": "synapse.safetensors" if model.synapse is not None else None}
        (tmp / LORA_INDEX).write_text(json.dumps(index, indent=2))
    return path


def read_lora_index(folder: Path) -> dict[str, Any] | None:
    """The LoRA index of ``folder``, checked; None when there is none."""
    file = Path(folder) / LORA_INDEX
    if not file.is_file():
        return None
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OSError(f"model: {str(file)!r} is not valid JSON ({exc})") from None
    ok = (isinstance(index, dict) and index.get("format") == "melfusion-lora"
          and isinstance(index.get("base"), (str, type(None))) and isinstance(index.get("revision"), (str, type(None)))
          and _valid_settings(index.get("lora"))
          and index.get("adapters") == ADAPTERS_NAME and index.get("synapse") in ("synapse.safetensors", None))
    if not ok:
        raise OSError(f"model: {str(file)!r} is not an index save_pretrained writes for a LoRA model")
    return index


def _valid_settings(lora: Any) -> bool:
    """``lora`` is exactly the settings :func:`add_lora` returns, with sensible types and values."""
    if not isinstance(lora, dict) or set(lora) != {"rank", "alpha", "dropout", "target_modules"}:
        return False
    number = (int, float)
    targets = lora["target_modules"]
    return (type(lora["rank"]) is int and lora["rank"] > 0
            and isinstance(lora["alpha"], number) and not isinstance(lora["alpha"], bool)
            and math.isfinite(lora["alpha"]) and lora["alpha"] > 0
            and isinstance(lora["dropout"], number) and not isinstance(lora["dropout"], bool)
            and 0 <= lora["dropout"] < 1
            and isinstance(targets, list) and len(targets) > 0 and all(isinstance(t, str) and t for t in targets))


def is_lora_entry(entry: Path) -> bool:
    """Whether ``entry`` is one of the files a LoRA save wrote into its folder (so a new save may replace it)."""
    from .persistence import CONFIG_NAME

    try:
        index = read_lora_index(entry.parent)
    except OSError:
        return False
    if index is None or entry.is_symlink() or not entry.is_file():
        return False
    return entry.name in (CONFIG_NAME, LORA_INDEX, ADAPTERS_NAME, index.get("synapse"))


def load_lora_model(cls: Any, folder: Path, index: dict[str, Any], *, device: Any = None,
                    dtype: torch.dtype | None = None) -> Any:
    """The base model named by ``index``, with the folder's adapters and synapse loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checks import check_finite_tensors
    from .config import MelFusionConfig
    from .persistence import CONFIG_NAME, load_safetensors_into

    config = MelFusionConfig.load(folder / CONFIG_NAME, name="model config")
    base = index["base"]
    if base is not None and os.path.isdir(base):
        if Path(base).resolve() == Path(folder).resolve():
            raise OSError(f"model: {str(folder)!r} names itself as the base of its adapters")
        if (Path(base) / LORA_INDEX).is_file():
            raise OSError(f"model: the base {base!r} of the adapters in {str(folder)!r} is itself a LoRA model; "
                          "adapters on adapters are not supported")
    if base is None:
        model = cls.from_config(config, device=device, dtype=dtype)
    else:
        try:
            model = cls.from_pretrained(base, device=device, dtype=dtype, revision=index.get("revision"))
        except OSError as exc:
            raise OSError(f"model: the LoRA adapters in {str(folder)!r} adapt the base model {base!r}, which "
                          f"could not be loaded ({exc})") from None
        if model.config.model_dump() != config.model_dump():
            raise OSError(f"model: the base model {base!r} has another config than the one the adapters in "
                          f"{str(folder)!r} were trained on")
    add_lora(model, **index["lora"])
    try:
        state = load_file(str(folder / ADAPTERS_NAME))
    except (SafetensorError, OSError) as exc:
        raise OSError(f"model: cannot read {str(folder / ADAPTERS_NAME)!r} ({exc})") from None
    check_finite_tensors(state, f"model: the adapters in {str(folder)!r}", "refused to load")
    load_lora_state(model, state, str(folder))
    if index.get("synapse") and model.synapse is not None:
        load_safetensors_into(model.synapse, folder / index["synapse"], None)
    model.name_or_path = base
    model.revision = index.get("revision")
    model.lora_path = str(folder)
    return model
