"""The recipe that trains the ``mini`` model from scratch on the synthetic world, on a CPU.

Stages (each seeded; the whole run is a pure function of the arguments):

1. data: :func:`~melfusion.datasets.synthetic.write_synthetic_manifest` writes a training set and a
   held-out set (another seed, other items) under ``output/data``;
2. the image LDM: the ``mini`` feature source's VAE, then its UNet, on the training pictures
   (:mod:`melfusion.training.image_ldm`), then frozen; or copied from an earlier run (``image_from``);
3. the music model: the :class:`~melfusion.training.Trainer` (Algorithm 1) on the training triplets, with
   image features from each picture's cached DDIM-inversion trajectory (the trajectory Algorithm 2 uses);
4. ``output/model``: :meth:`MelFusion.save_pretrained`, loadable with ``MelFusion.from_pretrained``;
   ``output/mini_summary.json``: the settings, stage timings and losses.

``python scripts/train_mini.py`` runs it with the shipped model's settings; ``benchmarks/ablation.py`` runs
it once per ablation variant with one shared image LDM.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checks import finite_float, positive_int
from ..config import MelFusionConfig
from ..datasets.synthetic import (
    AUGMENT_SATURATION,
    PICTURE_FAMILIES,
    check_saturation_range,
    write_synthetic_manifest,
)
from ..files import write_atomic

__all__ = ["MiniRecipe", "train_mini", "write_mini_data", "image_manifest"]


@dataclass
class MiniRecipe:
    """Settings of one run; the defaults are the shipped model's (about 45 min on a 2-core CPU)."""

    seed: int = 0
    n_train: int = 480  # 10 of each of the 48 attribute combinations
    #: pictures the image LDM trains on (the training set's pictures and more of the same kind, written to
    #: ``data/images``); ``None``: the music's training pictures
    n_image: int | None = 960
    n_heldout: int = 96
    image_vae_steps: int = 400
    image_unet_steps: int = 600
    music_steps: int = 1500
    batch_size: int = 12
    unet_lr: float = 1e-3
    synapse_lr: float = 1e-3
    alpha_lr: float = 1e-3
    inversion_steps: int = 25
    text_dropout: float = 0.1
    image_dropout: float = 0.1
    #: overrides of the model config's ``synapse`` section (ablation variants), e.g. {"enabled": False}
    synapse: dict[str, Any] = field(default_factory=dict)
    #: training pictures of several families, sizes, saturations and JPEG qualities
    #: (``write_synthetic_manifest(augment=True)``) instead of the classic discs at 64 px
    augment: bool = True
    #: the families an augmented training set draws from (default: ``TRAIN_FAMILIES``)
    families: tuple[str, ...] | None = None
    #: the range an augmented training picture's saturation is drawn from (image LDM and music stage alike)
    saturation: tuple[float, float] = AUGMENT_SATURATION
    #: overrides of the model config's ``sampling`` section, e.g. {"image_guidance_scale": 7.0}
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # checked here, not after the image stages have run for minutes
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        if self.n_image is not None:
            positive_int(self.n_image, "n_image")
        for name in ("n_train", "n_heldout", "image_vae_steps", "image_unet_steps", "music_steps", "batch_size",
                     "inversion_steps"):
            positive_int(getattr(self, name), name)
        for name in ("unet_lr", "synapse_lr", "alpha_lr"):
            finite_float(getattr(self, name), name, low=0.0, low_open=True)
        for name in ("text_dropout", "image_dropout"):
            finite_float(getattr(self, name), name, low=0.0, high=1.0)
        for name in ("synapse", "sampling"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}: expected a mapping of {name} config fields, got {getattr(self, name)!r}")
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment: expected True or False, got {self.augment!r}")
        self.saturation = check_saturation_range(self.saturation)
        if self.families is not None:
            self.families = tuple(self.families)
            unknown = [f for f in self.families if f not in PICTURE_FAMILIES]
            if not self.families or unknown:
                raise ValueError(f"families: expected some of {', '.join(PICTURE_FAMILIES)}, got {self.families!r}")

    def model_config(self) -> MelFusionConfig:
        cfg = MelFusionConfig.preset("mini")
        if self.synapse or self.sampling:
            data = cfg.to_dict()
            data["synapse"].update(self.synapse)
            data["sampling"].update(self.sampling)
            cfg = MelFusionConfig.model_validate(data)
        return cfg


def write_mini_data(folder: str | Path, recipe: MiniRecipe | None = None) -> tuple[Path, Path]:
    """The training and held-out manifests under ``folder`` (``train/``, ``heldout/``; with ``n_image`` also
    ``images/``, the image LDM's pictures: see :func:`image_manifest`); reused if present."""
    recipe = MiniRecipe() if recipe is None else recipe
    folder = Path(folder)
    out = []
    sets = [("train", recipe.n_train, recipe.seed, 0), ("heldout", recipe.n_heldout, recipe.seed + 1000, 100_000)]
    if recipe.n_image is not None:
        sets.append(("images", recipe.n_image, recipe.seed, 0))
    for name, n, seed, start in sets:
        manifest = folder / name / "manifest.jsonl"
        stamp = folder / name / ".complete"
        extra: dict[str, Any] = {}
        if name in ("train", "images") and recipe.augment:
            extra = {"augment": True, "families": list(recipe.families) if recipe.families else None}
            if recipe.saturation != AUGMENT_SATURATION:  # the default leaves earlier runs' stamps valid
                extra["saturation"] = list(recipe.saturation)
        want = json.dumps({"n": n, "seed": seed, "start": start, **extra})
        if not (stamp.is_file() and stamp.read_text() == want and manifest.is_file()):
            # a changed recipe
            write_synthetic_manifest(folder / name, n=n, seed=seed, start=start, overwrite=True, **extra)
            write_atomic(stamp, want)
        out.append(manifest)
    return out[0], out[1]


