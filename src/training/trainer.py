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

from ..files import atomic_path
from ..pipeline import MelFusion, _frozen_modules, make_scheduler, noise_schedule
from ..synapse.features import FeatureCache, tensor_digest
from .checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_files,
    optimizer_state_to_files,
    save_checkpoint,
)
from .config import TrainConfig
from .logs import TrainingLog

__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


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
                image_rows: torch.Tensor | None = None) -> torch.Tensor:
        model = self._model.obj
        handle = model._handle
        if image_kv is None or handle is None:
            return self.denoiser(noisy, timesteps, text, text_mask)
        tokens, grids = model.music_tokens(int(text.shape[1]), (noisy.shape[2], noisy.shape[3]))
        step = FeatureCache()
        step.add(0, image_kv)
        features = self.synapse.align(step, tokens, grids).at(0)
        handle.set_features(features, timestep=timesteps, image_rows=image_rows)
        try:
            return self.denoiser(noisy, timesteps, text, text_mask)
        finally:
            handle.set_features(None)


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
            accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.accelerator = accelerator
        acc = self.accelerator
        self.output = Path(config.output)
        self.checkpoint_dir = self.output / "checkpoints"
        self.device = acc.device
        if config.data.manifest is None:
            raise ValueError("data.manifest: no manifest given (set it in the config or pass --manifest)")

        torch.manual_seed(config.seed)  # the same random initial weights on every process
        if model is None:
            if config.init_from:
                model = MelFusion.from_pretrained(config.init_from, device=self.device)
            else:
                model = MelFusion.from_config(config.model_config_resolved(), device=self.device)
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
        self.wrapped, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.ema = EMA(self._trained(), config.ema.decay, config.ema.start_step) if config.ema.enabled else None
        self.step = 0
        fs = model.feature_source  # cached image latents belong to this image model, resolution and dtype
        self._image_model_tag = (f"{model.config.feature_source.model_dump_json()}|{getattr(fs, 'resolution', None)}"
                                 f"|{getattr(fs, 'dtype', None)}")

    # -- set-up -----------------------------------------------------------------------------
    def _freeze_and_select(self) -> None:
        m, mode = self.model, self.config.mode
        for part in (m.feature_source, m.text_encoder, m.codec, m.vocoder):
            for module in _frozen_modules(part).values():
                module.requires_grad_(False).eval()
                if self.frozen_dtype != torch.float32 and self.device.type != "cpu":
                    module.to(dtype=self.frozen_dtype)
        unet = m.denoiser.unet
        unet.requires_grad_(mode == "synapse+unet")
        unet.train(mode == "synapse+unet")
        if m.synapse is not None:
            m.synapse.requires_grad_(False)
            m.synapse.mixer.requires_grad_(True)
            if mode in ("synapse", "synapse+unet"):
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
            unet = [p for p in m.denoiser.unet.parameters() if p.requires_grad]
        groups = []
        for name, params, lr, wd in (("alphas", alphas, o.alpha_lr, 0.0), ("synapse", others, o.synapse_lr,
                                                                            o.weight_decay),
                                     ("unet", unet, o.unet_lr, o.weight_decay)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": name})
        if not groups:
            raise ValueError(f"mode: {self.config.mode!r} leaves nothing to train for this model")
        return torch.optim.AdamW(groups, betas=o.betas, eps=o.eps)

    def _build_schedule(self) -> None:
        c, m = self.config, self.model
        schedule = noise_schedule(m.denoiser)
        if c.prediction_type is not None:
            schedule["prediction_type"] = c.prediction_type
        self.prediction_type = schedule["prediction_type"]
        self.alphas_cumprod = make_scheduler("ddpm", **schedule).alphas_cumprod.to(self.device, torch.float64)
        seconds = c.data.seconds or m.config.sampling.seconds
        height, _ = m.latent_hw(seconds, "data.seconds")
        self.mel_frames = height * getattr(m.codec, "downsample", 1)
        self.seconds = seconds
        from ..datasets.mel import MelFrontEnd

        self.front_end = MelFrontEnd(sample_rate=m.config.sample_rate, hop_length=m.config.hop_length,
                                     n_mels=m.config.n_mels)
        if m.synapse is not None and c.image_features == "inverted":
            grid = make_scheduler("ddim", **schedule)
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
        image_size = getattr(self.model.feature_source, "resolution", None) if needs_image else None
        self.dataset = TripletDataset(self.rows, sample_rate=self.model.config.sample_rate, seconds=self.seconds,
                                      image_size=image_size, random_crop=c.data.random_crop, seed=c.seed)

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
        mel = self.front_end.batch(audio.to(self.device))  # (batch, frames, mels)
        frames = mel.shape[1]
        if frames >= self.mel_frames:
            mel = mel[:, : self.mel_frames]
        else:  # pad with the log floor (silence)
            pad = mel.new_full((mel.shape[0], self.mel_frames - frames, mel.shape[2]), math.log(self.front_end.log_floor))
            mel = torch.cat([mel, pad], dim=1)
        codec = self.model.codec
        params = [p for module in _frozen_modules(codec).values() for p in module.parameters()]
        dtype = params[0].dtype if params else torch.float32
        with torch.no_grad():
            return codec.encode(mel[:, None].to(dtype)).float()

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
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32)
        drop_text = torch.rand(b, generator=gen) < c.text_dropout
        drop_image = torch.rand(b, generator=gen) < c.image_dropout
        texts = ["" if d else text for d, text in zip(drop_text.tolist(), batch["text"], strict=True)]
        with torch.no_grad():
            emb, mask = m.text_encoder(texts)
        t_dev, noise = t.to(self.device), noise.to(self.device)
        a = self.alphas_cumprod[t_dev].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).float()
        target = noise if self.prediction_type == "epsilon" else (a.sqrt() * noise - (1 - a).sqrt() * latents).float()
        image_kv, rows = None, None
        if m.synapse is not None:
            if batch.get("image") is None:
                raise ValueError("data.manifest: the synapse needs an image for every row")
            image_kv = self._image_kv(batch["image"], t, gen)
            rows = (~drop_image).to(self.device)
        unet_dtype = m.denoiser.unet.dtype
        pred = self.wrapped(noisy.to(unet_dtype), t_dev, emb.to(self.device, unet_dtype), mask.to(self.device),
                            image_kv, rows).float()
        per_sample = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.ndim)))
        if c.min_snr_gamma is not None:
            snr = (a / (1 - a)).view(-1).float()
            clipped = snr.clamp(max=c.min_snr_gamma)
            weight = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)
            per_sample = per_sample * weight
        return per_sample.mean()

    # -- the loop -----------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, resume: bool | str | Path = False) -> TrainResult:
        """Run until ``max_steps`` (default: the config's); ``resume``: True (the latest checkpoint) or a path."""
        from tqdm.auto import tqdm

        c, acc = self.config, self.accelerator
        max_steps = int(max_steps or c.max_steps)
        if resume:
            path = latest_checkpoint(self.checkpoint_dir) if resume is True else Path(resume)
            if path is None:
                raise FileNotFoundError(f"resume: no checkpoint in {str(self.checkpoint_dir)!r}")
            self.load_state(path)
        elif self.step == 0 and latest_checkpoint(self.checkpoint_dir) is not None:
            raise FileExistsError(f"output: {str(self.output)!r} already holds checkpoints of a run; pass "
                                  "--resume (resume=True) to continue it, or choose another output folder")
        log = TrainingLog(self.output, enabled=acc.is_main_process, tensorboard=c.tensorboard, plot=c.plot)
        log.truncate_after(self.step)
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            c.save(self.output / "train_config.yaml")
        losses: list[float] = []
        last_ckpt = latest_checkpoint(self.checkpoint_dir) if resume else None
        loader = self._loader(self.step * c.gradient_accumulation_steps)
        bar = tqdm(total=max_steps, initial=self.step, desc="train", disable=not (c.progress and acc.is_main_process),
                   dynamic_ncols=True)
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
        model_path = self.save_model() if acc.is_main_process else None
        acc.wait_for_everyone()
        return TrainResult(step=self.step, output=self.output, model_path=model_path, last_checkpoint=last_ckpt,
                           losses=losses)

    def optimizer_step(self, loader: Iterator[dict], trained: dict[str, torch.Tensor],
                       last_checkpoint: Path | None = None) -> tuple[float, float | None]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches: ``(mean loss, grad norm)``."""
        c, acc = self.config, self.accelerator
        total = torch.zeros((), device=self.device)
        for micro in range(c.gradient_accumulation_steps):
            batch = next(loader)
            last = micro == c.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.wrapped):
                loss = self._micro_loss(batch, self.step, micro) / c.gradient_accumulation_steps
                acc.backward(loss)
            total += loss.detach()
        mean_loss = float(acc.reduce(total, reduction="mean"))  # the same on every process
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"; the last good checkpoint is {str(last_checkpoint)!r}" if last_checkpoint else ""
            raise NonFiniteLossError(
                f"training: the loss is {mean_loss} at step {self.step + 1}{where}. Lower the learning "
                "rates (optim.*_lr), try mixed_precision: bf16 instead of fp16, or check the data.")
        grad_norm = None
        if c.optim.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(list(trained.values()), c.optim.max_grad_norm))
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(trained, self.step)
        return mean_loss, grad_norm

    def _lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    def _alphas(self) -> list[float]:
        syn = self.model.synapse
        if syn is None:
            return []
        try:
            a = syn.mixer.alphas().detach().float().cpu()
        except Exception:  # a mixer whose weights depend on the input
            return []
        return a.reshape(a.shape[0], -1).mean(dim=1).tolist()

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        opt_tensors, opt_meta = optimizer_state_to_files(self.optimizer)
        tensors = {"trainable": {k: v.detach() for k, v in self._trained().items()}, "optimizer": opt_tensors}
        if self.ema is not None:
            tensors["ema"] = dict(self.ema.shadow)
        state = {
            "step": self.step,
            "world_size": self.accelerator.num_processes,
            "batch_size": self.config.batch_size,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "seed": self.config.seed,
            "mode": self.config.mode,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "optimizer": opt_meta,
            "rows": len(self.rows),
            "format": "melfusion-train-checkpoint",
            "version": 1,
        }
        return tensors, state

    def save_state(self) -> Path | None:
        """Write a checkpoint of this step (main process), keeping the last ``keep_last``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            tensors, state = self.state_tensors()
            path = save_checkpoint(self.checkpoint_dir, self.step, tensors, state, keep_last=self.config.keep_last)
        acc.wait_for_everyone()
        return path or self.checkpoint_dir / f"step-{self.step:08d}"

    def load_state(self, path: str | Path) -> None:
        tensors, state = load_checkpoint(path)
        if state.get("format") != "melfusion-train-checkpoint":
            raise OSError(f"resume: {str(path)!r} is not a melfusion training checkpoint")
        for key in ("mode", "seed", "batch_size", "gradient_accumulation_steps"):
            if state.get(key) != getattr(self.config, key):
                raise ValueError(f"resume: the checkpoint was written with {key}={state.get(key)!r}, this run has "
                                 f"{getattr(self.config, key)!r}; resuming would not continue the same run")
        if state.get("world_size") != self.accelerator.num_processes:
            warnings.warn(f"resume: the checkpoint was written by {state.get('world_size')} processes, this run has "
                          f"{self.accelerator.num_processes}: the data order will differ from an uninterrupted run",
                          stacklevel=2)
        trained = self._trained()
        saved = tensors.get("trainable", {})
        missing, unexpected = sorted(set(trained) - set(saved)), sorted(set(saved) - set(trained))
        if missing or unexpected:
            raise ValueError(f"resume: checkpoint parameters do not match this model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        with torch.no_grad():
            for k, p in trained.items():
                p.copy_(saved[k].to(p.device, p.dtype))
        optimizer_state_from_files(self.optimizer, tensors.get("optimizer", {}), state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            if "ema" not in tensors:
                raise ValueError(f"resume: {str(path)!r} has no EMA weights but ema.enabled is true")
            self.ema.shadow = {k: v.float().to(self.device) for k, v in tensors["ema"].items()}
        self.step = int(state["step"])

    def save_model(self, path: str | Path | None = None) -> Path:
        """``save_pretrained`` of the trained model (the EMA weights when an average is kept)."""
        path = Path(path or self.output / "model")
        if self.ema is None:
            return self.model.save_pretrained(path)
        with self.ema.swapped_into(self._trained()):
            return self.model.save_pretrained(path)



def train(config: TrainConfig | str | Path, *, manifest: str | None = None, output: str | None = None,
          max_steps: int | None = None, resume: bool | str | Path = False, **overrides: Any) -> TrainResult:
    """Train from a :class:`TrainConfig` or a YAML/JSON file; the keyword arguments override its fields."""
    fields = {"data.manifest": manifest, "output": output, "max_steps": max_steps, **overrides}
    if isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config.model_dump(mode="json"), **fields)
    else:
        config = TrainConfig.load(config, **fields)
    return Trainer(config).train(resume=resume)
