"""Building diffusers/transformers models from a spec: a shipped config, an inline config or pretrained weights.

A spec is a mapping with any of:

- ``config``: the name of a config shipped in ``melfusion.presets`` (``"sd21_unet"``),
  the word ``"tiny"`` where a part defines a tiny test size, or an inline dict;
- ``pretrained``: a hub id or a local folder written by ``save_pretrained``;
- ``subfolder``: the folder inside ``pretrained`` (``"unet"``, ``"vae"``, ...).

With ``weights=False`` (or on the meta device) only the architecture is built,
from ``config`` (or, without one, from the config stored with ``pretrained``),
so the full-size paper models can be checked without memory.

Tango's released checkpoints (``declare-lab/tango*``) are not diffusers
folders: :func:`load_tango_unet` reads the UNet out of their
``pytorch_model_main.bin`` (a state dict of Tango's whole model, UNet keys
prefixed ``unet.``), and :func:`load_audioldm_vae` / :func:`load_audioldm_vocoder`
read the VAE and HiFi-GAN Tango was trained with out of ``pytorch_model_vae.bin``
(AudioLDM's original key names), always with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..presets import load_json

__all__ = ["resolve_config", "build_model", "check_source", "fetch_file", "load_state_dict_file", "load_weights",
           "load_tango_unet", "load_audioldm_vae", "load_audioldm_vocoder", "load_tango_or_pretrained", "tango_file",
           "convert_tango_vae", "convert_tango_vocoder",
           "TANGO_WEIGHTS", "TANGO_VAE_WEIGHTS"]

TANGO_WEIGHTS = "pytorch_model_main.bin"  # Tango's whole AudioDiffusion module; the UNet's keys start with "unet."
#: Tango's VAE: AudioLDM audioldm-s-full's first stage in LDM key names, its HiFi-GAN under "vocoder."
TANGO_VAE_WEIGHTS = "pytorch_model_vae.bin"

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
        check_source(spec["pretrained"], what)
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
        if spec.get("config"):
            config = resolve_config(spec["config"], tiny)
            if isinstance(spec["config"], Mapping):
                _check_inline_keys(cls, config, what)
        elif spec.get("pretrained") and _is_local(spec["pretrained"]):
            config = _stored_config(cls, spec, what)  # a local folder's own config.json: no download
        else:
            raise ValueError(
                f"{what}: building without weights needs a 'config' (a shipped name or a dict); "
                f"{spec.get('pretrained')!r} is not a local folder to read one from"
            )
        if meta:
            with torch.device("meta"):
                model = _from_config(cls, config)
        else:
            model = _from_config(cls, config)
    if dtype is not None or (device is not None and not meta):
        # nn.Module.to: diffusers' override warns about float32 modules even when no dtype is given
        model = torch.nn.Module.to(model, device=device if not meta else None, dtype=dtype)
    return model.eval()


def _check_inline_keys(cls: Any, config: Mapping[str, Any], what: str) -> None:
    """A config written inline in a melfusion config names only parameters of the diffusers class it builds
    (diffusers would drop an unknown key with a warning, so a typo would silently build another model)."""
    import inspect

    if getattr(cls, "config_class", None) is not None:  # transformers configs take extra attributes by design
        return
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(config) - set(params) - {"self"})
    if unknown:
        raise ValueError(f"{what}.config: {unknown} are not parameters of {cls.__name__}")


def _from_config(cls: Any, config: dict[str, Any]) -> Any:
    if getattr(cls, "config_class", None) is not None:  # transformers: a config object, then the model
        return cls(cls.config_class(**config))
    return cls.from_config(config)  # diffusers


def _is_local(name: str | os.PathLike) -> bool:
    return os.path.exists(name)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str) -> bool:
    """``owner/name`` (or ``name``) that is not an existing local path."""
    return not _is_local(name) and ".." not in name and bool(_HUB_ID.match(name))


_is_hub_id = is_hub_id


def check_source(pretrained: str | os.PathLike, what: str) -> None:
    """An ``OSError`` naming ``pretrained`` when it is neither an existing local path nor shaped like a hub id."""
    if not _is_local(pretrained) and not _is_hub_id(str(pretrained)):
        raise OSError(f"{what}: no such folder {str(pretrained)!r} (and it is not a hub id)")


def _stored_config(cls: Any, spec: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The ``config.json`` that ``save_pretrained`` wrote into a local folder (or its ``subfolder``)."""
    import json

    folder = Path(spec["pretrained"], spec.get("subfolder") or "")
    file = folder / "config.json"
    if not file.is_file():
        raise OSError(f"{what}: no config.json in {str(folder)!r} to build {cls.__name__} from; give a 'config'")
    return resolve_config(json.loads(file.read_text()))


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def fetch_file(
    pretrained: str | os.PathLike,
    filename: str,
    what: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
) -> Path:
    """The local path of ``filename`` in a local folder, or in a hub repo (downloaded or from the cache).

    Failures are an ``OSError`` naming the folder or repo and the file; a
    hub failure keeps the ``huggingface_hub`` error as ``__cause__``.
    """
    src = str(pretrained)
    if os.path.isdir(src):
        path = Path(src, subfolder or "", filename)
        if not path.is_file():
            raise OSError(f"{what}: no {filename!r} in the folder {str(path.parent)!r}")
        return path
    if not _is_hub_id(src):
        raise OSError(f"{what}: {src!r} is neither a local folder nor a hub id")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(src, filename, subfolder=subfolder or None, revision=revision))
    except (OSError, ValueError) as exc:
        name = f"{subfolder}/{filename}" if subfolder else filename
        raise OSError(
            f"{what}: could not fetch {name!r} from the hub repo {src!r} ({type(exc).__name__}: {exc}). "
            "Give a local folder holding it, or allow hub downloads."
        ) from exc


