"""examples/custom_denoiser.py: a plain-torch denoiser, written to melfusion.interfaces alone, generates, trains
and reloads; and above the parts no code reaches through the contract."""

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np

from melfusion.interfaces import MusicDenoiser
from melfusion.registry import registry

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("user_custom_denoiser", ROOT / "examples" / "custom_denoiser.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_custom_denoiser"] = module
    spec.loader.exec_module(module)
    return module


def test_custom_denoiser_example_generates_trains_and_reloads(tmp_path):
    module = _load()
    # the example imports nothing of melfusion's beyond the public surface and the interfaces
    tree = ast.parse((ROOT / "examples" / "custom_denoiser.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in imported if m.startswith("melfusion")} <= {
        "melfusion.interfaces", "melfusion.registry", "melfusion.datasets", "melfusion.training"}
    assert issubclass(module.PlainTorchFlowDenoiser, MusicDenoiser)
    assert registry("denoiser").get("plain_torch_flow") is module.PlainTorchFlowDenoiser
    out = module.main(tmp_path)
    a, b = out["with_image"].waveforms, out["text_only"].waveforms
    assert np.isfinite(a).all() and a.shape == b.shape
    assert np.abs(a - b).max() > 1e-3  # the synapse, installed through the plain-torch hook, changes the music
    assert len(out["losses"]) == 1 and np.isfinite(out["losses"]).all()
    assert np.isfinite(out["reloaded"].waveforms).all()
    assert (tmp_path / "run" / "model" / "denoiser" / "model.safetensors").is_file()


# -- the contract boundary ------------------------------------------------------------------------------
ABOVE_THE_PARTS = ["pipeline.py", "persistence.py", "sampling.py", "image_features.py", "cli.py", "training",
                   "metrics", "datasets", "__init__.py", "config.py", "plots.py", "images.py", "files.py",
                   "checks.py", "registry.py", "schedules.py"]
PART_INTERNALS = {"unet", "transformer", "vae", "_handle", "_context", "_version", "_alphas"}


def _files():
    for entry in ABOVE_THE_PARTS:
        path = ROOT / "src" / entry
        if path.is_dir():
            yield from sorted(path.rglob("*.py"))
        elif path.is_file():
            yield path


def test_no_code_above_the_parts_reaches_into_a_part():
    problems = []
    for path in _files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                base = node.value
                own = isinstance(base, ast.Name) and base.id in ("self", "cls")
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                if node.attr in PART_INTERNALS and not own or private and not own:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:60]}")
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports private {alias.name}")
    assert not problems, "code above the parts uses what interfaces.py does not declare:\n" + "\n".join(problems)
