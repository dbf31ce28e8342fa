"""Rows per second of batch generation (melfusion.batch.generate_manifest) at several batch sizes.

    python benchmarks/batch_throughput.py                          # the shipped mini model, 32 held-out rows
    python benchmarks/batch_throughput.py --rows 48 --batch-sizes 1,8,32 --steps 10 --repeats 3

Each measurement generates the first ``--rows`` rows of the synthetic held-out set into a fresh folder (so
nothing is skipped) with the image feature cache cleared, and reports the wall time of the whole call
(reading the manifest, checking the images, generating, writing the files and generations.jsonl). The
median of ``--repeats`` runs is printed per batch size, with the ratio to batch 1, as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 25 for mini)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from melfusion import MelFusion
    from melfusion.batch import generate_manifest
    from melfusion.datasets.synthetic import write_synthetic_manifest

    model = MelFusion.from_pretrained(args.model)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_manifest(Path(tmp) / "heldout", n=args.rows, seed=1000, start=100_000)
        times: dict[int, list[float]] = {b: [] for b in sizes}
        for r in range(args.repeats):
            for b in sizes:  # interleaved, so load on a shared machine falls on every batch size alike
                model.feature_cache.clear()
                report = generate_manifest(model, manifest, Path(tmp) / f"gen-{b}-{r}", batch_size=b,
                                           num_inference_steps=args.steps, progress=False)
                assert len(report.written) == args.rows
                times[b].append(report.seconds)
    steps = args.steps or model.config.sampling.num_inference_steps
    print(f"model {args.model}, {args.rows} rows, {steps} steps, guidance {model.config.sampling.guidance_scale}, "
          f"image guidance {model.config.sampling.image_guidance_scale}; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs; median of {args.repeats}\n")
    print(f"| batch size | seconds | rows per second | speed-up over batch {sizes[0]} |")
    print("|---|---|---|---|")
    base = statistics.median(times[sizes[0]])
    for b in sizes:
        t = statistics.median(times[b])
        print(f"| {b} | {t:.1f} | {args.rows / t:.2f} | {base / t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
