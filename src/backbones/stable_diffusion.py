"""Image feature source: a frozen Stable Diffusion (1.x/2.x) UNet and VAE.

``trajectory`` DDIM-inverts the image latent with an empty prompt over the
sampling timesteps and captures the decoder self-attention keys/values:

- ``reverse`` (the paper): invert to ``z_T``, then run the deterministic
  reverse pass from ``z_T`` and capture at each timestep;
- ``inversion``: capture during the inversion itself (half the UNet calls);
- ``noise``: forward-noise the clean latent to each timestep (one call per
  step, no inversion; the released code's inference feeds random latents).

Both ``epsilon`` and ``v_prediction`` models are handled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn import functional as F

from ..interfaces import FeatureSource, LayerInfo
from ..registry import register
from ..schedules import NoiseSchedule, ddpm_alphas_cumprod
from ..synapse.features import FeatureCache
from ..synapse.install import capture, decoder_layers, layer_info, transformer_layers
from .loading import build_model

__all__ = ["StableDiffusionFeatureSource", "ddim_alphas"]

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 32],
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 64,
}


def ddim_alphas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                schedule: str = "scaled_linear") -> torch.Tensor:
    """Cumulative alpha products of the training noise schedule (float64)."""
    return ddpm_alphas_cumprod(num_train_timesteps, beta_start, beta_end, schedule)


@register("feature_source", "stable_diffusion")
class StableDiffusionFeatureSource(FeatureSource):
    """Stable Diffusion UNet + VAE as a source of decoder self-attention features."""

    def __init__(
        self,
        unet: Mapping[str, Any],
        vae: Mapping[str, Any] | None = None,
        resolution: int = 768,
        layers: Sequence[str] | None = None,
        prediction_type: str | None = None,
        beta_schedule: str = "scaled_linear",
        null_text_tokens: int = 77,
        weights: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution: expected a positive multiple of 8, got {resolution}")
        self.resolution = resolution
        self.unet: UNet2DConditionModel = build_model(
            UNet2DConditionModel, unet, "feature_source.unet", weights=weights, device=device, dtype=dtype
        ).requires_grad_(False)
        self.mark_published("unet", unet, weights)
        self.vae: AutoencoderKL | None = None
        if vae is not None:
            self.vae = build_model(
                AutoencoderKL, vae, "feature_source.vae", weights=weights, device=device, dtype=dtype, tiny=TINY_VAE
            ).requires_grad_(False)
            self.mark_published("vae", vae, weights)
        self.layer_names = list(layers) if layers is not None else decoder_layers(self.unet)
        self.prediction_type = prediction_type or "epsilon"
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.beta_schedule = beta_schedule
        self.alphas_cumprod = ddim_alphas(schedule=beta_schedule)
        # the empty prompt's embedding; zeros unless a text encoder's output is set (SD: CLIP of "")
        self.null_text = torch.zeros(1, null_text_tokens, self.unet.config.cross_attention_dim)

    @property
    def layers(self) -> list[LayerInfo]:
        names = self.layer_names
        return [replace(layer_info(self.unet, name, "attn1"), depth=i / max(1, len(names) - 1))
                for i, name in enumerate(names)]

    def select_layers(self, names: Sequence[str]) -> None:
        names = list(names)
        for name in names:
            layer_info(self.unet, name, "attn1")  # a ValueError naming `layers` for an unknown one
        self.layer_names = names

    def available_layers(self) -> list[str]:
        """Every transformer layer of the image UNet (encoder, middle, decoder), in forward order."""
        return transformer_layers(self.unet)

    def probe_layers(self) -> list[LayerInfo]:
        from ..synapse.wiring import probe_layers

        size = self.latent_size
        infos = probe_layers(self.unet, self.layer_names, "attn1", (self.unet.config.in_channels, size, size))
        return [replace(info, depth=layer.depth) for info, layer in zip(infos, self.layers, strict=True)]

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.ddpm(self.prediction_type, beta_schedule=self.beta_schedule)

    def stored_modules(self) -> dict[str, torch.nn.Module]:
        return {name: m for name, m in (("unet", self.unet), ("vae", self.vae)) if m is not None}

    @property
    def latent_size(self) -> int:
        """Side of the (square) latent that ``encode`` returns."""
        if self.vae is None:
            size = self.unet.config.sample_size
            return size if isinstance(size, int) else size[0]
        return self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def cache_key(self) -> tuple:
        return (id(self), self.resolution, str(self.dtype), str(self.device), self.prediction_type)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` in [0, 1] -> latents at ``resolution / 8`` (or the VAE's factor)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (batch, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        x = (x * 2 - 1).to(self.dtype)
        if self.vae is None:  # no VAE: the resized image itself, channel-padded to the UNet's input
            x = F.adaptive_avg_pool2d(x, self.latent_size)
            return F.pad(x, (0, 0, 0, 0, 0, self.unet.config.in_channels - 3))
        latents = self.vae.encode(x).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def _eps_x0(self, latents, t: int, alpha_t: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.unet(latents, t, encoder_hidden_states=context).sample.to(torch.float64)
        x = latents.to(torch.float64)
        a, s = alpha_t.sqrt(), (1 - alpha_t).sqrt()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - s * eps) / a
        else:
            eps = a * out + s * x
            x0 = a * x - s * out
        return eps, x0

    def _check_timesteps(self, timesteps: torch.Tensor | Sequence[int]) -> list[int]:
        ts = sorted({int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()})
        if not ts:
            raise ValueError("timesteps: empty")
        if ts[0] < 0 or ts[-1] >= len(self.alphas_cumprod):
            raise ValueError(
                f"timesteps: expected values in [0, {len(self.alphas_cumprod) - 1}], got {ts[0]}..{ts[-1]}"
            )
        return ts

    def context(self, batch: int) -> torch.Tensor:
        """The empty prompt's embedding for ``batch`` rows, as the image UNet takes it."""
        return self._context(batch)

    def _context(self, batch: int) -> torch.Tensor:
        return self.null_text.to(self.device, self.dtype).expand(batch, -1, -1)

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, timesteps: torch.Tensor | Sequence[int],
               on_step: Callable[[int], None] | None = None,
               latents_out: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """DDIM inversion with the empty prompt: clean ``latents`` -> the noisy latent at the largest timestep.

        Deterministic (eta 0); computed in float64 between UNet calls.
        ``on_step(t)`` is called after the UNet evaluation at each timestep
        (in increasing order), e.g. to read captured features; ``latents_out``,
        when given, receives the inverted latent at each timestep.
        """
        ts = self._check_timesteps(timesteps)
        alphas = self.alphas_cumprod.to(latents.device)
        context = self._context(latents.shape[0])
        x = latents.to(torch.float64)
        alpha_prev = torch.tensor(1.0, dtype=torch.float64, device=latents.device)
        for t in ts:  # clean -> noisy
            eps, _ = self._eps_x0(x.to(self.dtype), t, alphas[t], context)
            if on_step is not None:
                on_step(t)
            x0 = (x - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
            x = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
            alpha_prev = alphas[t]
            if latents_out is not None:
                latents_out[t] = x.to(torch.float32)
        return x

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, timesteps: torch.Tensor | Sequence[int],
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Deterministic DDIM from noisy ``latents`` at the largest timestep down to a clean latent.

        The exact reverse of :meth:`invert` on the same timesteps, up to the
        inversion's approximation (the noise prediction at step ``t`` is
        taken at the previous latent). ``on_step(t)`` is called after each
        UNet evaluation, in decreasing ``t``.
        """
        ts = self._check_timesteps(timesteps)
        alphas = self.alphas_cumprod.to(latents.device)
        context = self._context(latents.shape[0])
        x = latents.to(torch.float64)
        for i, t in enumerate(reversed(ts)):  # noisy -> clean
            eps, x0 = self._eps_x0(x.to(self.dtype), t, alphas[t], context)
            if on_step is not None:
                on_step(t)
            prev = ts[len(ts) - 2 - i] if i < len(ts) - 1 else None
            a_prev = alphas[prev] if prev is not None else torch.ones((), dtype=torch.float64, device=x.device)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x

    def add_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean ``latents`` to per-sample ``timesteps`` ``(batch,)`` (float64 arithmetic)."""
        a = self.alphas_cumprod.to(latents.device)[timesteps.long().to(latents.device)].view(-1, 1, 1, 1)
        x = a.sqrt() * latents.to(torch.float64) + (1 - a).sqrt() * noise.to(latents.device, torch.float64)
        return x.to(self.dtype)

    @torch.no_grad()
    def features_at(self, latents: torch.Tensor, timesteps: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One image-UNet pass on noisy ``latents`` at per-sample ``timesteps``: ``{layer: (keys, values)}``.

        This is what training uses: each sample's features come from its own
        timestep (``latents`` are forward-noised or taken from an inversion
        trajectory by the caller).
        """
        timesteps = torch.as_tensor(timesteps, device=self.device).reshape(-1)
        if timesteps.numel() not in (1, latents.shape[0]):
            raise ValueError(f"timesteps: expected 1 or {latents.shape[0]} values, got {timesteps.numel()}")
        handle = capture(self.unet, self.layer_names, which="attn1")
        try:
            self.unet(latents.to(self.device, self.dtype), timesteps, encoder_hidden_states=self._context(latents.shape[0]))
            return dict(handle.records)
        finally:
            handle.remove()

    @torch.no_grad()
    def inversion_latents(self, latents: torch.Tensor, timesteps: torch.Tensor | Sequence[int]) -> dict[int, torch.Tensor]:
        """The DDIM-inversion trajectory of clean ``latents``: ``{t: noisy latent at t}`` for each of ``timesteps``."""
        ts = self._check_timesteps(timesteps)
        out: dict[int, torch.Tensor] = {}
        self.invert(latents, ts, latents_out=out)
        return out

    def unet_evaluations(self, steps: int, mode: str = "reverse") -> int:
        """Image-UNet evaluations that :meth:`trajectory` makes for ``steps`` timesteps."""
        return self.evaluations(steps, mode)

    def evaluations(self, steps: int, mode: str = "reverse") -> int:
        from ..registry import registry

        return registry("trajectory").build(mode).evaluations(steps)

    @torch.no_grad()
    def evaluate(self, latents: torch.Tensor, t: int) -> torch.Tensor:
        """One image-UNet evaluation of noisy ``latents`` at timestep ``t`` with the empty prompt (features are
        captured by whatever capture is installed); returns the UNet output."""
        return self.unet(latents.to(self.device, self.dtype), t, encoder_hidden_states=self._context(latents.shape[0])).sample

    @torch.no_grad()
    def trajectory(self, latents: torch.Tensor, timesteps: torch.Tensor | Sequence[int],
                   mode: str = "reverse", transform: Callable[[int, dict], dict] | None = None) -> FeatureCache:
        """Features of ``latents`` at each of ``timesteps`` (see the module doc for ``mode``, a name of the
        ``trajectory`` registry).

        ``transform(t, features) -> features`` is applied to each timestep's
        captured ``{layer: (keys, values)}`` as soon as it is captured (the
        pipeline aligns them to the music layers there, so only the small
        aligned tensors are kept).
        """
        from ..registry import registry

        try:
            walk = registry("trajectory").build(mode)
        except KeyError as exc:  # an unknown name: the registry's message lists the known modes
            raise ValueError(f"mode: {exc}") from None
        ts = self._check_timesteps(timesteps)
        cache = FeatureCache()
        handle = capture(self.unet, self.layer_names, which="attn1")

        def keep(t: int) -> None:
            records = dict(handle.records)
            cache.add(t, transform(t, records) if transform is not None else records)
            handle.clear()

        try:
            walk.run(self, latents, ts, keep)
            return cache
        finally:
            handle.remove()
