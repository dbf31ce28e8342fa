"""Progress bars on or off, for melfusion and the libraries it loads models with.

``melfusion.disable_progress_bars()`` turns off every bar melfusion draws (sampling, batch generation,
training, evaluation, data checks) and the download and weight-loading bars of huggingface_hub, transformers
and diffusers; ``enable_progress_bars()`` turns them back on. A call's own ``progress=False`` still turns one
bar off while they are enabled. The command line's ``--quiet`` calls ``disable_progress_bars()``.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["disable_progress_bars", "enable_progress_bars", "progress_bars_enabled", "show_progress",
           "sync_progress_bars"]

_enabled = True

# (module, function to disable, function to enable) of the libraries whose bars follow ours
_OTHERS = (("huggingface_hub.utils", "disable_progress_bars", "enable_progress_bars"),
           ("transformers.utils.logging", "disable_progress_bar", "enable_progress_bar"),
           ("diffusers.utils.logging", "disable_progress_bar", "enable_progress_bar"))


def _apply_to_others(enabled: bool, *, import_them: bool = False) -> None:
    """Set the other libraries' bars: those already imported (importing them costs seconds), or all of them."""
    for module, off, on in _OTHERS:
        top = module.split(".")[0]
        if top not in sys.modules and not import_them:
            continue  # not imported yet: sync_progress_bars() sets it once a model build has imported it
        try:
            mod = importlib.import_module(module)
        except Exception:  # not installed (or failing to import): it draws no bars either
            continue
        getattr(mod, on if enabled else off)()


def disable_progress_bars() -> None:
    """No progress bars from melfusion, huggingface_hub, transformers (weight loading) or diffusers."""
    global _enabled
    _enabled = False
    _apply_to_others(False)


def enable_progress_bars() -> None:
    """Progress bars back on (the default), for melfusion and the libraries above."""
    global _enabled
    _enabled = True
    _apply_to_others(True)


def sync_progress_bars() -> None:
    """Bring the other libraries in line with melfusion's setting (called when a model is built or loaded, after
    they are imported)."""
    if not _enabled:
        _apply_to_others(False, import_them=True)


def progress_bars_enabled() -> bool:
    """Whether melfusion draws progress bars (False after :func:`disable_progress_bars`)."""
    return _enabled


def show_progress(requested: bool = True) -> bool:
    """Whether one bar is drawn: asked for by the call and not disabled globally."""
    return bool(requested) and _enabled and sys.stderr is not None
