"""Registries: one per kind of part, so a config names a part and never imports it.

A part registers itself with a decorator::

    from melfusion.registry import register

    @register("mixer", "my_mixer")
    class MyMixer(BaseMixer): ...

and is built from a config with ``REGISTRIES["mixer"].build("my_mixer", **params)``.
A third-party package can instead ship a part as a plugin through the entry-point
group of its kind (``melfusion.mixers``, ``melfusion.denoisers``, ...; see
``ENTRY_POINT_GROUPS``); plugins are loaded the first time a name is looked up
and is not already known.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

KINDS = ("feature_source", "mixer", "aligner", "denoiser", "codec", "vocoder", "text_encoder", "trajectory")

#: entry-point group per kind, for parts shipped by other distributions
ENTRY_POINT_GROUPS = {
    "feature_source": "melfusion.feature_sources",
    "mixer": "melfusion.mixers",
    "aligner": "melfusion.aligners",
    "denoiser": "melfusion.denoisers",
    "codec": "melfusion.codecs",
    "vocoder": "melfusion.vocoders",
    "text_encoder": "melfusion.text_encoders",
    "trajectory": "melfusion.trajectories",
}


class UnknownNameError(KeyError, ValueError):
    """A name that no registry entry (built in, user-registered or plugin) answers to."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name -> factory table for one kind of part."""

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Callable[..., Any]] = {}
        self._plugins_loaded = False

    # -- registration -------------------------------------------------------------
    def register(self, name: str, obj: Callable[..., Any] | None = None, *, override: bool = False):
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: name must be a non-empty string, got {name!r}")
        ensure_builtin_parts()  # a user's part meets the built-in names it could collide with

        def decorator(target: Callable[..., Any]) -> Callable[..., Any]:
            existing = self._entries.get(name)
            if existing is not None and existing is not target and not override:
                raise ValueError(
                    f"{self.kind} registry: name {name!r} is already taken by "
                    f"{_qualname(existing)}; pass override=True to replace it"
                )
            self._entries[name] = target
            try:
                target.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return target

        return decorator(obj) if obj is not None else decorator

    def unregister(self, name: str) -> None:
        ensure_builtin_parts()  # a built-in name unregistered stays unregistered
        self._entries.pop(name, None)

    # -- lookup -------------------------------------------------------------------
    def _load_plugins(self) -> None:
        ensure_builtin_parts()
        if self._plugins_loaded or self.entry_point_group is None:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                continue
            try:
                self._entries[ep.name] = ep.load()
            except Exception as exc:  # a broken plugin must not break the library
                logger.warning("could not load %s plugin %r (%s): %s", self.kind, ep.name, ep.value, exc)

    def names(self) -> list[str]:
        """All known names, plugins included, sorted."""
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if name in self._entries and _builtins_loaded:
            return True
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self:
            known = self.names()
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind} names: {', '.join(known) or '(none)'}.{hint}"
            )
        return self._entries[name]

    def build(self, name: str, /, **params: Any) -> Any:
        """Build the part registered as ``name`` with keyword ``params``."""
        return self.get(name)(**params)

    def __repr__(self) -> str:
        ensure_builtin_parts()
        return f"Registry({self.kind!r}, names={sorted(self._entries)})"


#: the modules whose classes register the built-in parts; imported on the first lookup, so that
#: ``import melfusion`` stays free of torch
BUILTIN_MODULES = ("melfusion.backbones", "melfusion.synapse", "melfusion.vocoders")
_builtins_loaded = False


def ensure_builtin_parts() -> None:
    """Import the modules that register the built-in parts (once; any lookup does it)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # set first: those imports register parts, and must not recurse here
    try:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
    except BaseException:
        _builtins_loaded = False  # a failed import (a missing dependency) is tried again, and raises again
        raise


REGISTRIES: dict[str, Registry] = {kind: Registry(kind, ENTRY_POINT_GROUPS[kind]) for kind in KINDS}


def registry(kind: str) -> Registry:
    """The registry for ``kind`` (one of ``KINDS``)."""
    try:
        return REGISTRIES[kind]
    except KeyError:
        raise UnknownNameError(f"unknown registry kind {kind!r}; known kinds: {', '.join(KINDS)}") from None


def register(kind: str, name: str, *, override: bool = False):
    """Decorator: ``@register("mixer", "convex")`` adds the class to that kind's registry."""
    return registry(kind).register(name, override=override)


def build(kind: str, name: str, /, **params: Any) -> Any:
    """Build a part by kind and name: ``build("mixer", "convex", num_layers=9)``."""
    return registry(kind).build(name, **params)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
