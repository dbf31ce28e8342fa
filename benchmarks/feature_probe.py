"""How legible is each picture property in the image features the synapse hands to the music UNet?

    python benchmarks/feature_probe.py                      # the shipped mini model, 96 held-out pictures
    python benchmarks/feature_probe.py --model runs/mini/model --rows 48

For every fifth timestep of the 25-step sampling grid, the held-out pictures' DDIM-inverted features are
captured at each synapse layer (the full reverse trajectory, no timestep cap), pooled over heads and
tokens as the music layers receive them, and a nearest-class-mean classifier is scored by leave-one-out on
the picture's shade (which sets the register) and colour class (which sets the tempo). The table is the
mean over layers; chance is 50 % for both. It also prints how far apart the two shades' mean values are,
relative to the values' own size: the part of the image cue that survives into the attention output.

docs/mini.md uses this to explain ``synapse.image_timestep_max`` in the mini preset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np
import torch

from melfusion import MelFusion
from melfusion.datasets.synthetic import write_synthetic_manifest
from melfusion.images import load_images
from melfusion.pipeline import make_scheduler, noise_schedule


def leave_one_out(x: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of the nearest class mean on standardised features."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    hits = 0
    for i in range(len(labels)):
        rest = np.arange(len(labels)) != i
        means = {c: x[rest & (labels == c)].mean(0) for c in np.unique(labels)}
        hits += min(means, key=lambda c: float(((x[i] - means[c]) ** 2).sum())) == labels[i]
    return hits / len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="a save_pretrained folder or a shipped name (default: mini)")
    parser.add_argument("--rows", type=int, default=96, help="held-out pictures (default: 96)")
    args = parser.parse_args(argv)
    model = MelFusion.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_manifest(tmp, n=args.rows, seed=1000, start=100_000)
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        images = load_images([f"{tmp}/{r['img_path']}" for r in rows], "image")
    sched = make_scheduler("ddim", **noise_schedule(model.denoiser))
    sched.set_timesteps(model.config.sampling.num_inference_steps)
    grid = [int(t) for t in sched.timesteps]
    probe = grid[::5] + ([grid[-1]] if (len(grid) - 1) % 5 else [])
    tokens = model.text_encoder(["a calm flute melody"])[0].shape[1]
    with torch.no_grad():
        cache = model.image_features(images, probe, text_tokens=tokens, latent_hw=model.latent_hw(
            model.config.sampling.seconds), mode=model.config.synapse.image_trajectory)
    shade = np.array([r["shade"] for r in rows])
    tempo = np.array([r["tempo"] for r in rows])  # the colour's class: warm or cool
    print(f"model {args.model}, {len(rows)} held-out pictures, features pooled over heads and tokens, "
          "mean over synapse layers\n")
    print("| image timestep | shade (register) % | colour class (tempo) % | shade gap / value size |")
    print("|---|---|---|---|")
    for t in sorted(cache.timesteps, reverse=True):
        acc_shade, acc_tempo, gaps = [], [], []
        for keys, values in cache.at(t).values():
            feats = torch.cat([keys.float().mean(2), values.float().mean(2)], dim=1).reshape(len(rows), -1).numpy()
            acc_shade.append(leave_one_out(feats, shade))
            acc_tempo.append(leave_one_out(feats, tempo))
            v = values.float()
            gap = v[torch.from_numpy(shade == "dark")].mean(0) - v[torch.from_numpy(shade == "bright")].mean(0)
            gaps.append(float(gap.pow(2).mean().sqrt() / v.pow(2).mean().sqrt()))
        print(f"| {t} | {100 * np.mean(acc_shade):.0f} | {100 * np.mean(acc_tempo):.0f} | {np.mean(gaps):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
