"""The short scheduler names per noise-schedule family, without importing torch or diffusers.

The command line offers them as ``--scheduler`` choices and the config validates them, both before any
model is built; :mod:`melfusion.schedules` turns a name into a diffusers scheduler.
"""

from __future__ import annotations

__all__ = ["SCHEDULER_NAMES", "SCHEDULERS"]

#: short names of the diffusers schedulers, per family (any other scheduler class of the family may be
#: given as a class or its class name)
SCHEDULER_NAMES: dict[str, dict[str, str]] = {
    "ddpm": {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm_solver++": "DPMSolverMultistepScheduler",
             "euler": "EulerDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
             "pndm": "PNDMScheduler", "heun": "HeunDiscreteScheduler"},
    "edm": {"cosine_dpm_solver": "CosineDPMSolverMultistepScheduler",
            "edm_dpm_solver": "EDMDPMSolverMultistepScheduler", "edm_euler": "EDMEulerScheduler"},
    "flow": {"flow_euler": "FlowMatchEulerDiscreteScheduler", "flow_heun": "FlowMatchHeunDiscreteScheduler"},
}

#: every short name, all families
SCHEDULERS = tuple(name for table in SCHEDULER_NAMES.values() for name in table)
