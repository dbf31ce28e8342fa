"""Training throughput: steps per second with the synapse vs text-only training of the same denoiser.

    python benchmarks/training.py                                   # tiny and mid, on the CPU
    python benchmarks/training.py --configs mid --steps 10 --repeats 3
    python benchmarks/training.py --configs full --device cuda --mixed-precision bf16 --batch-size 4   # a GPU

The configurations are those of ``benchmarks/sampling.py`` (``mid`` has the
paper's image:music proportions; ``full`` is the paper preset, SD 2.1 and
Tango sizes, with random weights). Both runs train the music UNet and
(with the synapse) the alphas, mode ``synapse+unet``, at the same batch and
clip length, on a generated toy manifest:

- text only: the same config with ``synapse.enabled: false`` (no image UNet);
- synapse, ``noised``: one image-UNet forward pass per step (the image latent
  forward-noised to each sample's timestep), keys/values aligned and mixed;
- synapse, ``inverted``: the same with each image's DDIM-inversion trajectory
  read from the disk cache (filled during the warm-up).

Timed: ``Trainer.optimizer_step`` (data loading, mel, codec, text encoder,
image features, forward, backward, optimizer), median over ``--repeats``
blocks of ``--steps`` steps after ``--warmup`` steps; no checkpoints.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import melfusion as mf  # noqa: E402
from melfusion.datasets import write_toy_manifest  # noqa: E402
from melfusion.training import TrainConfig, Trainer  # noqa: E402


def _sampling_configs():
    spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "benchmarks" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_run(model_cfg: mf.MelFusionConfig, manifest: Path, out: Path, args, image_features: str) -> float:
    """Median seconds per optimizer step."""
    cfg = TrainConfig.model_validate({
        "model": model_cfg, "data": {"manifest": str(manifest)}, "output": str(out), "batch_size": args.batch_size,
        "mode": "synapse+unet", "image_features": image_features, "inversion_steps": 50,
        "mixed_precision": args.mixed_precision, "progress": False, "tensorboard": False, "plot": False,
    })
    model = None
    if model_cfg.name == "paper":  # full size: random weights (no downloads), the architecture of the paper
        device = torch.device(args.device)
        model = mf.MelFusion.from_config(model_cfg, weights=False, device=device)
    trainer = Trainer(cfg, model=model)
    trained = trainer._trained()
    loader = trainer._loader(0)
    # at least one epoch, so that every image's inversion trajectory is on disk before timing
    for _ in range(max(args.warmup, -(-len(trainer.dataset) // args.batch_size))):
        trainer.optimizer_step(loader, trained)
    times = []
    for _ in range(args.repeats):
        _sync(trainer.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.optimizer_step(loader, trained)
        _sync(trainer.device)
        times.append((time.perf_counter() - start) / args.steps)
    return statistics.median(times)


def run(name: str, args) -> list[tuple[str, float]]:
    cfg = _sampling_configs()(name)
    seconds = cfg.sampling.seconds
    text_only = cfg.model_copy(deep=True)
    text_only.synapse.enabled = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_toy_manifest(tmp / "data", n=max(8, args.batch_size * 2), seconds=seconds,
                                      image_size=cfg.feature_source.params.get("resolution", 64))
        base = time_run(text_only, manifest, tmp / "a", args, "noised")
        rows.append(("text only", base))
        rows.append(("synapse, noised image features", time_run(cfg, manifest, tmp / "b", args, "noised")))
        rows.append(("synapse, inverted (cached) image features", time_run(cfg, manifest, tmp / "c", args,
                                                                            "inverted")))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid", help="comma list of tiny, mid, full")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="used for the full configuration (cuda)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"mixed precision {args.mixed_precision}")
    for name in args.configs.split(","):
        rows = run(name.strip(), args)
        base = rows[0][1]
        print(f"\n{name}: seconds per optimizer step (median of {args.repeats} x {args.steps} steps)")
        print(f"  {'run':44s} {'s/step':>8s} {'steps/s':>8s} {'vs text-only':>12s}")
        for label, sec in rows:
            print(f"  {label:44s} {sec:8.3f} {1 / sec:8.2f} {sec / base:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