def read_checkpoint(path: str | os.PathLike, what: str) -> Mapping[str, Any]:
    """The state dict in a checkpoint file, or an ``OSError``/``ValueError`` naming ``what`` and the file.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``, which
    refuses pickled objects other than tensors and plain containers. A
    training checkpoint wrapping its state dict under ``"model"`` (PANNs)
    or ``"state_dict"`` is unwrapped.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise OSError(
            f"{what}: refused to load {str(path)!r}: it pickles objects other than tensors and plain containers, "
            f"and checkpoints are only read with torch.load(weights_only=True) ({first})"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise OSError(f"{what}: could not read {str(path)!r} as a checkpoint ({type(exc).__name__}: {exc})") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"{what}: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_state_dict_file(path: str | os.PathLike, what: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (see :func:`read_checkpoint`), keys starting with ``prefix`` (stripped)."""
    state = read_checkpoint(path, what)
    out = {str(k)[len(prefix):]: v for k, v in state.items() if str(k).startswith(prefix)}
    if not out:
        raise ValueError(
            f"{what}: no keys starting with {prefix!r} in {str(path)!r} (its keys: {_few(sorted(map(str, state)))})"
        )
    bad = sorted(k for k, v in out.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{what}: non-tensor entries in {str(path)!r}: {_few(bad)}")
    return out


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str,
                 source: str = "the checkpoint") -> torch.nn.Module:
    """Load ``state`` into ``model`` after a strict check of names and shapes.

    A model on the meta device takes the tensors themselves (``assign=True``),
    so a full-size architecture is never initialised only to be overwritten.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_few(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches (checkpoint != model): {_few(mismatched)}")
        raise ValueError(
            f"{what}: the weights in {source} do not fit the configured architecture; "
            + "; ".join(problems) + ". Check the 'config'."
        )
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(dict(state), strict=True, assign=on_meta)
    return model


def load_tango_unet(
    spec: Mapping[str, Any] | None,
    what: str,
    *,
    weights: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """A ``UNet2DConditionModel`` from a diffusers folder / hub id, or from a Tango checkpoint.

    ``pretrained`` may be (a) a diffusers folder or hub id (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, optionally in ``subfolder``),
    (b) a Tango folder or hub id holding ``pytorch_model_main.bin``, or a path
    to such a file. Tango checkpoints carry no UNet config: the architecture
    comes from the spec's ``config`` (``"tango_unet"`` for the released
    models), and only the ``unet.``-prefixed tensors are loaded (strictly).
    """
    from diffusers import UNet2DConditionModel

    return load_tango_or_pretrained(UNet2DConditionModel, spec, what, TANGO_WEIGHTS, _unet_from_tango,
                                    weights=weights, device=device, dtype=dtype)


def load_audioldm_vae(
    spec: Mapping[str, Any] | None,
    what: str,
    *,
    weights: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """AudioLDM's ``AutoencoderKL`` from a diffusers folder / hub id, or from Tango's ``pytorch_model_vae.bin``.

    Tango's file is the first stage of AudioLDM's first ``audioldm-s-full`` release, in that code's (LDM) key
    names with its HiFi-GAN under ``vocoder.``; the VAE's keys are renamed to diffusers' by diffusers' own
    ``convert_ldm_vae_checkpoint`` and loaded strictly. The architecture and ``scaling_factor`` come from the
    spec's ``config`` (``"tango_vae"``: Tango's ``vae_config.json``, scale factor 0.9227914214134216).
    """
    from diffusers import AutoencoderKL

    return load_tango_or_pretrained(AutoencoderKL, spec, what, TANGO_VAE_WEIGHTS, _vae_from_tango,
                                    weights=weights, device=device, dtype=dtype)


def load_audioldm_vocoder(
    spec: Mapping[str, Any] | None,
    what: str,
    *,
    weights: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """AudioLDM's HiFi-GAN (``SpeechT5HifiGan``) from a diffusers-pipeline folder / hub id, or from the
    ``vocoder.`` tensors of Tango's ``pytorch_model_vae.bin`` (weight norm already folded in; ``ups.i`` is
    transformers' ``upsampler.i``; no input normalisation: ``mean`` 0, ``scale`` 1)."""
    from transformers import SpeechT5HifiGan

    return load_tango_or_pretrained(SpeechT5HifiGan, spec, what, TANGO_VAE_WEIGHTS, _vocoder_from_tango,
                                    weights=weights, device=device, dtype=dtype)


