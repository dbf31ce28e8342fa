"""Lazy package attributes: a package's public names imported from their submodules on first use.

``import melfusion`` then costs nothing until a name is used, and the command line's ``--help`` starts without
torch. Besides the listed names, every submodule is an attribute (``melfusion.config``), as after an eager
import.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, names: Mapping[str, str | None], namespace: dict[str, Any]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps each public name to the submodule
    defining it (None: the name is that submodule); ``namespace`` is the package's ``globals()``, where each
    value is kept after its first lookup."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f".{name}", package)  # any submodule, as after an eager import
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f".{names[name] or name}", package)
        value = module if names[name] is None else getattr(module, name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | {n for n in namespace if n.startswith("__")})

    return __getattr__, __dir__
