"""Algorithm 1 of the paper on Hugging Face Accelerate.

Per optimizer step (and per gradient-accumulation micro-batch):

1. the batch's audio becomes a log-mel spectrogram (``torch.stft``, on the
   training device), cut to the clip length and encoded by the frozen codec;
2. a timestep ``t`` and noise are drawn per sample; text is replaced by the
   empty prompt with probability ``text_dropout`` and the image removed with
   probability ``image_dropout`` (both for classifier-free guidance);
3. the frozen image LDM gives each sample's decoder self-attention keys and
   values at its own ``t``: from the image latent forward-noised to ``t``
   (``noised``) or from the image's cached DDIM-inversion trajectory at the
   nearest grid timestep (``inverted``);
4. the synapse aligns them and mixes them into the music UNet's
   cross-attention; the loss is the MSE to the noise (epsilon) or to ``v``,
   optionally min-SNR weighted.

All randomness of a step (timesteps, noise, dropout, the data order and
crops, and the global torch generator that any dropout layer uses) is a pure
function of ``(seed, step, micro-batch, rank)``, so ``--resume`` repeats
exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import NonFiniteError, check_size, non_finite_names, positive_int
from ..files import OutputExistsError, atomic_path
from ..lora import check_lora_base, lora_parameters, lora_settings
from ..pipeline import MelFusion
from ..progress import show_progress
from ..schedules import edm_training_sigmas, same_ddpm_schedule, snr_to_timesteps
from ..synapse.features import FeatureCache, tensor_digest
from .checkpoints import (
    CHECKPOINT_PATTERN,
    STATE_NAME,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_files,
    optimizer_state_to_files,
    save_checkpoint,
)
from .config import TrainConfig
from .logs import TrainingLog, loss_name
from .runfolder import RunFolderLockedError, RunLock, check_fresh_run, check_run_folder
from .sharding import local, shard_like, shard_optimizer_state, whole, whole_parameters
from .zero import (
    check_zero_config,
    fill_zero_config,
    load_zero_optimizer_state,
    load_zero_weights,
    own_storage,
    zero_optimizer_state,
    zero_trainable,
)

__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "NonFiniteWeightsError", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The trained weights (or the optimizer state) hold NaN or infinities; nothing of them was saved.

    A :class:`NonFiniteLossError` (the loss would be next), so whoever handles one handles both.
    """


# what _on_main carries from the main process to the others, by class name
_SHARED_ERRORS = {cls.__name__: cls for cls in (
    ValueError, OSError, FileNotFoundError, FileExistsError, PermissionError, OutputExistsError,
    RunFolderLockedError, NonFiniteError, NonFiniteLossError, NonFiniteWeightsError)}


