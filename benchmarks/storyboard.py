"""Storyboards of the mini world: is each section heard as its own picture, and are the boundaries clean?

    python benchmarks/storyboard.py                     # 20 storyboards on the shipped mini model (~20 min, 2 CPUs)
    python benchmarks/storyboard.py --storyboards 4 --json runs/storyboard.json

Each storyboard has four sections of the model's clip length (2.56 s), one picture each: bright-warm,
dark-cool, bright-cool and dark-warm (warm: red or yellow, fast tempo; cool: green or blue, slow; bright: high
register, dark: low), in a random order, each drawn in a random held-out picture family at a random held-out
size (``render_picture``), with one random caption of the mini world for the whole storyboard. ``read_attributes``
reads each section's register and tempo from its span of the piece; the same four pictures and caption are also
generated as single clips (same steps and seed), the accuracy the storyboard is compared with.

Clicks: ``seam_report`` measures, within 50 ms of each boundary, the largest sample-to-sample jump and the
largest spectral flux, and the same two measures over every 100 ms stretch inside the sections (at least 50 ms
from a boundary); a storyboard is clean when every boundary's measures lie within the range measured inside.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from melfusion import MelFusion
from melfusion.datasets.synthetic import (
    HELDOUT_FAMILIES,
    HELDOUT_SIZES,
    TEMPO_OF_COLOUR,
    read_attributes,
    render_picture,
    synthetic_item,
)
from melfusion.longform import seam_report

#: the four kinds of picture: (name, colours to draw from, shade); colours 0-1 are warm (fast), 2-3 cool (slow)
KINDS = (("bright-warm", (0, 1), 1), ("dark-cool", (2, 3), 0), ("bright-cool", (2, 3), 1), ("dark-warm", (0, 1), 0))


def storyboard(rng: np.random.Generator):
    """``(pictures, labels, caption)``: the four kinds in a random order, each picture drawn at random."""
    order = rng.permutation(len(KINDS))
    pictures, labels = [], []
    for k in order:
        name, colours, shade = KINDS[k]
        colour = int(rng.choice(colours))
        family = str(rng.choice(HELDOUT_FAMILIES))
        size = tuple(HELDOUT_SIZES[int(rng.integers(len(HELDOUT_SIZES)))])
        pictures.append(render_picture(colour, shade, rng, family, size))
        labels.append({"kind": name, "register": shade, "tempo": TEMPO_OF_COLOUR[colour], "family": family,
                       "size": list(size)})
    caption = synthetic_item(int(rng.integers(1 << 30)), rng).caption
    return pictures, labels, caption


def run(model, n: int, steps: int, seed: int, progress: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    rows, start = [], time.perf_counter()
    for b in range(n):
        pictures, labels, caption = storyboard(rng)
        out = model.generate(images=pictures, text=caption, num_inference_steps=steps, seed=seed + b, progress=False)
        single = model.generate(image=pictures, text=[caption] * len(pictures), num_inference_steps=steps,
                                seed=seed + b, progress=False)
        sr, wave = out.sample_rate, out.waveforms[0]
        report = seam_report(wave, sr, [a for a, _ in out.sections[1:]])
        sections = []
        for (a, e), label, clip in zip(out.sections, labels, single.waveforms, strict=True):
            got = read_attributes(wave[int(round(a * sr)): int(round(e * sr))], sr)
            alone = read_attributes(clip, sr)
            sections.append({**label, "register_heard": got.register, "tempo_heard": got.tempo,
                             "single_register_heard": alone.register, "single_tempo_heard": alone.tempo})
        rows.append({"caption": caption, "sections": sections, "clean": report.clean,
                     "boundary_jump": report.boundary_jump, "boundary_flux": report.boundary_flux,
                     "inside_jump_max": max(report.inside_jump), "inside_flux_max": max(report.inside_flux),
                     "inside_jump_median": float(np.median(report.inside_jump)),
                     "inside_flux_median": float(np.median(report.inside_flux))})
        if progress:
            hits = sum(s["register_heard"] == s["register"] and s["tempo_heard"] == s["tempo"] for s in sections)
            print(f"storyboard {b + 1}/{n}: {hits}/4 sections right, clean={report.clean} "
                  f"[{time.perf_counter() - start:.0f} s]", file=sys.stderr)
    return {"storyboards": rows, "steps": steps, "seed": seed, "seconds": time.perf_counter() - start}


def _rate(hits: int, n: int) -> str:
    p = hits / n
    return f"{100 * p:.0f} % ± {100 * math.sqrt(p * (1 - p) / n):.0f} ({hits}/{n})"


def table(result: dict) -> str:
    sections = [s for row in result["storyboards"] for s in row["sections"]]
    n = len(sections)
    count = lambda key, want: sum(s[key] == s[want] for s in sections)  # noqa: E731
    rows = result["storyboards"]
    clean = sum(r["clean"] for r in rows)
    jump = max(max(r["boundary_jump"]) / r["inside_jump_max"] for r in rows)
    flux = max(max(r["boundary_flux"]) / r["inside_flux_max"] for r in rows)
    lines = [
        f"{len(rows)} storyboards of 4 sections ({n} sections), {result['steps']} DDIM steps, seed {result['seed']}",
        "",
        "| | register | tempo |",
        "|---|---|---|",
        f"| storyboard sections | {_rate(count('register_heard', 'register'), n)} | "
        f"{_rate(count('tempo_heard', 'tempo'), n)} |",
        f"| the same pictures as single clips | {_rate(count('single_register_heard', 'register'), n)} | "
        f"{_rate(count('single_tempo_heard', 'tempo'), n)} |",
        "",
        f"clean boundaries: {clean}/{len(rows)} storyboards; the largest boundary jump is {jump:.2f} x and the largest "
        f"boundary spectral flux {flux:.2f} x the largest measured inside the sections of its storyboard",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="a save_pretrained folder or a shipped name (default: mini)")
    parser.add_argument("--storyboards", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every section's reading here")
    args = parser.parse_args(argv)
    model = MelFusion.from_pretrained(args.model)
    result = run(model, args.storyboards, args.steps, args.seed)
    print(table(result))
    print(f"\n[{result['seconds'] / 60:.1f} min]")
    if args.json:
        from melfusion.files import write_atomic

        write_atomic(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
