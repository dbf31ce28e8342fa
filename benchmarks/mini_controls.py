"""Does the shipped model's music follow the image through the synapse? Attribute accuracy on held-out
synthetic triplets with the synapse, with every synapse weight forced to 0, and with pictures swapped.

    python benchmarks/mini_controls.py                       # the shipped mini model, 96 held-out clips
    python benchmarks/mini_controls.py --model runs/mini/model --rows 48 --steps 25

The held-out triplets are the ones the mini recipe writes (seed 1000, items from 100000), regenerated here.
Prints a markdown table; tests/test_mini.py asserts the same comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from melfusion import MelFusion
from melfusion.datasets.synthetic import ATTRIBUTES, CHANCE, write_synthetic_manifest
from melfusion.metrics.synthetic import score_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="a save_pretrained folder or a shipped name (default: mini)")
    parser.add_argument("--rows", type=int, default=96, help="held-out clips (default: 96, each combination twice)")
    parser.add_argument("--steps", type=int, default=10,
                        help="sampling steps (default: 10, as tests/test_mini.py; the model's default is 25)")
    args = parser.parse_args(argv)
    model = MelFusion.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_manifest(tmp, n=args.rows, seed=1000, start=100_000)
        common = dict(num_inference_steps=args.steps, batch_size=48, progress=False)
        rows = []
        for label, kwargs in (("image + text", {}), ("alpha forced to 0", {"alpha": 0.0}),
                              ("pictures shuffled between rows", {"swap_images": True}),
                              ("captions dropped (image only)", {"text": ""})):
            start = time.perf_counter()
            score = score_synthetic(model, manifest, **common, **kwargs)
            rows.append((label, score, time.perf_counter() - start))
    print(f"model {args.model}, {args.rows} held-out clips, {args.steps} DDIM steps, guidance "
          f"{model.config.sampling.guidance_scale}, image guidance {model.config.sampling.image_guidance_scale}\n")
    print("| condition | " + " | ".join(f"{a} % (chance {100 * CHANCE[a]:.0f})" for a in ATTRIBUTES) + " | FD |")
    print("|" + "---|" * (len(ATTRIBUTES) + 2))
    for label, score, _ in rows:
        print(f"| {label} | " + " | ".join(f"{100 * score.accuracy[a]:.0f}" for a in ATTRIBUTES)
              + f" | {score.fd:.2f} |")
    swapped = rows[2][1].accuracy_vs_image
    print(f"\nshuffled pictures, scored against the labels of the picture each clip was given: register "
          f"{100 * swapped['register']:.0f} %, tempo {100 * swapped['tempo']:.0f} %")
    print(f"scoring took {sum(r[2] for r in rows):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