def manifest_digest(path: str | Path) -> str:
    """SHA-256 of a manifest file's bytes; for a folder manifest, of its files' relative names and sizes."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\n".encode())
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_resume(resume: Any) -> bool | Path:
    if resume is None or resume is False:
        return False
    if resume is True:
        return True
    if isinstance(resume, (str, os.PathLike)) and str(resume) != "":
        return Path(resume)
    raise ValueError(f"resume: expected True, False or a checkpoint folder, got {resume!r}")


@dataclass
class TrainResult:
    step: int
    output: Path
    model_path: Path | None
    last_checkpoint: Path | None
    losses: list[float]


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Ref:
    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj


class MusicTrainModule(nn.Module):
    """What is trained, as one module (what DDP wraps): the music denoiser and the synapse.

    ``forward`` aligns the image keys/values (the aligners may learn), sets
    them on the installed synapse and runs the denoiser.
    """

    def __init__(self, model: MelFusion):
        super().__init__()
        self.denoiser = model.denoiser
        self.synapse = model.synapse
        self._model = _Ref(model)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                image_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                image_rows: torch.Tensor | None = None, timing: torch.Tensor | None = None,
                image_timesteps: torch.Tensor | None = None) -> torch.Tensor:
        model = self._model.obj
        hook = model.synapse_hook
        if image_kv is None or hook is None:
            return self.denoiser(noisy, timesteps, text, text_mask, timing)
        tokens, grids = model.music_tokens(int(text.shape[1]), tuple(noisy.shape[2:]))
        step = FeatureCache()
        step.add(0, image_kv)
        features = self.synapse.align(step, tokens, grids).at(0)
        hook.set_features(features, timestep=image_timesteps if image_timesteps is not None else timesteps,
                          image_rows=image_rows)
        try:
            return self.denoiser(noisy, timesteps, text, text_mask, timing)
        except BaseException:
            hook.set_features(None)
            raise
        # the features stay set until release(), after the backward pass: gradient checkpointing runs the
        # forward again there, and must see the same image features

    def release(self) -> None:
        """Clear the image features the last forward set (the trainer calls it after each backward pass)."""
        hook = self._model.obj.synapse_hook
        if hook is not None:
            hook.set_features(None)


class _Stream(torch.utils.data.Dataset):
    """Draw ``g`` of the endless data stream -> row ``g % n`` in epoch ``g // n`` (the epoch sets the crop)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> dict:
        self.dataset.set_epoch(g // self.n)
        return self.dataset[g % self.n]


class _StreamSampler(torch.utils.data.Sampler):
    """This process's draws, from micro-batch ``start`` on: a fresh seeded permutation of the rows each epoch."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int):
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start
        self._perms: dict[int, np.ndarray] = {}

    def _row(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return epoch * self.n + int(self._perms[epoch][offset])

    def __iter__(self) -> Iterator[int]:
        micro = self.start
        while True:
            base = (micro * self.world + self.rank) * self.batch
            for i in range(self.batch):
                yield self._row(base + i)
            micro += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len()
        return 2**62


class EMA:
    """An exponential moving average of named parameters (float32 copies)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float, start_step: int = 0):
        self.decay, self.start_step = decay, start_step
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        for k, v in params.items():
            if step < self.start_step:
                self.shadow[k].copy_(v.detach().float())
            else:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_into(self, params: dict[str, torch.Tensor]):
        """Temporarily put the averaged values into ``params`` (e.g. to save the model)."""
        saved = {k: v.detach().clone() for k, v in params.items()}
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(self.shadow[k].to(v.device, v.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in params.items():
                    v.copy_(saved[k])


class Trainer:
    """Trains a :class:`~melfusion.MelFusion` on a triplet manifest; see the module doc.

    ``Trainer(config).train()`` on one process; the same code runs on many
    under ``accelerate launch``.
    """

    def __init__(self, config: TrainConfig, accelerator: Any = None, model: MelFusion | None = None):
        from accelerate import Accelerator

        self.config = config
        if accelerator is None:
            # launched as several processes (accelerate launch, torchrun) on a machine without GPUs: gloo on the CPU
            cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
                # accelerate would quietly run plain data parallelism instead
                raise ValueError("accelerate: DeepSpeed was asked for (distributed_type: DEEPSPEED) on processes "
                                 "without a GPU; accelerate runs DeepSpeed on GPUs only. Launch with --multi_gpu "
                                 "for data parallelism on the CPU (docs/training.md, 'Sharded training')")
            accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.accelerator = accelerator
        acc = self.accelerator
        engine = str(getattr(acc, "distributed_type", "")).rsplit(".", 1)[-1]
        #: FSDP2: the trained module's parameters are slices (DTensors); saves gather them (collectives)
        self.sharded = engine == "FSDP"
        #: DeepSpeed ZeRO-1/2: whole weights, the optimizer state split; saves gather it (collectives)
        self.zero = engine == "DEEPSPEED"
        if self.zero:
            check_zero_config(acc, config.mixed_precision)
        plugin = getattr(getattr(acc, "state", None), "fsdp_plugin", None)
        if self.sharded and getattr(plugin, "fsdp_version", 2) != 2:
            raise ValueError(
                "accelerate: FSDP version 1 is not supported by melfusion's trainer (it flattens the parameters "
                "into one, and the trainer tracks them by name): set fsdp_version: 2 in the accelerate config "
                "(examples/accelerate/fsdp.yaml; docs/training.md, 'Sharded training')")
        if self.sharded and type(getattr(plugin, "cpu_offload", None)).__name__ == "CPUOffloadPolicy":
            raise ValueError(
                "accelerate: FSDP parameter offload (fsdp_offload_params: true) is not supported by melfusion's "
                "trainer (untested: its slices live in CPU memory, apart from the GPUs that gather them); set "
                "fsdp_offload_params: false (docs/training.md, 'Sharded training')")
        if engine in _REFUSED:
            # refused before any work: saving would write each process's shards as if they were the whole model
            raise ValueError(
                f"accelerate: distributed_type {engine} (sharded training) is not supported by melfusion's trainer: "
                "its checkpoints and model/ would be written from each process's own shards. Use FSDP "
                "(accelerate launch --config_file examples/accelerate/fsdp.yaml), DeepSpeed ZeRO-2 "
                "(examples/accelerate/deepspeed_zero2.yaml), data parallelism (accelerate launch --multi_gpu), "
                "mode: lora, gradient_checkpointing or mixed_precision: bf16 (docs/training.md, 'Sharded training')")
        self.output = Path(config.output)
        self.checkpoint_dir = self.output / "checkpoints"
        self.device = acc.device
        self.step = 0
        self._started = False  # whether train() has begun writing this run's folder
        self._stopped = False  # a non-finite loss under DeepSpeed: no further step (see optimizer_step)
        if config.data.manifest is None:
            raise ValueError("data.manifest: no manifest given (set it in the config or pass --manifest)")
        # the run folder: refused before any work if it is not one; locked from here to the end of train()
        self._lock = RunLock(self.output)
        self._on_main(self._open_run_folder)
        try:
            self._setup(model)
        except BaseException:
            self._lock.release(remove_created=True)  # a failed start leaves no empty folder behind
            raise

    def _open_run_folder(self) -> None:
        check_run_folder(self.output)
        self._lock.acquire()

    def _relock(self) -> None:
        self._lock.acquire()  # (returns None: _on_main sends results to the other processes)

    def _setup(self, model: MelFusion | None) -> None:
        config, acc = self.config, self.accelerator
        torch.manual_seed(config.seed)  # the same random initial weights on every process
        if model is None:
            if config.init_from:
                model = MelFusion.from_pretrained(config.init_from, device=self.device)
            else:
                cfg = config.model_config_resolved()
                if config.prediction_type is not None:
                    # the denoiser is built to predict it, so the saved model's config says so too (it samples
                    # with what it was trained on)
                    cfg = cfg.model_copy(deep=True)
                    cfg.denoiser.params["prediction_type"] = config.prediction_type
                model = MelFusion.from_config(cfg, device=self.device)
        if model.lora and config.mode != "lora":
            raise ValueError(f"mode: the model ({model.name_or_path or 'given'}) carries LoRA adapters, which save "
                             f"apart from their base; mode {config.mode!r} would train weights such a save does not "
                             "keep. Train it with mode 'lora', or start from its base model")
        wanted = lora_settings(config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.target_modules)
        if config.mode == "lora" and model.lora and "lora" in config.model_fields_set and wanted != model.lora:
            raise ValueError(f"lora: the model's adapters are {model.lora!r}; this config asks for {wanted!r}. "
                             "Leave lora out to keep training them, or start from their base model")
        if config.mode == "lora" and not model.lora:  # a LoRA folder as init_from keeps training its adapters
            check_lora_base(model, "mode")  # before any work: the adapters must name a base that loads again
            model.add_lora(**wanted)
        if config.gradient_checkpointing:
            model.denoiser.enable_gradient_checkpointing()
        self.model = model
        self.frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision,
                                                                                 torch.float32)
        self._freeze_and_select()
        self._build_schedule()
        self._build_data()
        self.module = MusicTrainModule(model)
        self.optimizer = self._build_optimizer()
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(config.optim.lr_scheduler, self.optimizer,
                                          num_warmup_steps=config.optim.warmup_steps,
                                          num_training_steps=config.max_steps)
        if self.zero:
            # the trained parameters of each optimizer group, in order, as the checkpoints index them (DeepSpeed
            # replaces the optimizer's own lists by its flat partitions). Only here: under FSDP, holding the
            # parameters from before prepare() would keep a whole copy of them alive on every process
            self._groups = [list(g["params"]) for g in self.optimizer.param_groups]
            fill_zero_config(acc, batch_size=config.batch_size,
                             gradient_accumulation_steps=config.gradient_accumulation_steps,
                             max_grad_norm=config.optim.max_grad_norm, mixed_precision=config.mixed_precision)
        self.wrapped, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.ema = EMA(self._trained(), config.ema.decay, config.ema.start_step) if config.ema.enabled else None
        fs = model.feature_source  # cached image latents belong to this image model, resolution and dtype
        self._image_model_tag = f"{model.config.feature_source.model_dump_json()}|{fs.resolution}|{fs.dtype}"

    def _on_main(self, fn):
        """``fn()`` on the main process, its result on every process; what it raises, every process raises.

        So a refused output folder or a failed save stops all processes at once instead of leaving the
        others waiting at the next collective.
        """
        acc = self.accelerator
        result, error = None, None
        if acc.is_main_process:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, on every process
                error = exc
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = None if error is None else (type(error).__name__, str(error))
            box = [result if error is None else None, shared]
            broadcast_object_list(box, from_process=0)
            if not acc.is_main_process:
                result, shared = box
                if shared is not None:
                    error = _SHARED_ERRORS.get(shared[0], RuntimeError)(shared[1])
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Release the run folder's lock (``train()`` does at its end; a trainer that never trains may call this)."""
        self._lock.release()

    # -- set-up -----------------------------------------------------------------------------
    def _freeze_and_select(self) -> None:
        m, mode = self.model, self.config.mode
        for part in (m.feature_source, m.text_encoder, m.codec, m.vocoder):
            part.requires_grad_(False).eval()
            if self.frozen_dtype != torch.float32 and self.device.type != "cpu":
                for module in part.stored_modules().values():
                    module.to(dtype=self.frozen_dtype)
        m.denoiser.requires_grad_(False).eval()
        for module in m.denoiser.trainable_modules().values():
            module.requires_grad_(mode == "synapse+unet")
            module.train(mode in ("synapse+unet", "lora"))
        if mode == "lora":
            for param in lora_parameters(m):
                param.requires_grad_(True)
        if m.synapse is not None:
            m.synapse.requires_grad_(False)
            m.synapse.mixer.requires_grad_(True)
            if mode in ("synapse", "synapse+unet", "lora"):
                m.synapse.aligners.requires_grad_(True)
            m.synapse.train()

    def _trained(self) -> dict[str, torch.Tensor]:
        return {k: p for k, p in self.module.named_parameters() if p.requires_grad}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        m = self.model
        alphas, others, unet = [], [], []
        if m.synapse is not None:
            alphas = [p for p in m.synapse.mixer.parameters() if p.requires_grad]
            others = [p for p in m.synapse.aligners.parameters() if p.requires_grad]
        if self.config.mode == "synapse+unet":
            unet = [p for module in m.denoiser.trainable_modules().values() for p in module.parameters()
                    if p.requires_grad]
        adapters = lora_parameters(m) if self.config.mode == "lora" else []
        groups = []
        for name, params, lr, wd in (("alphas", alphas, o.alpha_lr, 0.0), ("synapse", others, o.synapse_lr,
                                                                            o.weight_decay),
                                     ("unet", unet, o.unet_lr, o.weight_decay),
                                     ("lora", adapters, o.lora_lr, o.weight_decay)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": name})
        if not groups:
            raise ValueError(f"mode: {self.config.mode!r} leaves nothing to train for this model")
        return torch.optim.AdamW(groups, betas=o.betas, eps=o.eps)

    def _build_schedule(self) -> None:
        c, m = self.config, self.model
        schedule = m.denoiser.noise_schedule
        if c.prediction_type is not None:
            if schedule.family == "flow":
                raise ValueError(f"prediction_type: a flow-matching denoiser predicts the velocity; "
                                 f"{c.prediction_type!r} does not apply")
            if schedule.prediction_type != c.prediction_type:
                # a given model (init_from, or passed in): training it on another target would save a model whose
                # config samples it with the old one
                raise ValueError(f"prediction_type: the model's denoiser predicts {schedule.prediction_type!r}; "
                                 f"a run on {c.prediction_type!r} would save a model that samples wrongly. Leave "
                                 f"prediction_type unset, or start from a config whose denoiser predicts it")
        if c.min_snr_gamma is not None and schedule.family != "ddpm":
            raise ValueError(f"min_snr_gamma: weights the ddpm family's epsilon/v losses; this denoiser's schedule "
                             f"is {schedule.family}")
        self.schedule = schedule
        self.prediction_type = schedule.prediction_type
        self.alphas_cumprod = (schedule.alphas_cumprod().to(self.device, torch.float64)
                               if schedule.family == "ddpm" else None)
        # the scheduler whose preconditioning the edm family's loss follows (its public precondition_* methods)
        self.train_scheduler = schedule.make_scheduler() if schedule.family == "edm" else None
        self.image_alphas = m.feature_source.noise_schedule.alphas_cumprod() if m.synapse is not None else None
        seconds = m.config.sampling.seconds if c.data.seconds is None else c.data.seconds
        shape = m.latent_hw(seconds, "data.seconds")
        self.latent_shape = (m.denoiser.in_channels, *shape)
        # a lower bound of a batch's memory (audio, the denoiser's activations and their gradients):
        # refuse what cannot fit before any allocation
        estimate = (m.denoiser.activation_bytes(self.latent_shape, c.batch_size) * 2
                    + c.batch_size * int(seconds * m.config.sample_rate) * 64)
        limit = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        check_size(estimate, "data.seconds" if c.data.seconds is not None else "batch_size",
                   f"a batch of {c.batch_size} clips of {seconds:g} s", limit=limit,
                   hint="lower batch_size or data.seconds")
        # mel codecs: mel frames per clip; waveform codecs: samples per clip
        self.mel_frames = shape[0] * m.codec.downsample
        self.seconds = seconds
        from ..datasets.mel import MelFrontEnd

        self.front_end = MelFrontEnd(sample_rate=m.config.sample_rate, hop_length=m.config.hop_length,
                                     n_mels=m.config.n_mels)
        if m.synapse is not None and c.image_features == "inverted":
            grid = m.feature_source.noise_schedule.make_scheduler("ddim")
            if c.inversion_steps > grid.config.num_train_timesteps:
                raise ValueError(f"inversion_steps: {c.inversion_steps} is more than the image model's "
                                 f"{grid.config.num_train_timesteps} training timesteps")
            grid.set_timesteps(c.inversion_steps)
            self.inversion_grid = torch.tensor(sorted(int(t) for t in grid.timesteps), dtype=torch.long)

    def _build_data(self) -> None:
        from ..datasets import TripletDataset, read_manifest, validate_manifest

        c, acc = self.config, self.accelerator
        needs_image = self.model.synapse is not None
        report_path = self.output / "skipped_rows.json" if acc.is_main_process else None
        # every process validates the same files the same way (no collective that one failure could hang)
        rows = read_manifest(c.data.manifest, format=c.data.format, columns=c.data.columns)
        report = validate_manifest(rows, policy=c.data.on_bad_rows, report=report_path, require_image=needs_image)
        if not report.good:
            raise ValueError(f"data.manifest: no usable rows in {c.data.manifest!r}")
        self.rows = report.good
        self.skipped = report.bad
        # which data this run trains on: recorded in each checkpoint, compared on resume
        manifest = Path(c.data.manifest)
        self.manifest_record = {"path": str(manifest.resolve()), "sha256": manifest_digest(manifest),
                                "rows": len(self.rows)} if acc.is_main_process else None
        image_size = self.model.feature_source.resolution if needs_image else None
        self.dataset = TripletDataset(self.rows, sample_rate=self.model.config.sample_rate, seconds=self.seconds,
                                      image_size=image_size, random_crop=c.data.random_crop, seed=c.seed,
                                      images=needs_image)

    def _loader(self, start_micro: int):
        from ..datasets import collate_triplets

        acc = self.accelerator
        sampler = _StreamSampler(len(self.dataset), self.config.batch_size, acc.process_index, acc.num_processes,
                                 self.config.seed, start_micro)
        return iter(torch.utils.data.DataLoader(
            _Stream(self.dataset, len(self.dataset)), batch_size=self.config.batch_size, sampler=sampler,
            collate_fn=collate_triplets, num_workers=self.config.data.num_workers,
            persistent_workers=False, pin_memory=self.device.type == "cuda"))

    # -- one micro-batch -------------------------------------------------------------------
    def _latents(self, audio: torch.Tensor) -> torch.Tensor:
        codec = self.model.codec
        if codec.output == "waveform":  # the codec encodes the waveform itself: cut or pad it to the clip
            wave = audio.to(self.device).float()
            wave = wave[:, None] if wave.ndim == 2 else wave
            n = self.mel_frames
            wave = wave[..., :n] if wave.shape[-1] >= n else torch.nn.functional.pad(wave, (0, n - wave.shape[-1]))
            with torch.no_grad():
                return codec.encode(wave.to(codec.dtype)).float()
        mel = self.front_end.batch(audio.to(self.device))  # (batch, frames, mels)
        frames = mel.shape[1]
        if frames >= self.mel_frames:
            mel = mel[:, : self.mel_frames]
        else:  # pad with the log floor (silence)
            pad = mel.new_full((mel.shape[0], self.mel_frames - frames, mel.shape[2]), math.log(self.front_end.log_floor))
            mel = torch.cat([mel, pad], dim=1)
        with torch.no_grad():
            return codec.encode(mel[:, None].to(codec.dtype)).float()

    def _image_kv(self, images: torch.Tensor, timesteps: torch.Tensor, gen: torch.Generator
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        fs = self.model.feature_source
        images = images.to(self.device)
        cap = self.model.config.synapse.image_timestep_max
        if cap is not None:  # as in generation: image features from no later than the cap (docs/mini.md)
            timesteps = timesteps.clamp(max=cap)
        with torch.no_grad():
            if self.config.image_features == "noised":
                z = torch.cat(self._cached_many("latents", images))
                z = z.to(self.device, fs.dtype)
                noise = torch.randn(z.shape, generator=gen, dtype=torch.float32)
                x = fs.add_noise(z, timesteps, noise)
                return fs.features_at(x, timesteps)
            grid = self.inversion_grid
            distance = (grid[None, :] - timesteps.cpu()[:, None]).abs().float()
            if cap is not None and bool((grid <= cap).any()):
                distance[:, grid > cap] = float("inf")  # the grid points generation would use
            index = distance.argmin(dim=1)
            t_grid = grid[index]
            x = torch.stack([traj[int(index[i])] for i, traj in enumerate(self._cached_many("inversion", images))])
            return fs.features_at(x.to(self.device), t_grid.to(self.device))

    def _cached(self, kind: str, image: torch.Tensor) -> torch.Tensor:
        """The frozen image LDM's view of one image ``(1, 3, H, W)``, cached on disk under its content digest.

        ``latents``: the VAE latent ``(1, C, h, w)`` (deterministic: the
        posterior mode). ``inversion``: the DDIM-inversion trajectory
        ``(grid, C, h, w)`` over ``inversion_grid``. A corrupt entry is
        recomputed.
        """
        return self._cached_many(kind, image)[0]

    def _cached_many(self, kind: str, images: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`_cached` for each image of a batch; the missing ones are computed together in one batch."""
        from safetensors.torch import load_file, save_file

        fs = self.model.feature_source
        grid = self.inversion_grid.tolist() if kind == "inversion" else []
        out: list[torch.Tensor | None] = []
        paths = []
        for i in range(images.shape[0]):
            tag = f"{tensor_digest(images[i:i + 1])}|{kind}|{grid}|{self._image_model_tag}"
            path = self.output / "cache" / kind / f"{hashlib.sha256(tag.encode()).hexdigest()[:32]}.safetensors"
            paths.append(path)
            found = None
            if path.is_file():
                try:
                    found = load_file(str(path))["latents"]
                except Exception:
                    path.unlink(missing_ok=True)
            out.append(found)
        missing = [i for i, found in enumerate(out) if found is None]
        if missing:
            z = fs.encode(images[missing])
            if kind == "inversion":
                traj = fs.inversion_latents(z, grid)
                z = torch.stack([traj[int(t)] for t in grid], dim=1)  # (batch, grid, C, h, w)
            else:
                z = z[:, None]  # (batch, 1, C, h, w)
            for j, i in enumerate(missing):
                latents = z[j].float().cpu().contiguous()
                with atomic_path(paths[i]) as tmp:
                    save_file({"latents": latents}, str(tmp))
                out[i] = latents
        return out

    def _micro_loss(self, batch: dict, step: int, micro: int) -> torch.Tensor:
        c, m, acc = self.config, self.model, self.accelerator
        gen = torch.Generator().manual_seed(_seed_for(c.seed, step, micro, acc.process_index))
        torch.manual_seed(_seed_for(c.seed, step, micro, acc.process_index, 1))  # dropout layers, if any
        latents = self._latents(batch["audio"])
        b = latents.shape[0]
        family = self.schedule.family
        if family == "ddpm":
            t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=gen)
        else:  # a continuous noise level: edm sigma or flow time
            t = (edm_training_sigmas(self.schedule, b, gen) if family == "edm"
                 else torch.rand(b, generator=gen, dtype=torch.float64).clamp(1e-4, 1 - 1e-4))
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32)
        drop_text = torch.rand(b, generator=gen) < c.text_dropout
        drop_image = torch.rand(b, generator=gen) < c.image_dropout
        texts = ["" if d else text for d, text in zip(drop_text.tolist(), batch["text"], strict=True)]
        with torch.no_grad():
            emb, mask = m.text_encoder(texts)
        noise = noise.to(self.device)
        noisy, model_t, target, snr = self._noised(latents, noise, t)
        image_kv, rows, t_img = None, None, None
        if m.synapse is not None:
            if batch.get("image") is None:
                raise ValueError("data.manifest: the synapse needs an image for every row")
            # the image features at the image timestep of equal SNR (identity when both share a schedule)
            same = same_ddpm_schedule(self.schedule, m.feature_source.noise_schedule)
            t_img = t if same else snr_to_timesteps(snr.cpu(), self.image_alphas)
            image_kv = self._image_kv(batch["image"], t_img, gen)
            rows = (~drop_image).to(self.device)
            t_img = t_img.to(self.device)
        dtype = m.denoiser.dtype
        timing = torch.tensor([[0.0, float(self.seconds)]], device=self.device).expand(b, 2)
        pred = self.wrapped(noisy.to(dtype), model_t, emb.to(self.device, dtype), mask.to(self.device),
                            image_kv, rows, timing, t_img).float()
        per_sample = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.ndim)))
        if c.min_snr_gamma is not None and family == "ddpm":
            snr = snr.float()
            clipped = snr.clamp(max=c.min_snr_gamma)
            weight = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)
            per_sample = per_sample * weight
        return per_sample.mean()

    # -- the loop -----------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, resume: bool | str | Path = False) -> TrainResult:
        """Run until ``max_steps`` (default: the config's); ``resume``: True (the latest checkpoint) or a path.

        A fresh run (no ``resume``) refuses an output folder that holds a previous run or files melfusion
        did not write; the run folder is locked until this returns (see :mod:`melfusion.training.runfolder`).
        """
        from tqdm.auto import tqdm

        c = self.config
        hook = self.model.synapse_hook
        if hook is not None and hook.state.strength != 1.0:
            raise ValueError(f"image_strength: training runs at strength 1, got {hook.state.strength:g} (train outside "
                             "`with model.image_strength(...)`)")
        max_steps = c.max_steps if max_steps is None else positive_int(max_steps, "max_steps")
        resume = _check_resume(resume)
        self._on_main(self._relock)  # again, when an earlier train() released it
        try:
            if resume:
                path = latest_checkpoint(self.checkpoint_dir) if resume is True else resume
                if path is None:
                    raise FileNotFoundError(f"resume: no checkpoint in {str(self.checkpoint_dir)!r}")
                self.load_state(path)
            elif self.step == 0 and not self._started:
                self._on_main(lambda: check_fresh_run(self.output))
            if max_steps < self.step:
                raise ValueError(f"max_steps: {max_steps} is before step {self.step}, where this run already is")
            self._started = True
            return self._train(max_steps, resume, tqdm)
        finally:
            self._lock.release()

    def _train(self, max_steps: int, resume: bool | Path, tqdm) -> TrainResult:
        c, acc = self.config, self.accelerator
        syn = self.model.synapse
        log = TrainingLog(self.output, enabled=acc.is_main_process, tensorboard=c.tensorboard, plot=c.plot,
                          loss_name=loss_name(self.schedule.prediction_type, self.schedule.family, c.min_snr_gamma),
                          layer_names=syn.music_layer_names if syn is not None else None)
        log.truncate_after(self.step)
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            c.save(self.output / "train_config.yaml")
        losses: list[float] = []
        last_ckpt = latest_checkpoint(self.checkpoint_dir) if resume else None
        loader = self._loader(self.step * c.gradient_accumulation_steps)
        bar = tqdm(total=max_steps, initial=self.step, desc="train",
                   disable=not (show_progress(c.progress) and acc.is_main_process), dynamic_ncols=True)
        trained = self._trained()
        samples_per_step = c.batch_size * c.gradient_accumulation_steps * acc.num_processes
        try:
            while self.step < max_steps:
                start = time.perf_counter()
                mean_loss, grad_norm = self.optimizer_step(loader, trained, last_ckpt)
                losses.append(mean_loss)
                elapsed = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{samples_per_step / elapsed:.1f}")
                if self.step % c.log_every == 0 or self.step == max_steps:
                    log.write(self.step, mean_loss, self._lrs(), self._alphas(), samples_per_step / elapsed,
                              grad_norm)
                if self.step % c.checkpoint_every == 0 or self.step == max_steps:
                    last_ckpt = self.save_state()
                    log.plot()
        finally:
            bar.close()
            log.close()
        self._check_weights("model", self.step)
        if self.sharded:  # every process takes part in gathering the weights; the main one writes
            model_path = self.save_model()
        else:
            model_path = self._on_main(self.save_model)  # every process waits for it and stops if it fails
        return TrainResult(step=self.step, output=self.output, model_path=model_path, last_checkpoint=last_ckpt,
                           losses=losses)

    def optimizer_step(self, loader: Iterator[dict], trained: dict[str, torch.Tensor],
                       last_checkpoint: Path | None = None) -> tuple[float, float | None]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches: ``(mean loss, grad norm)``."""
        c, acc = self.config, self.accelerator
        if self._stopped:
            raise RuntimeError("training: this Trainer stopped at a non-finite loss under DeepSpeed, whose "
                               "partitions still hold that step's gradients; build a new Trainer and resume from "
                               "the last checkpoint")
        total = torch.zeros((), device=self.device)
        for micro in range(c.gradient_accumulation_steps):
            batch = next(loader)
            last = micro == c.gradient_accumulation_steps - 1
            if self.zero:  # the engine reduces the gradients at the boundary; it steps below, once they are checked
                self.wrapped.set_gradient_accumulation_boundary(last)
            with contextlib.nullcontext() if last or self.zero else acc.no_sync(self.wrapped):
                try:
                    loss = self._micro_loss(batch, self.step, micro) / c.gradient_accumulation_steps
                    if self.zero:
                        self.wrapped.backward(loss, scale_wrt_gas=False)  # already divided, as without DeepSpeed
                    else:
                        acc.backward(loss)
                finally:
                    self.module.release()
            total += loss.detach()
        mean_loss = float(acc.reduce(total, reduction="mean"))  # the same on every process
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            # under DeepSpeed the reduced gradients stay in its partitions (accelerate's zero_grad is a no-op
            # there): this trainer must not step again
            self._stopped = self.zero
            where = f"; the last good checkpoint is {str(last_checkpoint)!r}" if last_checkpoint else ""
            raise NonFiniteLossError(
                f"training: the loss is {mean_loss} at step {self.step + 1}{where}. Lower the learning "
                "rates (optim.*_lr), try mixed_precision: bf16 instead of fp16, or check the data.")
        grad_norm = None
        if self.zero:  # clipping (gradient_clipping, from optim.max_grad_norm), the update and zero_grad
            self.wrapped.step()
            norm = self.wrapped.get_global_grad_norm() if c.optim.max_grad_norm is not None else None
            grad_norm = None if norm is None else float(norm)
            if acc.optimizer_step_was_skipped:
                # float32 weights: DeepSpeed skips an update only for NaN or infinite gradients (its "overflow"),
                # where a run without DeepSpeed would have non-finite weights: stop as it does
                raise NonFiniteWeightsError(
                    f"training: the gradients hold NaN or infinite values at step {self.step + 1} (the loss is "
                    f"{mean_loss:.6g}); DeepSpeed skipped the update and nothing of it was saved"
                    f"{self._last_good(last_checkpoint)}. Lower the learning rates (optim.*_lr), set "
                    "optim.max_grad_norm, or check the data.")
        elif c.optim.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(list(trained.values()), c.optim.max_grad_norm))
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.lr_scheduler.step()
            # the same weights on every process, so every process stops at the same step
            self._check_weights("training", self.step + 1, trained, last_checkpoint)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(trained, self.step)
        return mean_loss, grad_norm

    def _check_weights(self, what: str, step: int, trained: dict[str, torch.Tensor] | None = None,
                       last_checkpoint: Path | None = None) -> None:
        """:class:`NonFiniteWeightsError` if a trained weight (or its average) holds NaN or infinities."""
        trained = self._trained() if trained is None else trained
        tensors = dict(trained)
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        if not tensors:
            return
        flags = torch.stack([torch.isfinite(local(t).detach()).all() for t in tensors.values()])
        if self.sharded:  # each process sees its own slices: a tensor is finite only if every slice is
            flags = self.accelerator.reduce(flags.to(self.device, torch.float32), reduction="sum") \
                >= self.accelerator.num_processes - 0.5
        if bool(flags.all()):
            return
        bad = [k for k, ok in zip(tensors, flags.tolist(), strict=True) if not ok]
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteWeightsError(
            f"{what}: the trained weights hold NaN or infinite values after step {step} ({shown}); nothing of "
            f"them was saved{self._last_good(last_checkpoint)}. Lower the learning rates (optim.*_lr), set "
            "optim.max_grad_norm, try mixed_precision: bf16 instead of fp16, or check the data.")

    def _last_good(self, last_checkpoint: Path | None) -> str:
        """``"; the last good checkpoint is '...'"`` for an error message (empty when there is none)."""
        last = last_checkpoint if last_checkpoint is not None else latest_checkpoint(self.checkpoint_dir)
        return f"; the last good checkpoint is {str(last)!r}" if last else ""

    def _lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    def _noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(model input, model timestep, target, SNR)`` for clean ``latents`` at noise levels ``t`` (Algorithm 1's
        noising, in the denoiser's own family: ddpm timesteps, edm sigmas or flow times)."""
        family = self.schedule.family
        view = (-1, *([1] * (latents.ndim - 1)))
        if family == "ddpm":
            t_dev = t.to(self.device)
            a = self.alphas_cumprod[t_dev].view(view)
            noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).float()
            target = noise if self.prediction_type == "epsilon" else (a.sqrt() * noise - (1 - a).sqrt() * latents)
            return noisy, t_dev, target.float(), (a / (1 - a)).view(-1)
        if family == "edm":
            sched = self.train_scheduler
            sigma = t.to(self.device, torch.float32).view(view)
            x = latents + sigma * noise
            model_in = sched.precondition_inputs(x, sigma)
            model_t = self.schedule.model_timestep(t.to(self.device, torch.float32))  # as sampling gives it
            # the preconditioning is linear in the model output: denoised = c_skip * x + c_out * F
            zero = torch.zeros_like(x)
            c_skip_x = sched.precondition_outputs(x, zero, sigma)
            c_out = sched.precondition_outputs(zero, torch.ones_like(x), sigma)
            target = (latents - c_skip_x) / c_out
            return model_in.float(), model_t, target.float(), self.schedule.snr_of_sigma(t).to(self.device)
        s = t.to(self.device, torch.float32).view(view)  # flow matching
        x = (1 - s) * latents + s * noise
        model_t = t.to(self.device, torch.float32) * self.schedule.num_train_timesteps
        return x.float(), model_t, (noise - latents).float(), self.schedule.snr_of_sigma(t).to(self.device)

    def alpha_summary(self) -> list[float]:
        """The mixer's current alphas, averaged per layer (empty for a mixer whose weights depend on the input).

        Under FSDP it gathers the mixer's weights: every process must call it."""
        return self._alphas()

    def _alphas(self) -> list[float]:
        syn = self.model.synapse
        if syn is None:
            return []
        with whole_parameters(self.module, [syn.mixer]):  # under FSDP, a collective: every process calls it
            try:
                a = syn.mixer.alphas().detach().float().cpu()
            except Exception:  # a mixer whose weights depend on the input
                return []
        return a.reshape(a.shape[0], -1).mean(dim=1).tolist()

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """What a checkpoint holds: ``({"trainable"|"optimizer"|"ema": tensors}, JSON-able state)``; under FSDP the
        tensors are this process's slices (``save_state`` gathers them). Under DeepSpeed ZeRO they are gathered
        here, a collective (other processes than the main one get only the scalars)."""
        if self.zero:
            keep = self.accelerator.is_main_process
            opt_tensors, opt_meta = zero_optimizer_state(self.optimizer, self._groups, keep=keep)
            trainable = zero_trainable(self._trained(), keep=keep)
            trainable = {k: v for k, v in trainable.items() if v is not None}
        else:
            opt_tensors, opt_meta = optimizer_state_to_files(self.optimizer)
            trainable = {k: v.detach() for k, v in self._trained().items()}
        tensors = {"trainable": trainable, "optimizer": opt_tensors}
        if self.ema is not None:
            tensors["ema"] = dict(self.ema.shadow)
        state = {
            "step": self.step,
            "world_size": self.accelerator.num_processes,
            "batch_size": self.config.batch_size,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "seed": self.config.seed,
            "mode": self.config.mode,
            "lora": self.model.lora,  # the adapters' settings (mode "lora"), checked on resume
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "optimizer": opt_meta,
            "rows": len(self.rows),
            "manifest": self.manifest_record,  # {"path", "sha256", "rows"} (None on other processes)
            "format": "melfusion-train-checkpoint",
            "version": 1,
        }
        return tensors, state

    def save_state(self) -> Path:
        """Write a checkpoint of this step (main process), keeping the last ``keep_last``.

        Refused, on every process, when a tensor to save holds NaN or infinities
        (:class:`NonFiniteWeightsError`): the last good checkpoint stays the latest.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        tensors, state = self.state_tensors()
        if self.sharded:  # each process holds slices: gather whole tensors (every process, in the same order);
            keep = acc.is_main_process  # only the writing process keeps them, in CPU memory
            tensors = {stem: {k: whole(v, keep) for k, v in sd.items()} for stem, sd in tensors.items()}

        def save() -> Path:
            bad = [f"{stem}: {name}" for stem, sd in tensors.items() for name in non_finite_names(sd)]
            if bad:  # raised on every process by _on_main
                shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                last = latest_checkpoint(self.checkpoint_dir)
                raise NonFiniteWeightsError(
                    f"checkpoint: the state at step {self.step} holds NaN or infinite values ({shown}); not saved"
                    + (f"; the last good checkpoint is {str(last)!r}" if last else ""))
            return save_checkpoint(self.checkpoint_dir, self.step, tensors, state, keep_last=self.config.keep_last)

        return self._on_main(save) or self.checkpoint_dir / f"step-{self.step:08d}"

    def load_state(self, path: str | Path) -> None:
        """Continue from checkpoint folder ``path``; every problem is checked before anything changes.

        A checkpoint of another run (mode, seed, batch) is a ``ValueError``; a corrupt or truncated one an
        ``OSError`` naming its file. Another manifest, or a changed one, than the checkpoint was trained on
        is a warning naming both (checkpoints written before the record existed load without it).
        """
        path = Path(path)
        tensors, state = load_checkpoint(path)
        state_file = path / STATE_NAME
        if state.get("format") != "melfusion-train-checkpoint":
            raise OSError(f"resume: {str(path)!r} is not a melfusion training checkpoint")
        lacking = [k for k in ("step", "lr_scheduler", "optimizer") if k not in state]
        if lacking:
            raise OSError(f"resume: {str(state_file)!r} lacks {', '.join(lacking)} (a corrupt checkpoint?)")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise OSError(f"resume: {str(state_file)!r} has step {step!r}, not an int >= 0 (a corrupt checkpoint?)")
        named = CHECKPOINT_PATTERN.match(path.name)
        if named and int(named.group(1)) != step:
            raise OSError(f"resume: {str(state_file)!r} says step {step} in a folder named {path.name!r}")
        if not isinstance(state["lr_scheduler"], dict) or not isinstance(state["optimizer"], dict):
            raise OSError(f"resume: {str(state_file)!r} has a malformed lr_scheduler or optimizer entry")
        for key in ("mode", "seed", "batch_size", "gradient_accumulation_steps"):
            if state.get(key) != getattr(self.config, key):
                raise ValueError(f"resume: the checkpoint was written with {key}={state.get(key)!r}, this run has "
                                 f"{getattr(self.config, key)!r}; resuming would not continue the same run")
        if self.config.mode == "lora" and state.get("lora") != self.model.lora:
            raise ValueError(f"resume: the checkpoint's LoRA adapters were {state.get('lora')!r}, this run's are "
                             f"{self.model.lora!r}; resuming would not continue the same run")
        trained = self._trained()
        if "trainable" not in tensors:
            raise OSError(f"resume: {str(path)!r} has no trainable.safetensors (a corrupt checkpoint?)")
        saved = tensors["trainable"]
        missing, unexpected = sorted(set(trained) - set(saved)), sorted(set(saved) - set(trained))
        if missing or unexpected:
            raise ValueError(f"resume: the parameters in {str(path)!r} do not match this model (missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]})")
        shapes = [k for k, p in trained.items() if tuple(saved[k].shape) != tuple(p.shape)]
        if shapes:
            raise ValueError(f"resume: the parameters in {str(path)!r} have other shapes than this model's "
                             f"({shapes[:5]})")
        if self.ema is not None:
            if "ema" not in tensors:
                raise ValueError(f"resume: {str(path)!r} has no EMA weights but ema.enabled is true")
            ema = tensors["ema"]
            if set(ema) != set(trained) or any(tuple(ema[k].shape) != tuple(p.shape) for k, p in trained.items()):
                raise ValueError(f"resume: the EMA weights in {str(path)!r} do not match this model's parameters")
        if "optimizer" not in tensors:  # written even when empty
            raise OSError(f"resume: {str(path)!r} has no optimizer.safetensors (a corrupt checkpoint?)")
        if self.accelerator.is_main_process:
            self._warn_if_other_data(state, path)
        if state.get("world_size") != self.accelerator.num_processes:
            warnings.warn(f"resume: the checkpoint was written by {state.get('world_size')} processes, this run has "
                          f"{self.accelerator.num_processes}: the data order will differ from an uninterrupted run",
                          stacklevel=3)
        try:
            if self.zero:  # each process keeps its own slices of ZeRO's partitions
                load_zero_optimizer_state(self.optimizer, self._groups, tensors["optimizer"], state["optimizer"])
            else:
                optimizer_state_from_files(self.optimizer, tensors["optimizer"], state["optimizer"])
        except ValueError as exc:
            raise ValueError(f"resume: {str(path)!r}: {str(exc).removeprefix('resume: ')}") from None
        shard_optimizer_state(self.optimizer)  # under FSDP: this process's slices of the whole saved state
        try:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OSError(f"resume: the learning-rate schedule in {str(state_file)!r} does not load ({exc})") from None
        if self.zero:
            load_zero_weights(trained, saved)  # the module's weights and DeepSpeed's float32 copy
        else:
            with torch.no_grad():
                for k, p in trained.items():
                    p.copy_(shard_like(saved[k], p))
        if self.ema is not None:
            self.ema.shadow = {k: shard_like(v, trained[k], dtype=torch.float32) for k, v in tensors["ema"].items()}
        self.step = step

    def _warn_if_other_data(self, state: dict[str, Any], path: Path) -> None:
        """Warn when the checkpoint was trained on another manifest, or on this one before it changed."""
        saved, now = state.get("manifest"), self.manifest_record
        if now is None:
            return
        if not isinstance(saved, dict):  # a checkpoint from before the record: compare the row count only
            if isinstance(state.get("rows"), int) and state["rows"] != len(self.rows):
                warnings.warn(f"resume: the checkpoint {str(path)!r} was trained on {state['rows']} rows, this run "
                              f"has {len(self.rows)} in {now['path']!r}: it does not continue the same run",
                              stacklevel=4)
            return
        if saved.get("path") != now["path"]:
            warnings.warn(f"resume: the checkpoint {str(path)!r} was trained on the manifest {saved.get('path')!r} "
                          f"(sha256 {str(saved.get('sha256'))[:12]}), this run reads {now['path']!r} (sha256 "
                          f"{now['sha256'][:12]}): it does not continue the same run", stacklevel=4)
        elif saved.get("sha256") != now["sha256"]:
            warnings.warn(f"resume: the manifest {now['path']!r} changed since the checkpoint {str(path)!r} was "
                          f"written (sha256 {str(saved.get('sha256'))[:12]} then, {now['sha256'][:12]} now; "
                          f"{saved.get('rows')} rows then, {now['rows']} now): it does not continue the same run",
                          stacklevel=4)

    def save_model(self, path: str | Path | None = None) -> Path:
        """``save_pretrained`` of the trained model (the EMA weights when an average is kept).

        Refused (:class:`NonFiniteWeightsError`) when those weights hold NaN or infinities. Under FSDP every
        process must call it (it gathers the weights); the main process writes.
        """
        path = self.output / "model" if path is None else Path(path)
        self._check_weights("model", self.step)
        if not self.sharded:
            # under DeepSpeed ZeRO the trained weights are views into one flat buffer: saved from copies (entered
            # first, so that the average goes into the copies)
            with own_storage(self.module) if self.zero else contextlib.nullcontext(), self._averaged():
                return self.model.save_pretrained(path)
        with self._averaged(), whole_parameters(self.module, keep=self.accelerator.is_main_process):
            return self._on_main(lambda: self.model.save_pretrained(path))

    def _averaged(self):
        """Inside, the trained weights are the EMA's (a no-op without an average)."""
        return contextlib.nullcontext() if self.ema is None else self.ema.swapped_into(self._trained())



#: accelerate's sharded engines the trainer refuses (see Trainer.__init__); FSDP (version 2) and DeepSpeed
#: (ZeRO stages 1 and 2) are supported
_REFUSED = ("MEGATRON_LM",)


def train(config: TrainConfig | str | Path, *, manifest: str | None = None, output: str | None = None,
          max_steps: int | None = None, resume: bool | str | Path = False, **overrides: Any) -> TrainResult:
    """Train from a :class:`TrainConfig` or a YAML/JSON file; the keyword arguments override its fields."""
    fields = {"data.manifest": manifest, "output": output, "max_steps": max_steps, **overrides}
    if isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config.model_dump(mode="json"), **fields)
    else:
        config = TrainConfig.load(config, **fields)
    return Trainer(config).train(resume=resume)
