"""The sampling side of the pipeline: schedulers, the image timesteps of each music step, the denoising loop.

The loop uses only diffusers' scheduler API (``set_timesteps``, ``scale_model_input``, ``step``), so any
scheduler of the denoiser's noise-schedule family works (``melfusion.schedules``).

**Image features at the music model's noise level.** The image features of music step ``i`` are taken at the
image timestep of equal signal-to-noise ratio::

    t_img(i) = argmin_t | log SNR_img(t) - log SNR_music(i) |,    SNR_img(t) = a_t / (1 - a_t)

with ``a_t`` the image schedule's cumulative alphas and ``SNR_music`` from the music scheduler (ddpm family:
its own ``a_t``; edm: ``sigma_data**2 / sigma**2``; flow: ``((1 - s) / s)**2``). When both models share a
schedule, as in the paper (Stable Diffusion's for both), ``t_img(i)`` is the music timestep itself.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .checks import positive_int
from .schedules import NoiseSchedule, same_ddpm_schedule, snr_to_timesteps, step_snr

__all__ = ["make_scheduler", "noise_schedule", "image_timesteps", "cap_timesteps", "music_to_image_timesteps",
           "denoise", "StepCallback"]

#: ``callback_on_step_end(model, step, timestep, tensors) -> dict``: called after each step with
#: ``tensors = {"latents": ...}``; a returned ``"latents"`` replaces the latents, a true ``"stop"`` ends the loop
StepCallback = Callable[[Any, int, Any, dict[str, torch.Tensor]], dict[str, Any] | None]


def make_scheduler(name: str | type = "ddim", prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear",
                   beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                   schedule: NoiseSchedule | None = None):
    """A diffusers scheduler by name or class for a training schedule (default: Stable Diffusion's betas).

    ``schedule`` (a :class:`~melfusion.schedules.NoiseSchedule`, e.g. a denoiser's ``noise_schedule``)
    replaces the beta arguments and allows the edm and flow families.
    """
    if schedule is None:
        schedule = NoiseSchedule.ddpm(prediction_type, num_train_timesteps, beta_start, beta_end, beta_schedule)
    return schedule.make_scheduler(name)


def noise_schedule(denoiser: Any) -> dict[str, Any]:
    """The ddpm-family schedule of ``denoiser`` as ``make_scheduler`` keyword arguments (the earlier API; new
    code reads ``denoiser.noise_schedule``, a :class:`~melfusion.schedules.NoiseSchedule`)."""
    schedule = denoiser.noise_schedule
    if schedule.family != "ddpm":
        return {"schedule": schedule}
    return {"prediction_type": schedule.prediction_type, **dict(schedule.params)}


def image_timesteps(timesteps: torch.Tensor | Sequence[int], image_steps: int | None) -> list[int]:
    """``image_steps`` of the ``timesteps``, evenly spread and including both ends (None: all)."""
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if image_steps is None or image_steps >= len(ts):
        return ts
    image_steps = positive_int(image_steps, "image_steps")
    index = np.unique(np.round(np.linspace(0, len(ts) - 1, image_steps)).astype(int))
    return [ts[i] for i in index]


def cap_timesteps(timesteps: Sequence[int], cap: int | None) -> list[int]:
    """The image timesteps at or below ``cap`` (None: all); the smallest one if none is.

    The feature cache answers each music timestep with its nearest image timestep, so music steps above
    the cap get the features at the largest timestep kept.
    """
    ts = [int(t) for t in timesteps]
    if cap is None or not ts:
        return ts
    kept = [t for t in ts if t <= cap]
    return kept or [min(ts)]


def music_to_image_timesteps(music: NoiseSchedule, scheduler: Any, image: NoiseSchedule) -> list[int]:
    """The image timestep of equal SNR to each of ``scheduler.timesteps`` (see the module doc)."""
    if same_ddpm_schedule(music, image):
        return [int(t) for t in torch.as_tensor(scheduler.timesteps).reshape(-1).tolist()]  # the same schedule
    return snr_to_timesteps(step_snr(music, scheduler), image.alphas_cumprod()).tolist()


def _step_kwargs(scheduler: Any, generator: Any) -> dict[str, Any]:
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted and generator is not None else {}


def check_latents(latents: Any, shape: tuple[int, ...], name: str = "latents") -> torch.Tensor:
    """``latents`` as given, if it is a dense, real floating tensor of ``shape`` holding finite values."""
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got {type(latents).__name__}")
    if latents.layout != torch.strided or latents.is_meta:
        raise ValueError(f"{name}: expected a dense tensor with data, got a {latents.layout} tensor on "
                         f"{latents.device}")
    if not latents.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating tensor, got {latents.dtype}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"{name}: expected a tensor of shape {tuple(shape)}, got {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(f"{name}: NaN or infinite values")
    return latents


def check_callback(callback: Any) -> StepCallback | None:
    if callback is not None and not callable(callback):
        raise ValueError(f"callback_on_step_end: expected a function, got {type(callback).__name__}")
    return callback


_CALLBACK_KEYS = {"latents", "stop"}


def denoise(model: Any, latents: torch.Tensor, scheduler: Any, predict: Callable[[torch.Tensor, Any, int],
            torch.Tensor], *, generator: Any = None, callback: StepCallback | None = None,
            progress: bool = True, on_nonfinite: Callable[[int, Any], Exception] | None = None,
            model_timesteps: Sequence[Any] | None = None) -> torch.Tensor:
    """The denoising loop: ``latents <- scheduler.step(predict(scale_model_input(latents, t), t_model, i), t,
    latents)``.

    ``predict(x, t_model, i)`` returns the guided model output for step ``i``; ``t_model`` is
    ``model_timesteps[i]`` (the model's own noise conditioning, see ``NoiseSchedule.model_timesteps``), else the
    scheduler's timestep. ``callback`` (diffusers' ``callback_on_step_end`` convention) may replace the latents
    (``{"latents": x}``) or stop the loop early (``{"stop": True}``).
    """
    with warnings.catch_warnings():
        # diffusers' cosine DPM-Solver asks its Brownian tree (torchsde) for the final sigma 0, below the tree's
        # sigma_min, at the last step (and float32 sigma_max a hair above it); torchsde warns each time, harmlessly
        warnings.filterwarnings("ignore", message=r"Should have t[ab][<>]=t[01]", category=UserWarning)
        return _denoise(model, latents, scheduler, predict, generator, callback, progress, on_nonfinite,
                        model_timesteps)


def _denoise(model, latents, scheduler, predict, generator, callback, progress, on_nonfinite, model_timesteps):
    from tqdm.auto import tqdm

    from .progress import show_progress

    kwargs = _step_kwargs(scheduler, generator)
    scale = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers take the latents as they are
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="melfusion", disable=not show_progress(progress), leave=False)):
        x = scale(latents, t) if scale is not None else latents
        pred = predict(x, model_timesteps[i] if model_timesteps is not None else t, i)
        latents = scheduler.step(pred, t, latents, **kwargs).prev_sample
        if not bool(torch.isfinite(latents).all()) and on_nonfinite is not None:
            raise on_nonfinite(i, t)
        if callback is not None:
            result = callback(model, i, t, {"latents": latents})
            if result is None:
                continue
            if not isinstance(result, dict):
                raise ValueError(f"callback_on_step_end: expected None or a dict with 'latents' and/or 'stop', "
                                 f"got {type(result).__name__} at step {i}")
            unknown = sorted(set(map(str, result)) - _CALLBACK_KEYS)
            if unknown:
                raise ValueError(f"callback_on_step_end: unknown keys {unknown} at step {i}; it may return "
                                 f"'latents' and 'stop'")
            if result.get("latents") is not None:
                new = check_latents(result["latents"], tuple(latents.shape),
                                    f"callback_on_step_end: the latents returned at step {i}")
                latents = new.to(latents.device, latents.dtype)
            stop = result.get("stop", False)
            if not isinstance(stop, bool):
                raise ValueError(f"callback_on_step_end: 'stop' must be True or False, got {stop!r}")
            if stop:
                break
    return latents
