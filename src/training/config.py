"""``TrainConfig``: everything a training run needs, validated by pydantic (unknown keys are errors).

A run is described by one YAML or JSON file (see ``examples/train-tiny.yaml``
and ``docs/training.md``, which documents every field); the command-line
flags ``--manifest``, ``--output`` and ``--max-steps`` override its fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ..config import MelFusionConfig, read_config_mapping, validation_message

__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "EMAConfig", "TRAIN_MODES"]

#: what is trained: the mixer only ("the alphas"), the whole synapse (mixer and aligners), both and the music UNet,
#: or the whole synapse and LoRA adapters on the music denoiser's attention projections (the UNet itself frozen)
TRAIN_MODES = ("alphas", "synapse", "synapse+unet", "lora")


class _Strict(BaseModel):
    # NaN and infinities are refused in every float field: ``unet_lr: .inf`` passes ``gt=0`` and trains NaN weights
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


#: an Adam beta: the decay of a moving average, in [0, 1)
_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
#: a non-empty path (an empty one would mean the current folder)
_Path = Annotated[str, Field(min_length=1)]


class DataConfig(_Strict):
    """Where the triplets come from and how each is cut to the training clip."""

    manifest: _Path | None = None  # JSON lines, CSV, or a folder of name.wav/name.jpg/name.txt
    format: Literal["jsonl", "csv", "folder"] | None = None  # None: from the manifest's suffix
    columns: dict[str, str] | None = None  # {"caption": ..., "audio": ..., "image": ...} for jsonl/csv
    on_bad_rows: Literal["error", "skip"] = "error"
    seconds: PositiveFloat | None = None  # clip length; None: the model's sampling.seconds
    random_crop: bool = True  # longer clips: a random window (deterministic per seed, epoch and row)
    num_workers: int = Field(0, ge=0)


class OptimConfig(_Strict):
    """AdamW with three parameter groups and a diffusers learning-rate schedule."""

    unet_lr: PositiveFloat = 3e-5  # the music UNet (Tango's fine-tuning rate)
    synapse_lr: PositiveFloat = 1e-4  # aligners and any other synapse parameters beside the mixer
    alpha_lr: PositiveFloat = 1e-5  # the mixer's weights (the paper's alpha learning rate)
    lora_lr: PositiveFloat = 1e-4  # LoRA adapters (mode "lora")
    weight_decay: NonNegativeFloat = 1e-2  # applied to the UNet and aligners; never to the alphas
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    max_grad_norm: PositiveFloat | None = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class LoraConfig(_Strict):
    """LoRA adapters for mode ``lora`` (melfusion.lora): rank, scale ``alpha / rank``, dropout, the targeted layers."""

    rank: PositiveInt = 8
    alpha: PositiveFloat | None = None  # None: the rank (scale 1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)


class EMAConfig(_Strict):
    """An exponential moving average of the trained weights; the final model is saved from it."""

    enabled: bool = False
    decay: float = Field(0.9999, gt=0.0, lt=1.0)
    start_step: int = Field(0, ge=0)  # steps before averaging begins (the average copies the weights until then)


class TrainConfig(_Strict):
    """One training run (Algorithm 1 of the paper)."""

    model: MelFusionConfig | str = "tiny"  # a preset name, a model config file, or an inline config
    init_from: _Path | None = None  # a save_pretrained folder whose weights (music UNet, synapse) start the run
    data: DataConfig = Field(default_factory=DataConfig)
    output: _Path = "runs/melfusion"
    mode: Literal["alphas", "synapse", "synapse+unet", "lora"] = "synapse+unet"
    lora: LoraConfig = Field(default_factory=LoraConfig)  # mode "lora": the adapters' settings
    # recompute the denoiser's activations in the backward pass: less memory, about a third more time
    gradient_checkpointing: bool = False
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the denoiser's own
    min_snr_gamma: PositiveFloat | None = None  # min-SNR loss weighting; the released code uses 5
    text_dropout: float = Field(0.1, ge=0.0, le=1.0)  # rows trained with the empty prompt (for guidance)
    image_dropout: float = Field(0.1, ge=0.0, le=1.0)  # rows trained without image features
    # the image trajectory training reads features on: "noised" (alias "noise": the clean image latent
    # forward-noised to each row's timestep) or "inverted" (alias "inversion": the DDIM-inversion trajectory),
    # the names generation's image_trajectory uses
    image_features: Literal["noised", "inverted", "noise", "inversion"] = "noised"
    inversion_steps: PositiveInt = 50  # the DDIM-inversion grid for image_features="inverted"
    batch_size: PositiveInt = 4  # per process
    # micro-batches per optimizer step; past a few thousand a step never ends on any machine (bounded to say so)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    max_steps: PositiveInt = 1000  # optimizer steps
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = Field(0, ge=0, lt=2**63)  # numpy's generators take no negative seeds
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    checkpoint_every: PositiveInt = 500
    keep_last: PositiveInt = 3
    log_every: PositiveInt = 10
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # loss and alphas PNG beside the CSV log
    progress: bool = True

    @field_validator("image_features")
    @classmethod
    def _one_vocabulary(cls, value: str) -> str:
        return {"noise": "noised", "inversion": "inverted"}.get(value, value)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        model = self.model_config_resolved()
        if not model.synapse.enabled and self.mode not in ("synapse+unet", "lora"):
            raise ValueError(f"mode: {self.mode!r} trains the synapse, but the model's synapse is disabled")
        return self

    def model_config_resolved(self) -> MelFusionConfig:
        """The model config: ``model`` itself, the preset it names, or the file it points to."""
        if isinstance(self.model, MelFusionConfig):
            return self.model
        from ..config import PRESETS

        if self.model in PRESETS:
            return MelFusionConfig.preset(self.model)
        path = Path(self.model)
        if path.suffix in (".yaml", ".yml", ".json"):
            if not path.is_file():
                raise ValueError(f"model: no such config file {self.model!r}")
            return MelFusionConfig.load(path, name="model")
        raise ValueError(f"model: {self.model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         "nor a .yaml/.json model config file")

    # -- files ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read YAML or JSON; ``overrides`` (dotted keys allowed: ``data.manifest``) replace fields first.

        Every problem (no such file, not YAML, a bad field) is one ``ValueError`` (``FileNotFoundError``) line
        naming the file and the field.
        """
        path = Path(path)
        data = read_config_mapping(path, "config", yaml_for_json=True, empty_ok=True)
        try:
            return cls.from_dict(data, **overrides)
        except ValueError as exc:
            raise ValueError(f"config: {str(path)!r}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Validate ``data`` after ``overrides``; a bad field is one ``ValueError`` line naming it (``optim.unet_lr``)."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        for key, value in overrides.items():
            if value is None:
                continue
            target = data
            *parents, leaf = key.split(".")
            for p in parents:
                if target.get(p) is None:  # absent, or an empty YAML section
                    target[p] = {}
                elif isinstance(target[p], dict):
                    target[p] = dict(target[p])  # never change the caller's mapping
                else:
                    raise ValueError(f"{p}: must be a mapping to override {key!r}")
                target = target[p]
            target[leaf] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(validation_message(exc)) from None

    def save(self, path: str | Path) -> Path:
        from ..files import write_atomic

        path = Path(path)
        data = self.model_dump(mode="json")
        return write_atomic(path, yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml")
                            else json.dumps(data, indent=2))
