"""Train a small image latent diffusion model from scratch: the feature source of the ``mini`` preset.

Two stages on a stack of images, both seeded and deterministic on the CPU:

1. :func:`train_image_vae`: the feature source's ``AutoencoderKL`` as an autoencoder on its posterior means
   (mean squared reconstruction error plus a small penalty on the latents' size; the feature source only
   ever reads the means, ``latent_dist.mode()``), then its ``scaling_factor`` set so that scaled latents
   have unit standard deviation, as Stable Diffusion's 0.18215 does for its VAE.
2. :func:`train_image_unet`: the feature source's UNet on those latents with the epsilon loss on the
   feature source's own noise schedule, conditioned on its empty-prompt embedding (the only prompt
   MeLFusion ever gives the image model).

The feature source then yields decoder self-attention keys and values of a model that has learned these
images, which is what Algorithm 2 reads. Frozen afterwards, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..checks import finite_float, non_finite_names, positive_int

__all__ = ["load_images", "train_image_vae", "train_image_unet"]


def load_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """``(n, 3, size, size)`` float tensor in [0, 1] from image files (any PIL mode; centre-cropped square)."""
    from ..datasets.triplets import square_image
    from ..images import open_image

    out = []
    for path in paths:
        image = square_image(open_image(path, name=str(path)), size)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    if not out:
        raise ValueError("paths: no images given")
    return torch.stack(out)


def _batches(n: int, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos: pos + min(batch, n)]
        pos += batch


def _progress(steps: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    from ..progress import show_progress

    return tqdm(total=steps, desc=desc, disable=not show_progress(enabled), dynamic_ncols=True)


def _check_stage(steps: int, batch_size: int, lr: float, seed: int) -> None:
    positive_int(steps, "steps")
    positive_int(batch_size, "batch_size")
    finite_float(lr, "lr", low=0.0, low_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")


def _check_trained(what: str, module) -> None:
    """A stage whose weights end non-finite stops (nothing would save them, but nothing should use them)."""
    bad = non_finite_names(dict(module.named_parameters()))
    if bad:
        from .trainer import NonFiniteWeightsError

        raise NonFiniteWeightsError(f"{what}: the trained weights hold NaN or infinite values ({', '.join(bad[:3])})"
                                    "; lower lr")


def _step(what: str, loss: torch.Tensor, module, opt, sched, losses: list[float], bar) -> None:
    """One optimizer step with gradient clipping; a non-finite loss stops the stage, naming the step."""
    if not torch.isfinite(loss):
        from .trainer import NonFiniteLossError

        raise NonFiniteLossError(f"{what}: the loss is {loss.item()} at step {len(losses) + 1}; lower lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    bar.update(1)
    bar.set_postfix(loss=f"{losses[-1]:.4f}")


def train_image_vae(feature_source, images: torch.Tensor, *, steps: int = 600, batch_size: int = 32,
                    lr: float = 2e-3, latent_weight: float = 1e-4, seed: int = 0, progress: bool = True
                    ) -> list[float]:
    """Fit ``feature_source.vae`` to ``images`` (``(n, 3, H, W)`` in [0, 1] at its resolution); returns losses.

    Afterwards the VAE is frozen again and its ``scaling_factor`` is ``1 / std`` of the posterior means.
    """
    vae = feature_source.vae
    if vae is None:
        raise ValueError("feature_source: has no VAE to train")
    _check_stage(steps, batch_size, lr, seed)
    finite_float(latent_weight, "latent_weight", low=0.0)
    size = feature_source.resolution
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != 3 \
            or tuple(images.shape[-2:]) != (size, size):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected (n >= 1, 3, {size}, {size}) in [0, 1], got {got}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images: hold NaN or infinite values")
    torch.manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    x_all = images * 2 - 1
    losses = []
    bar = _progress(steps, "image VAE", progress)
    for idx in _batches(len(x_all), batch_size, steps, seed):
        x = x_all[idx]
        z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + latent_weight * z.pow(2).mean()
        _step("image VAE", loss, vae, opt, sched, losses, bar)
    bar.close()
    _check_trained("image VAE", vae)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i: i + 64]).latent_dist.mode() for i in range(0, len(x_all), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std().clamp_min(1e-6)))
    return losses


def train_image_unet(feature_source, latents: torch.Tensor, *, steps: int = 1500, batch_size: int = 64,
                     lr: float = 1e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """Fit ``feature_source.unet`` to scaled clean ``latents`` (from ``feature_source.encode``); returns losses.

    Epsilon (or v, per the feature source's ``prediction_type``) loss at uniform random timesteps of the
    feature source's schedule, with its empty-prompt context; a cosine learning-rate decay.
    """
    unet = feature_source.unet
    _check_stage(steps, batch_size, lr, seed)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] == 0:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents: expected (n >= 1, channels, h, w), got {got}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents: hold NaN or infinite values")
    torch.manual_seed(seed)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    alphas = feature_source.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(seed + 2)
    losses = []
    bar = _progress(steps, "image UNet", progress)
    for idx in _batches(len(latents), batch_size, steps, seed):
        z = latents[idx].float()
        t = torch.randint(0, len(alphas), (len(idx),), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        target = noise if feature_source.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
        pred = unet(noisy, t, encoder_hidden_states=feature_source.context(len(idx)).float()).sample
        _step("image UNet", F.mse_loss(pred, target), unet, opt, sched, losses, bar)
    bar.close()
    _check_trained("image UNet", unet)
    unet.eval().requires_grad_(False)
    return losses


def copy_image_model(feature_source, source) -> None:
    """Copy the weights (UNet, VAE and the VAE's latent scaling factor) of Stable Diffusion feature source
    ``source`` into ``feature_source`` (the same architecture)."""
    feature_source.unet.load_state_dict(source.unet.state_dict())
    if feature_source.vae is not None and source.vae is not None:
        feature_source.vae.load_state_dict(source.vae.state_dict())
        feature_source.vae.register_to_config(scaling_factor=source.vae.config.scaling_factor)


def image_vae_config(feature_source, configured=None) -> dict:
    """The image VAE's config as a melfusion config stores it (``configured``, the spec's inline config, when
    given, else the VAE's own), with the VAE's current ``scaling_factor`` (a trained one must travel with it)."""
    config = dict(feature_source.vae.config) if not isinstance(configured, dict) else dict(configured)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["scaling_factor"] = float(feature_source.vae.config.scaling_factor)
    return config
