"""Which mini recipe makes the image reliably heard on pictures it never saw? Every variant trained with the
same seed and data and scored on the generalisation rows of tests/test_mini.py (docs/mini.md, "The recipe
ablation").

    python benchmarks/recipe_ablation.py --output runs/recipe --image-from runs/img/model
    python benchmarks/recipe_ablation.py --output runs/recipe --variants decoder encoder --controls
    python benchmarks/recipe_ablation.py --output runs/recipe --score-only mini:shipped-before   # an existing model

A variant is a set of :class:`~melfusion.training.mini.MiniRecipe` fields on top of the base recipe
(augmented training pictures of the five training families, the image LDM on 960 of them) and, optionally,
sampling settings used only when scoring (``image_guidance_scale``): those rows reuse another variant's
model. All variants share one frozen image LDM: ``--image-from`` a trained mini model, or the first variant
trains it. Scores: the accuracy of the four attributes read back from the audio on 96 rows of the held-out
families at 160x120 and 40x90 (10 DDIM steps), one standard error beside each; ``--controls`` adds alpha
forced to 0. Writes ``OUTPUT/results.json`` and ``OUTPUT/results.md``; re-running reuses finished variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from melfusion.datasets.synthetic import ATTRIBUTES, HELDOUT_FAMILIES, write_synthetic_manifest
from melfusion.files import write_atomic
from melfusion.metrics.synthetic import score_synthetic
from melfusion.training.mini import MiniRecipe, train_mini

ENCODER = {"image_layers": ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0"],
           "music_layers": ["down_blocks.2.attentions.0", "down_blocks.3.attentions.0"]}  # the mini preset's
DECODER = {"image_layers": None, "music_layers": None}  # every decoder transformer layer, paired in order
_UP = ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
BOTH = {"image_layers": ENCODER["image_layers"] + _UP, "music_layers": ENCODER["music_layers"] + _UP}
BASE = {"augment": True, "n_image": 960}
#: name -> (label, recipe fields over BASE, scoring overrides, the variant whose model it reuses or None)
VARIANTS: dict[str, tuple[str, dict, dict, str | None]] = {
    "decoder": ("decoder taps, one alpha per layer (the paper's)", {"synapse": DECODER}, {}, None),
    "encoder": ("encoder taps, one alpha per layer", {"synapse": ENCODER}, {}, None),
    "decoder-ig3": ("decoder taps, image guidance 3", {"synapse": DECODER}, {"image_guidance_scale": 3.0}, "decoder"),
    "decoder-ig8": ("decoder taps, image guidance 8", {"synapse": DECODER}, {"image_guidance_scale": 8.0}, "decoder"),
    "encoder-ig3": ("encoder taps, image guidance 3", {"synapse": ENCODER}, {"image_guidance_scale": 3.0}, "encoder"),
    "encoder-ig8": ("encoder taps, image guidance 8", {"synapse": ENCODER}, {"image_guidance_scale": 8.0}, "encoder"),
    "both": ("encoder and decoder taps, one alpha per layer", {"synapse": BOTH}, {}, None),
    "encoder-nocap": ("encoder taps, no image timestep cap (the paper's pairing)",
                      {"synapse": {**ENCODER, "image_timestep_max": None}}, {}, None),
    "encoder-per-head": ("encoder taps, one alpha per layer and head",
                         {"synapse": {**ENCODER, "mixer": {"name": "per_head", "params": {"init": 0.5}}}}, {}, None),
    "encoder-gated": ("encoder taps, gated mixer (alpha from timestep and features)",
                      {"synapse": {**ENCODER, "mixer": {"name": "gated", "params": {"init": 0.5}}}}, {}, None),
    "encoder-750": ("encoder taps, half the training (750 music steps)",
                    {"synapse": ENCODER, "music_steps": 750}, {}, None),
    "encoder-240": ("encoder taps, half the data (240 training triplets)",
                    {"synapse": ENCODER, "n_train": 240}, {}, None),
    "encoder-alpha0.1": ("encoder taps, alphas start at 0.1",
                         {"synapse": {**ENCODER, "mixer": {"name": "convex", "params": {"init": 0.1}}}}, {}, None),
    "encoder-sat1": ("encoder taps, saturation 0.5-1.0 (its own image LDM too)",
                     {"synapse": ENCODER, "saturation": (0.5, 1.0)}, {}, None),
    "encoder-sat1-ldm": ("encoder taps, saturation 0.5-1.0 (music stage only; the shared image LDM)",
                         {"synapse": ENCODER, "saturation": (0.5, 1.0)}, {}, None),
    "encoder-linear": ("encoder taps, learned linear aligner (pooling, then a channel projection)",
                       {"synapse": {**ENCODER, "aligner": {"name": "linear", "params": {}}}}, {}, None),
    "encoder-lr3e-4": ("encoder taps, learning rates 3e-4 (1e-3 in the others)",
                       {"synapse": ENCODER, "unet_lr": 3e-4, "synapse_lr": 3e-4, "alpha_lr": 3e-4}, {}, None),
}
ROWS = 96
SIZES = ((160, 120), (40, 90))


def _cell(p: float, n: int) -> str:
    return f"{100 * p:.0f} ± {100 * math.sqrt(p * (1 - p) / n):.1f}"


def report(results: dict, out: Path) -> str:
    head = ("| variant | " + " | ".join(f"{a} %" for a in ATTRIBUTES)
            + " | alpha 0: register, tempo % | FD | music steps |")
    lines = [f"Generalisation rows: {ROWS} pictures of held-out families at 160x120 and 40x90, 10 DDIM steps; "
             "± one standard error.", "", head, "|" + "---|" * (len(ATTRIBUTES) + 4)]
    for entry in results.values():
        acc, n = entry["both"]["accuracy"], entry["both"]["n"]
        forced = entry.get("alpha_0")
        control = (f"{100 * forced['accuracy']['register']:.0f}, {100 * forced['accuracy']['tempo']:.0f}"
                   if forced else "-")
        lines.append(f"| {entry['label']} | " + " | ".join(_cell(acc[a], n) for a in ATTRIBUTES)
                     + f" | {control} | {entry['both']['fd']:.2f} | {entry.get('music_steps') or '-'} |")
    text = "\n".join(lines) + "\n"
    write_atomic(out / "results.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/recipe")
    parser.add_argument("--variants", nargs="+", default=["decoder", "encoder"], choices=list(VARIANTS))
    parser.add_argument("--image-from", default=None, help="take the frozen image LDM from this mini model folder")
    parser.add_argument("--controls", action="store_true", help="also score with alpha forced to 0")
    parser.add_argument("--score-only", nargs="+", default=[], metavar="MODEL:NAME",
                        help="score existing models (a folder or 'mini') as extra rows, without training")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps when scoring (default: 10)")
    args = parser.parse_args(argv)
    from melfusion import MelFusion

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    manifest = out / "general" / "manifest.jsonl"
    if not manifest.is_file():
        write_synthetic_manifest(manifest.parent, n=ROWS, seed=1000, start=100_000, families=HELDOUT_FAMILIES,
                                 sizes=SIZES)
    image_from = args.image_from
    jobs = [(name, *VARIANTS[name]) for name in args.variants]
    for spec in args.score_only:  # MODEL:NAME; fields None marks an existing model, reuse its folder
        model_dir, _, name = spec.rpartition(":") if ":" in spec else (spec, "", spec)
        jobs.append((name, name, None, {}, model_dir))
    for name, label, fields, sampling, reuse in jobs:
        if name in results:
            continue
        start = time.perf_counter()
        recipe = None
        if fields is None:  # --score-only: an existing model
            model_dir = reuse
        else:
            recipe = MiniRecipe(**{**BASE, **fields})
            folder = out / (reuse or name)
            model_dir = folder / "model"
            if not (model_dir / "melfusion_weights.json").is_file():
                if reuse:
                    raise SystemExit(f"{name}: train the variant {reuse!r} first (list it before {name!r})")
                train_mini(folder, recipe, image_from=image_from)
            image_from = image_from or str(model_dir)
        model = MelFusion.from_pretrained(model_dir)
        common = dict(num_inference_steps=args.steps, batch_size=48, progress=False, **sampling)
        entry = {"label": label, "model": str(model_dir), "train_s": time.perf_counter() - start,
                 "recipe": dataclasses.asdict(recipe) if recipe else None, "sampling": sampling,
                 "music_steps": recipe.music_steps if recipe else None,
                 "alphas": model.synapse.mixer.alphas().tolist() if model.synapse is not None else None,
                 "both": score_synthetic(model, manifest, **common).as_dict()}
        if args.controls and model.synapse is not None:
            entry["alpha_0"] = score_synthetic(model, manifest, alpha=0.0, **common).as_dict()
        # re-read before writing: another run may share this output folder
        results = {**(json.loads(results_path.read_text()) if results_path.is_file() else {}), **results}
        results[name] = entry
        write_atomic(results_path, json.dumps(results, indent=2))
        print(f"{name}: {entry['both']['accuracy']}", flush=True)
    print(report(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