def image_manifest(folder: str | Path, recipe: MiniRecipe) -> Path:
    """The manifest whose pictures the image LDM trains on: ``images/`` with ``n_image``, else ``train/``
    (the first ``n_train`` items of ``images/`` are the training set's own pictures: same seed and items)."""
    return Path(folder) / ("images" if recipe.n_image is not None else "train") / "manifest.jsonl"


#: what the recipe writes in its output folder
MINI_ENTRIES = {"data": True, "music": True, "model": True, "mini_summary.json": False}
_MINI_TEMPORARY = re.compile(r"^\.(?:mini_summary\.json\..+\.tmp|model\.melfusion-tmp-.+)$")


def _check_mini_output(output: Path) -> None:
    """Refuse an output that is a file, or a folder holding what the recipe does not write (nothing is replaced)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output: {str(output)!r} is a file; give a folder for the recipe")
    if not output.is_dir():
        return
    foreign = []
    for p in sorted(output.iterdir()):
        folder = MINI_ENTRIES.get(p.name)
        ours = _MINI_TEMPORARY.match(p.name) or (folder is not None and not p.is_symlink()
                                                 and (p.is_dir() if folder else p.is_file()))
        if not ours:
            foreign.append(p.name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"output: {str(output)!r} holds files the mini recipe did not write ({shown}); nothing "
                         "was changed: choose an empty or new folder")


def _image_paths(manifest: Path) -> list[Path]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [manifest.parent / row["img_path"] for row in rows]


def train_mini(output: str | Path = "runs/mini", recipe: MiniRecipe | None = None, *,
               image_from: str | Path | None = None, progress: bool = True) -> Path:
    """Train the mini model into ``output/model`` and return that folder (see the module doc)."""
    from ..pipeline import MelFusion
    from .checkpoints import latest_checkpoint
    from .config import TrainConfig
    from .image_ldm import copy_image_model, image_vae_config, load_images, train_image_unet, train_image_vae
    from .trainer import Trainer

    recipe = MiniRecipe() if recipe is None else recipe
    output = Path(output)
    _check_mini_output(output)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    losses: dict[str, list[float]] = {}

    start = time.perf_counter()
    train_manifest, heldout_manifest = write_mini_data(output / "data", recipe)
    timings["data_s"] = time.perf_counter() - start

    cfg = recipe.model_config()
    torch.manual_seed(recipe.seed)
    model = MelFusion.from_config(cfg)
    fs = model.feature_source
    start = time.perf_counter()
    if image_from is not None:
        source = MelFusion.from_pretrained(image_from)
        copy_image_model(fs, source.feature_source)
    else:
        images = load_images(_image_paths(image_manifest(output / "data", recipe)), size=fs.resolution)
        losses["image_vae"] = train_image_vae(fs, images, steps=recipe.image_vae_steps, seed=recipe.seed,
                                              progress=progress)
        latents = torch.cat([fs.encode(images[i: i + 64]) for i in range(0, len(images), 64)])
        losses["image_unet"] = train_image_unet(fs, latents, steps=recipe.image_unet_steps, seed=recipe.seed,
                                                progress=progress)
    timings["image_ldm_s"] = time.perf_counter() - start
    # the trained VAE's scaling factor must travel with the saved config
    data = cfg.to_dict()
    vae_spec = data["feature_source"]["params"]["vae"]
    vae_config = image_vae_config(fs, vae_spec.get("config"))
    vae_spec["config"] = _jsonable(vae_config)
    cfg = MelFusionConfig.model_validate(data)
    model.config = cfg

    train_cfg = TrainConfig.from_dict(dict(
        model=cfg, output=str(output / "music"), mode="synapse+unet",
        data={"manifest": str(train_manifest), "random_crop": False},
        image_features="inverted", inversion_steps=recipe.inversion_steps, batch_size=recipe.batch_size,
        max_steps=recipe.music_steps, seed=recipe.seed, text_dropout=recipe.text_dropout,
        image_dropout=recipe.image_dropout,
        optim={"unet_lr": recipe.unet_lr, "synapse_lr": recipe.synapse_lr, "alpha_lr": recipe.alpha_lr,
               "lr_scheduler": "cosine", "warmup_steps": max(1, recipe.music_steps // 30)},
        checkpoint_every=max(1, recipe.music_steps // 4), keep_last=1, log_every=25, tensorboard=False,
        progress=progress,
    ))
    start = time.perf_counter()
    trainer = Trainer(train_cfg, model=model)
    # an earlier run of the recipe that got as far as a checkpoint continues from it
    resume = latest_checkpoint(output / "music" / "checkpoints") is not None
    result = trainer.train(resume=resume)
    timings["music_s"] = time.perf_counter() - start
    losses["music"] = result.losses
    model_dir = trainer.save_model(output / "model")
    summary = {"recipe": asdict(recipe), "timings": timings, "train_manifest": str(train_manifest),
               "heldout_manifest": str(heldout_manifest), "model": str(model_dir),
               "final_losses": {k: sum(v[-50:]) / max(len(v[-50:]), 1) for k, v in losses.items()},
               "alphas": trainer.alpha_summary()}
    write_atomic(output / "mini_summary.json", json.dumps(summary, indent=2))
    return model_dir


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