def _unet_from_tango(file: Path, config: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    return load_state_dict_file(file, what, prefix="unet.")


def _vae_from_tango(file: Path, config: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    return convert_tango_vae(load_state_dict_file(file, what), config, what)


def _vocoder_from_tango(file: Path, config: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    return convert_tango_vocoder(load_state_dict_file(file, what, prefix="vocoder."), config)


def convert_tango_vae(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                      what: str = "codec") -> dict[str, torch.Tensor]:
    """The VAE tensors of Tango's ``pytorch_model_vae.bin`` (original LDM names) in diffusers' ``AutoencoderKL``
    names, by diffusers' own ``convert_ldm_vae_checkpoint``; the ``vocoder.`` tensors are left out."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = {k: v for k, v in state.items() if not k.startswith("vocoder.")}
    if not any(k.startswith("encoder.") for k in vae):
        raise ValueError(f"{what}: the checkpoint holds no VAE tensors (no 'encoder.' keys)")
    return convert_ldm_vae_checkpoint(vae, dict(config))


def convert_tango_vocoder(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """AudioLDM's HiFi-GAN tensors (``vocoder.`` prefix optional) in transformers' ``SpeechT5HifiGan`` names: its
    ``ups.i`` is ``upsampler.i``, and it has no input normalisation (``mean`` 0, ``scale`` 1)."""
    prefixed = any(k.startswith("vocoder.") for k in state)  # the whole VAE file, or its vocoder alone
    out = {re.sub(r"^ups\.", "upsampler.", k.removeprefix("vocoder.")): v
           for k, v in state.items() if not prefixed or k.startswith("vocoder.")}
    n_mels = int(config.get("model_in_dim", 80))
    device = next(iter(out.values())).device if out else None
    out.setdefault("mean", torch.zeros(n_mels, device=device))
    out.setdefault("scale", torch.ones(n_mels, device=device))
    return out


def load_tango_or_pretrained(
    cls: Any,
    spec: Mapping[str, Any] | None,
    what: str,
    filename: str,
    convert: Any,
    *,
    weights: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """``cls`` from Tango's checkpoint file ``filename`` when ``pretrained`` holds one (converted to ``cls``'s
    key names by ``convert(file, config, what)``, then loaded strictly), else as :func:`build_model` does.

    Tango's file wins over a ``config.json`` beside it: some of Tango's hub repositories carry a dummy
    ``config.json`` (a copy of ``main_config.json``) that is no diffusers config.
    """
    spec = _check_spec(spec, what)
    meta = device is not None and torch.device(device).type == "meta"
    kwargs = dict(weights=weights, device=device, dtype=dtype)
    if not spec.get("pretrained") or not weights or meta:
        return build_model(cls, spec, what, **kwargs)
    src = str(spec["pretrained"])
    try:
        file = tango_file(spec, what, filename)
    except OSError as tango_exc:  # e.g. offline: the repo may still be a diffusers one in the cache
        try:
            return build_model(cls, spec, what, **kwargs)
        except OSError as exc:
            inner = [str(e).removeprefix(f"{what}: ") for e in (tango_exc, exc)]
            raise OSError(
                f"{what}: could not load {src!r} as a Tango checkpoint ({inner[0]}) "
                f"nor as a diffusers model ({inner[1]})"
            ) from exc
    if file is None:
        return build_model(cls, spec, what, **kwargs)
    if not spec.get("config"):
        raise ValueError(
            f"{what}: the Tango checkpoint {str(file)!r} holds no {cls.__name__} config; "
            "give a 'config' (for declare-lab's released models: \"tango_unet\", \"tango_vae\", "
            "\"audioldm_hifigan\")"
        )
    config = resolve_config(spec["config"])
    state = convert(file, config, what)
    with torch.device("meta"):
        model = _from_config(cls, config)
    model = load_weights(model, state, what, repr(str(file)))
    if any(t.is_meta for t in model.buffers()):  # a buffer outside the state dict: build for real instead
        model = load_weights(_from_config(cls, config), state, what, repr(str(file)))
    if dtype is not None or device is not None:
        model = torch.nn.Module.to(model, device=device, dtype=dtype)
    return model.eval()


def tango_file(spec: Mapping[str, Any], what: str, filename: str = TANGO_WEIGHTS) -> Path | None:
    """Tango's checkpoint file ``filename`` named by ``spec`` (a path to it, a folder or a hub repo holding it),
    or None when ``pretrained`` holds none (a diffusers model)."""
    src, sub = str(spec["pretrained"]), spec.get("subfolder") or ""
    if os.path.isfile(src):
        return Path(src)  # a single file is no diffusers folder
    if os.path.isdir(src):
        folder = Path(src, sub)
        if (folder / filename).is_file():
            return folder / filename
        if any((folder / name).is_file() for name in (TANGO_WEIGHTS, TANGO_VAE_WEIGHTS)):
            raise ValueError(f"{what}: {str(folder)!r} is a Tango folder without {filename!r}")
        return None
    if not _is_hub_id(src):
        return None  # a missing local path: build_model's error names it
    try:
        return fetch_file(src, filename, what, subfolder=sub or None, revision=spec.get("revision"))
    except OSError as exc:
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        cause = exc.__cause__
        if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
            return None  # the repo exists and has no Tango file: a diffusers repo
        raise


def load_diffusers_folder(model: torch.nn.Module, folder: str | os.PathLike, what: str = "model") -> None:
    """Load the safetensors weights of a diffusers model folder (``save_pretrained`` layout, sharded or not) into
    the built ``model``, strictly; any failure is one ``OSError`` naming the folder or file."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OSError(f"{what}: {str(index)!r} is not a valid shard index ({exc})") from None
        bad = [f for f in files if f.parent != folder or not f.is_file()]
        if bad:
            raise OSError(f"{what}: missing weights file {str(bad[0])!r}")
    else:
        raise OSError(f"{what}: missing weights file {str(single)!r}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OSError(f"{what}: cannot load {str(file)!r}: it is corrupt or does not fit the model its config "
                          f"describes ({first[:200]})") from None
    try:
        load_weights(model, state, what, source=repr(str(folder)))
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise OSError(f"{what}: cannot load {str(folder)!r}: it is corrupt or does not fit the model its config "
                      f"describes ({first[:300]})") from None
