"""``MelFusion``: composes the parts; ``generate()`` is the paper's Algorithm 2.

1. encode the image and run the feature source's trajectory over the sampling
   timesteps (DDIM inversion with an empty prompt), capturing the image UNet's
   decoder self-attention keys/values per timestep; align them once to the
   music layers (the cache is reused by every step, guidance branch and sample);
2. encode the text; start the music latent from Gaussian noise;
3. at each step, the installed synapse mixes the image keys/values of that
   timestep into the music UNet's decoder cross-attention;
4. classifier-free guidance (the unconditional branch is empty text and no
   image; with ``image_guidance_scale`` a third, text-only branch), then the
   codec decodes the latent to a mel spectrogram and the vocoder makes audio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.text import check_texts
from .config import MelFusionConfig
from .images import load_images
from .synapse.features import FeatureCache
from .synapse.install import SynapseHandle, install
from .synapse.wiring import Synapse, probe_layers

__all__ = ["MelFusion", "GenerationOutput", "make_scheduler", "noise_schedule", "SCHEDULERS"]


SCHEDULERS = ("ddim", "ddpm", "dpm_solver++")


def make_scheduler(name: str, prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear",
                   beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000):
    """A diffusers scheduler by name (``ddim``, ``ddpm``, ``dpm_solver++``) for a model's training schedule.

    The defaults are Stable Diffusion's (and Tango's) schedule; a denoiser
    gives its own through its ``noise_schedule`` (AudioLDM: 0.0015 to 0.0195).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                  beta_schedule=beta_schedule, prediction_type=prediction_type)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    if name == "dpm_solver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    raise ValueError(f"scheduler: unknown scheduler {name!r}; known: ddim, ddpm, dpm_solver++")


@dataclass
class GenerationOutput:
    """``waveforms`` float32 ``(num_samples, samples)`` in [-1, 1]; ``mel`` ``(num_samples, frames, mels)``."""

    waveforms: np.ndarray
    sample_rate: int
    mel: np.ndarray
    texts: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> list[Path]:
        """Write WAV file(s): ``path`` for one sample, ``stem_i.wav`` for several."""
        import soundfile as sf

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths = [path] if len(self.waveforms) == 1 else [
            path.with_name(f"{path.stem}_{i}{path.suffix or '.wav'}") for i in range(len(self.waveforms))
        ]
        for p, wav in zip(paths, self.waveforms, strict=True):
            sf.write(str(p), wav, self.sample_rate, subtype="PCM_16")
        return paths

    def save_spectrogram(self, path: str | Path, index: int = 0) -> Path:
        """Write the mel spectrogram of sample ``index`` as a PNG (time left to right, low pitch at the bottom)."""
        from .plots import spectrogram_png

        return spectrogram_png(self.mel[index], path)


