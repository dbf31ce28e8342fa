"""Published model configurations (facts, small JSON) shipped with the package."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_json(name: str) -> dict[str, Any]:
    """A shipped config by file stem, e.g. ``load_json("sd21_unet")``."""
    path = resources.files(__name__) / f"{name}.json"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))
        raise ValueError(f"no shipped config {name!r}; shipped: {known}")
    return json.loads(path.read_text())
