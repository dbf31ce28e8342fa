"""Noise-schedule families: how a denoiser was trained, which diffusers schedulers may sample it, and the
signal-to-noise ratio (SNR) that lets two models with different schedules meet at the same noise level.

Three families cover the music models in diffusers:

- ``ddpm``: discrete betas (Stable Diffusion, Tango, AudioLDM). ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e``
  with ``a_t`` the cumulative product of ``1 - beta``; ``SNR(t) = a_t / (1 - a_t)``. Predicts ``epsilon``
  or ``v_prediction``.
- ``edm``: continuous sigmas, variance exploding (Stable Audio Open). ``x = x_0 + sigma e``, the model
  sees ``c_in(sigma) x`` and is preconditioned as in Karras et al. (2022); ``SNR(sigma) = sigma_data**2 /
  sigma**2``. Predicts ``epsilon`` or ``v_prediction`` (the preconditioned output).
- ``flow``: rectified flow (ACE-Step, Stable Audio 3). ``x = (1 - s) x_0 + s e``, the model predicts the
  velocity ``e - x_0``; ``SNR(s) = ((1 - s) / s)**2``.

The sampling loop uses only diffusers' scheduler API (``set_timesteps``, ``scale_model_input``, ``step``);
:meth:`NoiseSchedule.make_scheduler` builds any scheduler the family allows, by name or class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .scheduler_names import SCHEDULER_NAMES

__all__ = ["NoiseSchedule", "FAMILIES", "SCHEDULER_NAMES", "snr_to_timesteps", "step_snr", "ddpm_alphas_cumprod",
           "same_ddpm_schedule"]

FAMILIES = ("ddpm", "edm", "flow")
#: how an edm-family model sees its noise level (see NoiseSchedule.edm)
NOISE_CONDITIONINGS = ("atan", "log")
#: schedulers that look like a family by their settings but sample something else (consistency models: their
#: own timestep convention and clipping) or whose step needs more than the denoiser's output (inpainting)
NOT_SAMPLERS = {"CMStochasticIterativeScheduler": "a consistency-model sampler",
                "RePaintScheduler": "an inpainting sampler (its step needs an image and a mask)"}
MAX_STEPS = 10_000

# the ddpm family's settings a scheduler's config takes
_DDPM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                        beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """Cumulative alpha products of a DDPM training schedule (float64), as diffusers' schedulers compute them."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule: expected 'scaled_linear' or 'linear', got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class NoiseSchedule:
    """A model's training noise schedule: its family, prediction type and the family's parameters.

    ``params`` holds the family's settings: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule`` (ddpm); ``sigma_min``, ``sigma_max``, ``sigma_data``, ``sigma_schedule`` (edm);
    ``shift`` (flow). ``default_scheduler`` is the short name (see :data:`SCHEDULER_NAMES`) generation uses
    when none is asked for.
    """

    family: str = "ddpm"
    prediction_type: str = "epsilon"
    params: Mapping[str, Any] = field(default_factory=dict)
    default_scheduler: str | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {self.family!r}")
        allowed = {"ddpm": ("epsilon", "v_prediction"), "edm": ("epsilon", "v_prediction"),
                   "flow": ("flow",)}[self.family]
        if self.prediction_type not in allowed:
            raise ValueError(f"prediction_type: the {self.family} family takes {', '.join(allowed)}, "
                             f"got {self.prediction_type!r}")

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def ddpm(cls, prediction_type: str = "epsilon", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
             beta_end: float = 0.012, beta_schedule: str = "scaled_linear", default_scheduler: str = "ddim"
             ) -> NoiseSchedule:
        """A discrete-beta schedule; the defaults are Stable Diffusion's (and Tango's)."""
        return cls("ddpm", prediction_type, dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                                 beta_end=beta_end, beta_schedule=beta_schedule), default_scheduler)

    @classmethod
    def edm(cls, prediction_type: str = "v_prediction", sigma_min: float = 0.3, sigma_max: float = 500.0,
            sigma_data: float = 1.0, sigma_schedule: str = "exponential",
            default_scheduler: str = "cosine_dpm_solver", noise_conditioning: str = "atan") -> NoiseSchedule:
        """A continuous-sigma schedule; the defaults are Stable Audio Open's.

        ``noise_conditioning`` is how the model was trained to see its noise level: ``"atan"``
        (``atan(sigma) * 2 / pi``, Stable Audio's cosine schedule) or ``"log"`` (``0.25 * ln(sigma)``, Karras et
        al.'s EDM). Generation and training give the model that, whichever scheduler of the family samples.
        """
        if noise_conditioning not in NOISE_CONDITIONINGS:
            raise ValueError(f"noise_conditioning: expected one of {', '.join(NOISE_CONDITIONINGS)}, "
                             f"got {noise_conditioning!r}")
        return cls("edm", prediction_type, dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                                                sigma_schedule=sigma_schedule, noise_conditioning=noise_conditioning),
                   default_scheduler)

    @classmethod
    def flow(cls, shift: float = 1.0, num_train_timesteps: int = 1000,
             default_scheduler: str = "flow_euler") -> NoiseSchedule:
        """Rectified flow (velocity prediction)."""
        return cls("flow", "flow", dict(shift=shift, num_train_timesteps=num_train_timesteps), default_scheduler)

    def with_prediction(self, prediction_type: str) -> NoiseSchedule:
        return replace(self, prediction_type=prediction_type)

    # -- schedulers ---------------------------------------------------------------------
    @property
    def scheduler_names(self) -> list[str]:
        """The short scheduler names this family takes (classes of the family are accepted too)."""
        return list(SCHEDULER_NAMES[self.family])

    def make_scheduler(self, scheduler: str | type | None = None, **overrides: Any):
        """A diffusers scheduler of this family, configured for this schedule.

        ``scheduler``: a short name (``ddim``, ``dpm_solver++``, ``cosine_dpm_solver``...), a diffusers
        scheduler class, or its class name; None: :attr:`default_scheduler`. A scheduler of another family is
        refused with a ``ValueError`` naming ``scheduler``.
        """
        import diffusers

        choice = scheduler if scheduler is not None else (self.default_scheduler or self.scheduler_names[0])
        names = SCHEDULER_NAMES[self.family]
        if isinstance(choice, str):
            class_name = names.get(choice, choice)
            if class_name in NOT_SAMPLERS:
                raise ValueError(f"scheduler: {class_name} is {NOT_SAMPLERS[class_name]}, not a sampler melfusion "
                                 f"can drive; known: {', '.join(names)}")
            cls = getattr(diffusers, class_name, None) if class_name.endswith("Scheduler") else None
            if cls is None:
                known = ", ".join(names)
                other = [f for f, table in SCHEDULER_NAMES.items() if choice in table and f != self.family]
                why = f" ({choice!r} samples the {other[0]} family)" if other else ""
                raise ValueError(f"scheduler: unknown scheduler {choice!r} for this model's {self.family} noise "
                                 f"schedule{why}; known: {known}, or a diffusers scheduler class of the family")
        elif isinstance(choice, type):
            cls = choice
        else:
            raise ValueError(f"scheduler: expected a name or a diffusers scheduler class, got "
                             f"{type(choice).__name__} (an instance: pass its class or name)")
        from diffusers import SchedulerMixin

        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise ValueError(f"scheduler: {getattr(cls, '__name__', cls)!r} is not a diffusers scheduler class; "
                             f"known: {', '.join(names)}")
        if cls.__name__ in NOT_SAMPLERS:
            raise ValueError(f"scheduler: {cls.__name__} is {NOT_SAMPLERS[cls.__name__]}, not a sampler melfusion "
                             f"can drive; known: {', '.join(names)}")
        family = scheduler_family(cls)
        if family != self.family:
            raise ValueError(f"scheduler: {cls.__name__} samples {_a(family)} schedule, but this model was trained "
                             f"with {_a(self.family)} noise schedule; known: {', '.join(names)}")
        import inspect

        required = [n for n, p in list(inspect.signature(cls.step).parameters.items())[4:]
                    if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise ValueError(f"scheduler: {cls.__name__}.step needs {', '.join(required)} besides the model output, "
                             f"which plain sampling does not have; known: {', '.join(names)}")
        accepted = set(_init_keys(cls))
        config: dict[str, Any] = {}
        p = dict(self.params)
        if self.family == "ddpm":
            config.update({k: p[k] for k in _DDPM_KEYS if k in p})
            config["prediction_type"] = self.prediction_type
            extra = {"DDIMScheduler": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                     "DDPMScheduler": dict(clip_sample=False),
                     "DPMSolverMultistepScheduler": dict(algorithm_type="dpmsolver++"),
                     "PNDMScheduler": dict(skip_prk_steps=True)}.get(cls.__name__, {})
            config.update(extra)
        elif self.family == "edm":
            config.update({k: p[k] for k in ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule") if k in p})
            config["prediction_type"] = self.prediction_type
            if cls.__name__ == "EDMDPMSolverMultistepScheduler":
                config.setdefault("algorithm_type", "dpmsolver++")
        else:
            config.update({k: p[k] for k in ("shift", "num_train_timesteps") if k in p})
        config.update(overrides)
        config = {k: v for k, v in config.items() if k in accepted}
        return cls(**config)

    # -- noise levels -----------------------------------------------------------------------
    def model_timesteps(self, scheduler: Any) -> list[Any]:
        """What the model is given as its timestep at each of ``scheduler.timesteps``: the scheduler's own
        (ddpm and flow families), or the model's trained conditioning of the step's sigma (edm family), so that
        any edm scheduler gives the model the noise input it was trained with."""
        if self.family != "edm":
            return list(scheduler.timesteps)
        sigmas = torch.as_tensor(scheduler.sigmas)[: len(scheduler.timesteps)]
        return [self.model_timestep(s) for s in sigmas]

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The edm family's model timestep for noise level(s) ``sigma`` (see :meth:`edm`)."""
        sigma = torch.as_tensor(sigma)
        if self.params.get("noise_conditioning", "atan") == "log":
            return 0.25 * torch.log(sigma)
        return sigma.atan() / math.pi * 2
    @property
    def num_train_timesteps(self) -> int:
        return int(self.params.get("num_train_timesteps", 1000))

    def alphas_cumprod(self) -> torch.Tensor:
        """The ddpm family's cumulative alphas (float64, one per training timestep)."""
        if self.family != "ddpm":
            raise ValueError(f"alphas_cumprod: a {self.family} schedule has no discrete alphas")
        p = dict(self.params)
        return ddpm_alphas_cumprod(int(p.get("num_train_timesteps", 1000)), float(p.get("beta_start", 0.00085)),
                                   float(p.get("beta_end", 0.012)), str(p.get("beta_schedule", "scaled_linear")))

    def snr_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """SNR of the edm/flow family's noise level ``sigma`` (float64)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.family == "edm":
            return float(self.params.get("sigma_data", 1.0)) ** 2 / sigma.clamp(min=1e-20) ** 2
        if self.family == "flow":
            s = sigma.clamp(1e-12, 1.0)
            return ((1 - s) / s) ** 2
        raise ValueError("snr_of_sigma: the ddpm family's noise level is a timestep; use snr_of_timesteps")

    def snr_of_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR of the ddpm family's discrete ``timesteps`` (float64)."""
        a = self.alphas_cumprod()
        t = torch.as_tensor(timesteps).long().clamp(0, len(a) - 1)
        return a[t] / (1 - a[t])


def same_ddpm_schedule(a: NoiseSchedule, b: NoiseSchedule) -> bool:
    """Whether ``a`` and ``b`` are the same discrete-beta schedule: then the SNR map is the identity on timesteps."""
    return a.family == b.family == "ddpm" and dict(a.params) == dict(b.params)


def _a(family: str) -> str:
    return f"an {family}" if family[:1] in "aeiou" else f"a {family}"


def scheduler_family(cls: type) -> str:
    """The family a diffusers scheduler class samples, from its configuration keys."""
    keys = set(_init_keys(cls))
    name = cls.__name__
    if name.startswith("FlowMatch") or "shift" in keys and "beta_start" not in keys and "sigma_data" not in keys:
        return "flow"
    if "sigma_data" in keys:
        return "edm"
    if "beta_start" in keys:
        return "ddpm"
    return "unknown"


def _init_keys(cls: type) -> list[str]:
    import inspect

    return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]


def step_snr(schedule: NoiseSchedule, scheduler: Any) -> torch.Tensor:
    """SNR of each of ``scheduler.timesteps`` (after ``set_timesteps``), float64, one per step.

    ddpm family: from the timestep; edm and flow families: from ``scheduler.sigmas`` (one per timestep, plus
    the final one, which is not a step).
    """
    steps = len(scheduler.timesteps)
    if schedule.family == "ddpm":
        return schedule.snr_of_timesteps(torch.as_tensor(scheduler.timesteps).cpu())
    sigmas = torch.as_tensor(scheduler.sigmas).detach().cpu().to(torch.float64)[:steps]
    return schedule.snr_of_sigma(sigmas)


def snr_to_timesteps(snr: torch.Tensor | Sequence[float], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The image-schedule timestep of equal SNR to each of ``snr``: ``argmin_t |log SNR_img(t) - log snr|``.

    ``SNR_img(t) = a_t / (1 - a_t)`` is strictly decreasing in ``t`` for any schedule with positive betas, so
    the map is monotone (a noisier music step never gets a cleaner image step) and lands in ``[0, T - 1]``:
    an SNR above the image schedule's largest gives timestep 0, one below its smallest gives ``T - 1``.
    Exact ties are broken towards the smaller timestep. When the music model shares the image model's
    schedule (the paper: both Stable Diffusion's), each timestep maps to itself.
    """
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    log_img = torch.log(a) - torch.log1p(-a)  # decreasing in t
    log_snr = torch.log(torch.as_tensor(snr, dtype=torch.float64).reshape(-1).cpu().clamp(min=1e-300))
    log_snr = torch.nan_to_num(log_snr, posinf=float(log_img[0]) + 1.0, neginf=float(log_img[-1]) - 1.0)
    # log_img is decreasing: search on its negation, which is increasing
    neg = -log_img
    idx = torch.searchsorted(neg, -log_snr).clamp(0, len(a) - 1)  # first t with -log_img[t] >= -log_snr
    lower = (idx - 1).clamp(min=0)
    d_hi = (log_img[idx] - log_snr).abs()
    d_lo = (log_img[lower] - log_snr).abs()
    best = torch.where(d_lo <= d_hi, lower, idx)
    return best.long()


def edm_training_sigmas(schedule: NoiseSchedule, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Training noise levels for the edm family: ``tan(u * pi / 2)`` for ``u ~ U(0, 1)``, the cosine schedule
    Stable Audio was trained with, clamped to the schedule's ``[sigma_min, sigma_max]`` (float64)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    sigma = torch.tan(u * math.pi / 2)
    return sigma.clamp(float(schedule.params.get("sigma_min", 0.002)), float(schedule.params.get("sigma_max", 80.0)))
