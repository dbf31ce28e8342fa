"""Building diffusers/transformers models from a spec: a shipped config, an inline config or pretrained weights.

A spec is a mapping with any of:

- ``config``: the name of a config shipped in ``melfusion.presets`` (``"sd21_unet"``),
  the word ``"tiny"`` where a part defines a tiny test size, or an inline dict;
- ``pretrained``: a hub id or a local folder written by ``save_pretrained``;
- ``subfolder``: the folder inside ``pretrained`` (``"unet"``, ``"vae"``, ...).

With ``weights=False`` (or on the meta device) only the architecture is built,
from ``config``, so the full-size paper models can be checked without memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..presets import load_json

__all__ = ["resolve_config", "build_model"]

_SPEC_KEYS = {"config", "pretrained", "subfolder", "revision"}


def _check_spec(spec: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    spec = dict(spec or {})
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}; a model spec takes {sorted(_SPEC_KEYS)}")
    if not spec.get("config") and not spec.get("pretrained"):
        raise ValueError(f"{what}: give a 'config' (shipped name or dict) or a 'pretrained' hub id / folder")
    return spec


def resolve_config(config: str | Mapping[str, Any], tiny: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config dict from a shipped name, ``"tiny"`` (with the part's tiny config) or an inline dict."""
    if isinstance(config, Mapping):
        return {k: v for k, v in config.items() if not k.startswith("_")}
    if config == "tiny":
        if tiny is None:
            raise ValueError("config: this part has no 'tiny' config")
        return dict(tiny)
    return {k: v for k, v in load_json(config).items() if not k.startswith("_")}


def build_model(
    cls: Any,
    spec: Mapping[str, Any] | None,
    what: str,
    *,
    weights: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tiny: Mapping[str, Any] | None = None,
) -> Any:
    """Build ``cls`` (a diffusers ``ModelMixin`` or transformers ``PreTrainedModel``) from ``spec``."""
    spec = _check_spec(spec, what)
    meta = device is not None and torch.device(device).type == "meta"
    if spec.get("pretrained") and weights and not meta:
        kwargs = {k: spec[k] for k in ("subfolder", "revision") if spec.get(k)}
        try:
            model = cls.from_pretrained(spec["pretrained"], **kwargs)
        except (OSError, ValueError) as exc:
            where = spec["pretrained"] + (f"/{spec['subfolder']}" if spec.get("subfolder") else "")
            raise OSError(
                f"{what}: could not load pretrained weights from {where!r} ({type(exc).__name__}: {exc}). "
                "Give a local folder written by save_pretrained, or allow hub downloads."
            ) from exc
    else:
        if not spec.get("config"):
            raise ValueError(f"{what}: building without weights needs a 'config'")
        config = resolve_config(spec["config"], tiny)
        if meta:
            with torch.device("meta"):
                model = _from_config(cls, config)
        else:
            model = _from_config(cls, config)
    if dtype is not None or (device is not None and not meta):
        model = model.to(device=device if not meta else None, dtype=dtype)
    return model.eval()


def _from_config(cls: Any, config: dict[str, Any]) -> Any:
    if getattr(cls, "config_class", None) is not None:  # transformers: a config object, then the model
        return cls(cls.config_class(**config))
    return cls.from_config(config)  # diffusers
