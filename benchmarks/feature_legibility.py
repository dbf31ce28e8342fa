"""Can the music read the picture's register and tempo from the image features, on pictures of families
it has never seen? A linear probe per image-UNet attention layer.

    python benchmarks/feature_legibility.py                              # the shipped mini model's image LDM
    python benchmarks/feature_legibility.py --model runs/mini/model --json runs/legibility.json

For every transformer layer of the image UNet (encoder, middle and decoder), the self-attention keys and
values of DDIM-inverted pictures are averaged over the tokens (what a uniform picture hands the music's
cross-attention) at the image timesteps the synapse uses (up to the model's ``image_timestep_max``). A
ridge classifier is fitted on augmented pictures of the training families
(``write_synthetic_manifest(augment=True)``) and scored on pictures of the held-out families
(``HELDOUT_FAMILIES``) at the held-out sizes (``HELDOUT_SIZES``): the shade (which sets the register) and
the warm/cool class of the hue (which sets the tempo); chance is 50 % for both. A layer the probe cannot
read is one the music cannot follow either; the music model still has to learn to read the ones it can.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from melfusion import MelFusion
from melfusion.datasets.synthetic import HELDOUT_FAMILIES, HELDOUT_SIZES, write_synthetic_manifest
from melfusion.files import write_atomic
from melfusion.images import load_images
from melfusion.pipeline import make_scheduler, noise_schedule


def ridge_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   strength: float = 0.01) -> np.ndarray:
    """Per test row, whether a ridge classifier (standardised features, +-1 targets) fitted on the training
    rows gets its class right."""
    mean, spread = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mean) / spread, np.ones(len(train_x))]
    b = np.c_[(test_x - mean) / spread, np.ones(len(test_x))]
    w = np.linalg.solve(a.T @ a + strength * len(a) * np.eye(a.shape[1]), a.T @ (2.0 * train_y - 1.0))
    return (b @ w > 0) == (test_y > 0.5)


def pooled_features(model, manifest: Path, timesteps: list[int]) -> tuple[dict, dict]:
    """``{(t, layer): (rows, 2 * channels)}`` token-mean keys and values, and the rows' labels."""
    fs = model.feature_source
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    images = load_images([manifest.parent / r["img_path"] for r in rows], "image", size=fs.resolution)
    with torch.no_grad():
        latents = torch.cat([fs.encode(images[i: i + 64]) for i in range(0, len(images), 64)])
        cache = fs.trajectory(latents, timesteps, mode="reverse")
    out = {}
    for t in timesteps:
        for layer, (keys, values) in cache.at(t).items():
            parts = []
            for x in (keys, values):
                x = x.float()
                if x.ndim == 4:  # (batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim)
                    x = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
                parts.append(x.mean(1))
            out[(t, layer)] = torch.cat(parts, 1).numpy()
    labels = {"shade": np.array([r["shade"] == "bright" for r in rows], float),
              "tempo": np.array([r["tempo"] == "fast" for r in rows], float),
              "family": np.array([r["family"] for r in rows])}
    return out, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="a save_pretrained folder or a shipped name (default: mini)")
    parser.add_argument("--train-rows", type=int, default=240, help="augmented training-family pictures (240)")
    parser.add_argument("--test-rows", type=int, default=240, help="held-out-family pictures (240)")
    parser.add_argument("--json", default=None, help="also write every figure (per family too) to this file")
    args = parser.parse_args(argv)
    model = MelFusion.from_pretrained(args.model)
    fs = model.feature_source
    fs.select_layers(fs.available_layers())
    sched = make_scheduler("ddim", **noise_schedule(model.denoiser))
    sched.set_timesteps(model.config.sampling.num_inference_steps)
    cap = model.config.synapse.image_timestep_max or 1000
    timesteps = sorted(int(t) for t in sched.timesteps if int(t) <= cap)
    with tempfile.TemporaryDirectory() as tmp:
        train = write_synthetic_manifest(Path(tmp) / "train", n=args.train_rows, seed=7, start=5000, augment=True)
        test = write_synthetic_manifest(Path(tmp) / "test", n=args.test_rows, seed=1000, start=100_000,
                                        families=HELDOUT_FAMILIES, sizes=HELDOUT_SIZES)
        x_train, y_train = pooled_features(model, train, timesteps)
        x_test, y_test = pooled_features(model, test, timesteps)
    layers = list(dict.fromkeys(layer for _, layer in x_train))
    results: dict = {"model": args.model, "timesteps": timesteps, "train_rows": args.train_rows,
                     "test_rows": args.test_rows, "layers": {}}
    print(f"model {args.model}: {args.test_rows} held-out pictures ({', '.join(HELDOUT_FAMILIES)}; "
          f"{', '.join(f'{w}x{h}' for w, h in HELDOUT_SIZES)}), probe fitted on {args.train_rows} augmented "
          f"training-family pictures; mean over image timesteps {timesteps[0]}..{timesteps[-1]}\n")
    print("| image UNet layer | shade (register) % | warm/cool (tempo) % | worst family (shade, tempo) |")
    print("|---|---|---|---|")
    for layer in layers:
        entry = {}
        for target in ("shade", "tempo"):
            hits = np.stack([ridge_accuracy(x_train[(t, layer)], y_train[target], x_test[(t, layer)], y_test[target])
                             for t in timesteps])
            fam = y_test["family"]
            entry[target] = {"accuracy": float(hits.mean()), "per_timestep": hits.mean(1).tolist(),
                             "per_family": {f: float(hits[:, fam == f].mean()) for f in HELDOUT_FAMILIES}}
        results["layers"][layer] = entry
        worst = [min(entry[t]["per_family"].items(), key=lambda kv: kv[1]) for t in ("shade", "tempo")]
        print(f"| {layer} | {100 * entry['shade']['accuracy']:.0f} | {100 * entry['tempo']['accuracy']:.0f} | "
              f"{worst[0][0]} {100 * worst[0][1]:.0f}, {worst[1][0]} {100 * worst[1][1]:.0f} |")
    if args.json:
        write_atomic(Path(args.json), json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
