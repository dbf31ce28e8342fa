"""Does a mini model hear the picture in pictures it was never trained on? Register and tempo accuracy per
picture family and per size, on families held out of training, with the controls.

    python benchmarks/mini_generalisation.py                                  # the shipped mini model
    python benchmarks/mini_generalisation.py --model runs/mini/model --rows 240 --controls --jpeg 30

The pictures are ``HELDOUT_FAMILIES`` (triangles, gradients, checkerboards, tinted crops of a real
photograph, plain fields) at ``HELDOUT_SIZES`` (160x120, 300x300, 40x90), resized by the library to the
image LDM's resolution as any user's picture is, in blocks of 8 rows (each colour and shade once) per family
and size,
from seed 1000 and items from 100000, as the recipe's held-out captions. ``--jpeg Q`` adds the same rows
saved as JPEG at quality Q. With ``--controls``, the same rows with every synapse weight forced to 0 and with
the pictures shuffled between rows. Prints markdown tables (one standard error after each accuracy) and
writes every figure with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from melfusion import MelFusion
from melfusion.datasets.synthetic import (
    ATTRIBUTES,
    HELDOUT_FAMILIES,
    HELDOUT_SIZES,
    IMAGE_ATTRIBUTES,
    attribute_accuracy,
    write_synthetic_manifest,
)
from melfusion.files import write_atomic
from melfusion.metrics.synthetic import score_synthetic


def _cell(p: float, n: int) -> str:
    return f"{100 * p:.0f} ± {100 * math.sqrt(p * (1 - p) / n):.1f}" if n else "-"


def _groups(rows: list[dict], score, key) -> dict[str, dict[str, float]]:
    out: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        out.setdefault(key(row), []).append(i)
    return {name: {"n": len(idx), **attribute_accuracy([score.readings[i] for i in idx], [rows[i] for i in idx])}
            for name, idx in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="a save_pretrained folder or a shipped name (default: mini)")
    parser.add_argument("--rows", type=int, default=240,
                        help="held-out rows (default 240: 16 per family and size); a multiple of 8")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (default: 10, as tests/test_mini.py)")
    parser.add_argument("--image-guidance", type=float, default=None, help="image guidance (default: the model's)")
    parser.add_argument("--controls", action="store_true", help="also alpha forced to 0 and shuffled pictures")
    parser.add_argument("--jpeg", type=int, default=None, help="also the same pictures as JPEG at this quality")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.rows < 8 or args.rows % 8:
        print("--rows: expected a positive multiple of 8", file=sys.stderr)
        return 2
    model = MelFusion.from_pretrained(args.model)
    common = dict(num_inference_steps=args.steps, image_guidance_scale=args.image_guidance, batch_size=48,
                  progress=False)
    results: dict = {"model": args.model, "rows": args.rows, "steps": args.steps,
                     "image_guidance": args.image_guidance or model.config.sampling.image_guidance_scale}
    conditions = [("image + text", {}, None)]
    if args.jpeg is not None:
        conditions.append((f"image + text, JPEG quality {args.jpeg}", {}, args.jpeg))
    if args.controls:
        conditions += [("alpha forced to 0", {"alpha": 0.0}, None), ("pictures shuffled", {"swap_images": True}, None)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs, quality in conditions:
            folder = Path(tmp) / ("jpeg" if quality else "png")
            manifest = folder / "manifest.jsonl"
            if not manifest.is_file():
                write_synthetic_manifest(folder, n=args.rows, seed=1000, start=100_000, families=HELDOUT_FAMILIES,
                                         sizes=HELDOUT_SIZES, jpeg_quality=quality)
            rows = [json.loads(line) for line in manifest.read_text().splitlines()]
            start = time.perf_counter()
            score = score_synthetic(model, manifest, **common, **kwargs)
            results[label] = {**score.as_dict(), "seconds": time.perf_counter() - start,
                              "per_family": _groups(rows, score, lambda r: r["family"]),
                              "per_size": _groups(rows, score, lambda r: f"{r['width']}x{r['height']}")}
    print(f"model {args.model}: {args.rows} rows of held-out families and sizes, {args.steps} DDIM steps, image "
          f"guidance {results['image_guidance']:g}; each accuracy ± one standard error\n")
    print("| condition | n | " + " | ".join(f"{a} %" for a in ATTRIBUTES) + " | FD |")
    print("|" + "---|" * (len(ATTRIBUTES) + 3))
    for label, _, _ in conditions:
        r = results[label]
        print(f"| {label} | {r['n']} | " + " | ".join(_cell(r["accuracy"][a], r["n"]) for a in ATTRIBUTES)
              + f" | {r['fd']:.2f} |")
    main_row = results["image + text"]
    for title, part in (("family", "per_family"), ("size", "per_size")):
        print(f"\n| {title} (image + text) | n | " + " | ".join(f"{a} %" for a in IMAGE_ATTRIBUTES) + " |")
        print("|" + "---|" * (len(IMAGE_ATTRIBUTES) + 2))
        for name, g in main_row[part].items():
            print(f"| {name} | {g['n']} | " + " | ".join(_cell(g[a], g["n"]) for a in IMAGE_ATTRIBUTES) + " |")
    if "pictures shuffled" in results:
        vs = results["pictures shuffled"]["accuracy_vs_image"]
        print(f"\nshuffled pictures, against the labels of the picture each clip was given: register "
              f"{100 * vs['register']:.0f} %, tempo {100 * vs['tempo']:.0f} %")
    if args.json:
        write_atomic(Path(args.json), json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
