"""Argument checks shared by the library: finite numbers, sizes before allocation, finite tensors.

Each raises ``ValueError`` whose message starts with the argument's name, says the value and what was
expected, so the CLI can print it as one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["finite_float", "positive_int", "check_finite_params", "NonFiniteError", "non_finite_names",
           "check_finite_tensors", "check_size", "memory_bytes"]


class NonFiniteError(ValueError):
    """A tensor or a number that must be finite is not (NaN or infinite)."""


def finite_float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``), or a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (out <= low if low_open else out < low):
        raise ValueError(f"{name}: expected a number {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and out > high:
        raise ValueError(f"{name}: expected a number <= {high:g}, got {value!r}")
    return out


def positive_int(value: Any, name: str, *, high: int | None = None) -> int:
    """``value`` as an int in ``[1, high]``, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected an int <= {high}, got {value!r}")
    return int(value)


def check_finite_params(params: Any, name: str, *, max_nodes: int = 100_000) -> None:
    """Every number inside a (nested) dict or list (part parameters, a results record) is finite.

    Python floats, numpy and torch scalars and ``Decimal`` are checked; a :class:`NonFiniteError` names the
    first bad one by its path (``name.key[i]``). A structure of more than ``max_nodes`` values (e.g. a YAML
    alias bomb, whose shared nodes would be walked exponentially often) is refused instead of walked.
    """
    stack, seen = [(params, name)], 0
    while stack:
        value, where = stack.pop()
        seen += 1
        if seen > max_nodes:
            raise ValueError(f"{name}: more than {max_nodes} nested values; refused as too large")
        if isinstance(value, Mapping):
            stack.extend((v, f"{where}.{k}") for k, v in reversed(list(value.items())))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
        elif not isinstance(value, (bool, int, str, bytes)) and value is not None and hasattr(value, "__float__"):
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError, RuntimeError):
                continue
            if not math.isfinite(number):
                raise NonFiniteError(f"{where}: expected a finite number, got {value!r}")


def non_finite_names(tensors: Mapping[str, Any]) -> list[str]:
    """The names of the floating tensors in ``tensors`` holding a NaN or an infinity."""
    import torch

    bad = []
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" \
                and not bool(torch.isfinite(t).all()):
            bad.append(key)
    return bad


def check_finite_tensors(tensors: Mapping[str, Any], what: str, then: str = "not saved") -> None:
    """Raise :class:`NonFiniteError` naming the non-finite tensors of ``what`` (e.g. weights before a save);
    ``then`` says what was not done (``"not saved"``, ``"refused to load"``)."""
    bad = non_finite_names(tensors)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values ({shown}); {then}")


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_size(estimate: int, name: str, what: str, *, limit: int | None = None,
               hint: str = "") -> None:
    """Refuse work whose estimated memory ``estimate`` (bytes) exceeds ``limit`` (default: physical memory)."""
    limit = memory_bytes() if limit is None else limit
    if limit is not None and estimate > limit:
        raise ValueError(f"{name}: {what} needs about {estimate / 2**30:.1f} GiB, more than this machine's "
                         f"{limit / 2**30:.1f} GiB{'; ' + hint if hint else ''}")