class MelFusion:
    """An image-and-text-to-music model composed from registry parts."""

    def __init__(self, config: MelFusionConfig, feature_source, denoiser, text_encoder, codec, vocoder,
                 synapse: Synapse | None):
        self.config = config
        self.feature_source = feature_source
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.codec = codec
        self.vocoder = vocoder
        self.synapse = synapse
        self._handle: SynapseHandle | None = None
        if synapse is not None:
            self._handle = install(denoiser.unet, synapse.mixer, layers=synapse.music_layer_names,
                                   which=config.synapse.music_attention)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MelFusionConfig | str, *, weights: bool = True, device: Any = None,
                    dtype: torch.dtype | None = None) -> MelFusion:
        """Build every part named in ``config`` (a config or a preset name).

        ``weights=False`` builds architectures only (random init); with
        ``device="meta"`` nothing is allocated, which is how the full-size
        ``paper`` preset is checked without its checkpoints.
        """
        if isinstance(config, str):
            config = MelFusionConfig.preset(config)
        common = dict(weights=weights, device=device, dtype=dtype)
        feature_source = config.feature_source.build(**common)
        denoiser = config.denoiser.build(**common)
        text_encoder = config.text_encoder.build(**common)
        codec = config.codec.build(**common)
        vocoder = config.vocoder.build(**common)
        synapse = None
        if config.synapse.enabled:
            synapse = cls.build_synapse(config, feature_source, denoiser, codec)
            if device is not None:
                synapse = synapse.to(device)
        return cls(config, feature_source, denoiser, text_encoder, codec, vocoder, synapse)

    @staticmethod
    def build_synapse(config: MelFusionConfig, feature_source, denoiser, codec) -> Synapse:
        syn = config.synapse
        fs_unet, music_unet = feature_source.unet, denoiser.unet
        image_names = syn.image_layers or feature_source.layer_names
        music_names = syn.music_layers or denoiser.layer_names
        latent = feature_source.latent_size
        image_layers = probe_layers(fs_unet, image_names, syn.image_attention,
                                    (fs_unet.config.in_channels, latent, latent))
        frames = int(round(config.sampling.seconds * config.sample_rate / config.hop_length))
        down = getattr(codec, "downsample", 1)
        music_layers = probe_layers(music_unet, music_names, syn.music_attention,
                                    (music_unet.config.in_channels, frames // down, config.n_mels // down))
        return Synapse(image_layers, music_layers, mixer=syn.mixer.name, aligner=syn.aligner.name,
                       mixer_params=syn.mixer.params, aligner_params=syn.aligner.params)

    # -- helpers --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.unet.parameters()).device

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    def image_features(self, images: torch.Tensor, timesteps: torch.Tensor, text_tokens: int) -> FeatureCache:
        """Captured image features for ``timesteps``, aligned to the music layers and ``text_tokens``."""
        latents = self.feature_source.encode(images)
        cache = self.feature_source.trajectory(latents, timesteps, mode=self.config.synapse.image_trajectory)
        with torch.no_grad():
            return self.synapse.align(cache, text_tokens)

    # -- Algorithm 2 --------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        image: Any = None,
        text: str | Sequence[str] = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        seed: int | None = 0,
        seconds: float | None = None,
        num_samples: int | None = None,
        scheduler: str | None = None,
        negative_text: str = "",
        progress: bool = True,
        peak_normalize: bool = True,
    ) -> GenerationOutput:
        """Music for ``image`` and ``text``; see DESIGN.md and the module docstring.

        ``peak_normalize`` scales a waveform whose peak exceeds 0.99 down to
        0.99 (off: the vocoder's output as is, e.g. for parity checks).
        """
        s = self.config.sampling
        texts = check_texts(text, "text")
        steps = _positive_int(num_inference_steps if num_inference_steps is not None else s.num_inference_steps,
                              "num_inference_steps")
        samples = _positive_int(num_samples if num_samples is not None else s.num_samples, "num_samples")
        g_text = _non_negative(guidance_scale if guidance_scale is not None else s.guidance_scale, "guidance_scale")
        g_image = image_guidance_scale if image_guidance_scale is not None else s.image_guidance_scale
        if g_image is not None:
            g_image = _non_negative(g_image, "image_guidance_scale")
        seconds = float(seconds if seconds is not None else s.seconds)
        if not seconds > 0:
            raise ValueError(f"seconds: expected a positive duration, got {seconds}")
        device = self.device
        use_image = image is not None and self.synapse is not None
        if image is not None and self.synapse is None:
            raise ValueError("image: this model has no synapse (config.synapse.enabled is false)")

        sched = make_scheduler(scheduler or s.scheduler, **noise_schedule(self.denoiser))
        sched.set_timesteps(steps, device=device)
        batch = len(texts) * samples

        # text: conditional prompts, repeated per sample, then the empty prompt; one padded batch
        prompts = [t for t in texts for _ in range(samples)]
        emb, mask = self.text_encoder(prompts + [negative_text] * batch)
        emb = emb.to(device, self.denoiser.unet.dtype)
        cond_emb, cond_mask, null_emb, null_mask = emb[:batch], mask[:batch], emb[batch:], mask[batch:]

        cache = None
        if use_image:
            images = load_images(image, "image").to(device)
            if images.shape[0] not in (1, len(texts)):
                raise ValueError(f"image: got {images.shape[0]} images for {len(texts)} texts; give 1 or one per text")
            cache = self.image_features(images, sched.timesteps, text_tokens=emb.shape[1])
            per_row = batch // images.shape[0]
            cache = cache.map(lambda _, k, v: (k.repeat_interleave(per_row, 0), v.repeat_interleave(per_row, 0)))

        # branches, concatenated on the batch axis: [empty, text (+image)] or [empty, text, text+image]
        three = use_image and g_image is not None
        branch_emb = [null_emb, cond_emb] + ([cond_emb] if three else [])
        branch_mask = [null_mask, cond_mask] + ([cond_mask] if three else [])
        rows = torch.zeros(len(branch_emb) * batch, dtype=torch.bool, device=device)
        rows[-batch:] = use_image
        emb_all, mask_all = torch.cat(branch_emb), torch.cat(branch_mask)

        frames = int(round(seconds * self.config.sample_rate / self.config.hop_length))
        down = getattr(self.codec, "downsample", 1)
        frames -= frames % (down * 2 ** (len(self.denoiser.unet.config.block_out_channels) - 1))
        if frames <= 0:
            raise ValueError(f"seconds: {seconds} s is too short for this model")
        shape = (batch, self.denoiser.in_channels, frames // down, self.config.n_mels // down)
        gen = torch.Generator(device="cpu").manual_seed(int(seed)) if seed is not None else None
        latents = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
        latents = latents * sched.init_noise_sigma

        for t in tqdm(sched.timesteps, desc="melfusion", disable=not progress, leave=False):
            x = sched.scale_model_input(latents, t)
            x = torch.cat([x] * len(branch_emb)).to(self.denoiser.unet.dtype)
            features = cache.at(t) if cache is not None else None
            if self._handle is not None:
                self._handle.set_features(features, timestep=t, image_rows=rows)
            try:
                out = self.denoiser(x, t, emb_all, mask_all).float().chunk(len(branch_emb))
            finally:
                if self._handle is not None:
                    self._handle.set_features(None)
            if three:
                pred = out[0] + g_text * (out[1] - out[0]) + g_image * (out[2] - out[1])
            else:
                pred = out[0] + g_text * (out[1] - out[0])
            latents = sched.step(pred, t, latents).prev_sample

        mel = self.codec.decode(latents.to(self.denoiser.unet.dtype)).float()
        waves = self.vocoder(mel).float().cpu().numpy()
        if peak_normalize:
            peak = np.abs(waves).max(axis=-1, keepdims=True)
            waves = np.where(peak > 0.99, waves * (0.99 / np.maximum(peak, 1e-12)), waves)
        waves = waves.astype(np.float32)
        mel_np = mel[:, 0].cpu().numpy() if mel.ndim == 4 else mel.cpu().numpy()
        return GenerationOutput(waveforms=waves, sample_rate=self.sample_rate, mel=mel_np, texts=prompts)


def noise_schedule(denoiser: Any) -> dict[str, Any]:
    """The training noise schedule of ``denoiser``: its ``noise_schedule`` dict, else SD's with its prediction type."""
    schedule = dict(getattr(denoiser, "noise_schedule", None) or {})
    schedule.setdefault("prediction_type", getattr(denoiser, "prediction_type", "epsilon"))
    schedule.setdefault("beta_schedule", getattr(denoiser, "beta_schedule", "scaled_linear"))
    return schedule


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _non_negative(value: Any, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}") from None
    if not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value}")
    return value
