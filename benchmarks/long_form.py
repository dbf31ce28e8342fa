"""Long music from one picture: heard throughout, and memory that grows slowly with the length.

    python benchmarks/long_form.py                       # both parts on the shipped mini model (~8 min, 2 CPUs)
    python benchmarks/long_form.py --part attributes --seconds 30 --pictures 4
    python benchmarks/long_form.py --part memory --lengths 10 30 60

``attributes``: a ``--seconds`` piece (default 30 s) from each of ``--pictures`` pictures (bright-warm,
dark-cool, bright-cool, dark-warm: held-out families, 160x120), cut into consecutive 2.56 s windows (the
mini model's clip); ``read_attributes`` on each window must give the picture's register and tempo.

``memory``: for each length, a fresh process loads the model, generates one piece (2 DDIM steps; memory
does not depend on the step count) and reports its peak resident memory above the loaded model
(``/proc/self/status``: the peak, VmHWM, is reset after a warm-up clip through ``/proc/self/clear_refs``), with the denoiser rows per call and the wall time. The
slope between lengths is what long pieces cost; the windowed loop keeps the denoiser's batch at
``window_batch`` windows, so what grows is the latent, the blend buffers and the decoded audio.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import numpy as np

from melfusion.datasets.synthetic import TEMPO_OF_COLOUR, read_attributes, render_picture
from melfusion.longform import DEFAULT_OVERLAP

PICTURES = (("bright-warm", 0, 1), ("dark-cool", 3, 0), ("bright-cool", 2, 1), ("dark-warm", 1, 0))
FAMILIES = ("triangle", "photo", "checker", "gradient")


def attributes(model_name: str, seconds: float, n_pictures: int, steps: int, seed: int,
               overlap: float | None = None) -> dict:
    from melfusion import MelFusion

    model = MelFusion.from_pretrained(model_name)
    rng = np.random.default_rng(seed)
    chosen = PICTURES[:n_pictures]
    pictures = [render_picture(c, s, rng, FAMILIES[i % len(FAMILIES)], (160, 120))
                for i, (_, c, s) in enumerate(chosen)]
    start = time.perf_counter()
    out = model.generate(image=pictures, text=["a calm flute melody"] * len(pictures), seconds=seconds,
                         num_inference_steps=steps, seed=seed, progress=True, window_overlap=overlap)
    took = time.perf_counter() - start
    clip = float(model.config.sampling.seconds)
    sr = out.sample_rate
    rows = []
    for (name, colour, shade), wave in zip(chosen, out.waveforms, strict=True):
        windows = []
        for k in range(int(seconds // clip)):
            r = read_attributes(wave[int(k * clip * sr): int((k + 1) * clip * sr)], sr)
            windows.append({"start": k * clip, "register": r.register, "tempo": r.tempo})
        rows.append({"picture": name, "register": shade, "tempo": TEMPO_OF_COLOUR[colour], "windows": windows})
    return {"seconds": seconds, "steps": steps, "pictures": rows, "generate_seconds": took, "seed": seed,
            "window_overlap": overlap if overlap is not None else (
                model.config.sampling.window_overlap if model.config.sampling.window_overlap is not None
                else model.config.sampling.seconds * DEFAULT_OVERLAP)}


_CHILD = r"""
import json, sys, time
import numpy as np
from melfusion import MelFusion
from melfusion.datasets.synthetic import render_picture

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0

model = MelFusion.from_pretrained(sys.argv[1])
picture = render_picture(0, 1, np.random.default_rng(0), "triangle", (160, 120))
model.generate(image=picture, text="a calm flute melody", num_inference_steps=1, progress=False)  # warm-up
rows = []
forward = type(model.denoiser).forward
def spy(self, latents, *a, **k):
    rows.append(latents.shape[0])
    return forward(self, latents, *a, **k)
type(model.denoiser).forward = spy
import gc
gc.collect()
base = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS (Linux >= 4.0)
    f.write("5")
start = time.perf_counter()
out = model.generate(image=picture, text="a calm flute melody", seconds=float(sys.argv[2]), num_inference_steps=2,
                     progress=False)
took = time.perf_counter() - start
peak = status_kib("VmHWM")
print(json.dumps({"seconds": float(sys.argv[2]), "base_mib": base / 1024, "peak_mib": peak / 1024,
                  "above_model_mib": (peak - base) / 1024,
                  "max_rows_per_call": max(rows), "calls_per_step": len(rows) // 2,
                  "samples": int(out.waveforms.shape[-1]), "wall_s": took}))
"""


def memory(model_name: str, lengths: list[float]) -> list[dict]:
    results = []
    for seconds in lengths:
        done = subprocess.run([sys.executable, "-c", _CHILD, model_name, str(seconds)], capture_output=True,
                              text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{seconds:g} s: {results[-1]}", file=sys.stderr)
    return results


def _rate(hits: int, n: int) -> str:
    p = hits / n
    return f"{100 * p:.0f} % ± {100 * math.sqrt(p * (1 - p) / n):.0f} ({hits}/{n})"


def attributes_table(result: dict) -> str:
    lines = [f"{result['seconds']:g} s pieces, {result['steps']} DDIM steps, seed {result['seed']}, window overlap "
             f"{result['window_overlap']:.2f} s, read in consecutive 2.56 s windows",
             "", "| picture | windows | register | tempo |", "|---|---|---|---|"]
    total_r = total_t = total = 0
    for row in result["pictures"]:
        w = row["windows"]
        r = sum(x["register"] == row["register"] for x in w)
        t = sum(x["tempo"] == row["tempo"] for x in w)
        total_r, total_t, total = total_r + r, total_t + t, total + len(w)
        lines.append(f"| {row['picture']} | {len(w)} | {_rate(r, len(w))} | {_rate(t, len(w))} |")
    lines.append(f"| all | {total} | {_rate(total_r, total)} | {_rate(total_t, total)} |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = ["| piece | peak RSS above the loaded model | denoiser rows per call (max) | calls per step | "
             "wall (2 steps) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seconds']:g} s | {r['above_model_mib']:.0f} MiB | {r['max_rows_per_call']} | "
                     f"{r['calls_per_step']} | {r['wall_s']:.1f} s |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        slope = (b["above_model_mib"] - a["above_model_mib"]) / (b["seconds"] - a["seconds"])
        lines.append("")
        lines.append(f"slope: {slope:.1f} MiB per second of music between {a['seconds']:g} s and {b['seconds']:g} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--part", choices=["attributes", "memory", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--pictures", type=int, default=4, choices=[1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlap", type=float, default=None, help="window_overlap in seconds (default: generate's)")
    parser.add_argument("--lengths", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result: dict = {}
    if args.part in ("attributes", "both"):
        result["attributes"] = attributes(args.model, args.seconds, args.pictures, args.steps, args.seed,
                                          args.overlap)
        print(attributes_table(result["attributes"]))
        print(f"[{result['attributes']['generate_seconds']:.0f} s]\n")
    if args.part in ("memory", "both"):
        result["memory"] = memory(args.model, args.lengths)
        print(memory_table(result["memory"]))
    if args.json:
        from melfusion.files import write_atomic

        write_atomic(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
