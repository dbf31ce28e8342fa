"""The paper's ablations (Tables 2 and 4) measured end to end on the synthetic world.

    python benchmarks/ablation.py --output runs/ablation                    # the figures in docs/mini.md
    python benchmarks/ablation.py --output runs/ablation --music-steps 300  # a quicker, rougher look

Every variant is the classic ``mini`` recipe (``melfusion.training.mini`` with ``augment=False``: the
64 px disc pictures; benchmarks/recipe_ablation.py measures the augmented recipe) trained from scratch with
the same seed, data and steps; they share one image LDM (trained by the first variant), which is frozen in all of
them, as in the paper. Variants:

- ``decoder / per-layer alpha``: the paper's best row (one alpha per decoder layer);
- ``decoder / shared alpha``: one alpha for every decoder layer;
- ``encoder / per-layer alpha``: the image UNet's encoder self-attention into the music UNet's encoder;
- ``text only``: no synapse at all (a Tango-style text-to-music model).

Each is scored on the held-out synthetic set (other pictures, other captions) by the accuracy of the four
attributes read back from the generated audio and by the Frechet distance on a simple mel-band embedding
(``melfusion.metrics.synthetic``). Table 4's rows come from the text-only model, the decoder model with
every caption dropped (image only), and the decoder model with both; two controls on the decoder model
(alpha forced to 0, pictures swapped between rows) show the image information travels through the synapse.

Writes ``OUTPUT/results.json``, ``OUTPUT/results.md`` (the tables) and ``OUTPUT/results.png`` (the same
accuracies as bars). Re-running reuses finished variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from melfusion.datasets.synthetic import ATTRIBUTES, CHANCE
from melfusion.files import atomic_path, write_atomic
from melfusion.metrics.synthetic import score_synthetic
from melfusion.training.mini import MiniRecipe, train_mini

IMAGE_DECODER = None  # the preset's default: every decoder transformer layer, paired in order
ENCODER = {"image_layers": ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0"],
           "music_layers": ["down_blocks.2.attentions.0", "down_blocks.3.attentions.0"]}
DECODER = {"image_layers": None, "music_layers": None}  # every decoder transformer layer, paired in order
VARIANTS = {
    "decoder-per-layer": DECODER,
    "decoder-shared": {**DECODER, "mixer": {"name": "convex", "params": {"init": 0.5, "shared": True}}},
    "encoder-per-layer": ENCODER,
    "text-only": {"enabled": False},
}


def _row(name: str, score: dict) -> str:
    acc = score["accuracy"]
    cells = [f"{100 * acc[a]:.0f}" for a in ATTRIBUTES]
    return f"| {name} | " + " | ".join(cells) + f" | {score['fd']:.2f} |"


def _table(title: str, rows: list[tuple[str, dict]]) -> list[str]:
    head = "| " + " | ".join(["model"] + [f"{a} % (chance {100 * CHANCE[a]:.0f})" for a in ATTRIBUTES]
                              + ["FD (lower is better)"]) + " |"
    sep = "|" + "---|" * (len(ATTRIBUTES) + 2)
    return [f"**{title}**", "", head, sep] + [_row(n, s) for n, s in rows] + [""]


def report(results: dict, music_steps: int, out: Path) -> str:
    """Write ``out/results.md`` (Tables 2 and 4 and the controls) and ``out/results.png`` (the same
    accuracies as bars, chance marked); return the markdown."""
    n_rows = next(iter(results.values()))["both"]["n"] if results else 0
    lines = [f"Held-out synthetic set ({n_rows} clips), {music_steps} music training steps per variant.", ""]
    bars: list[tuple[str, dict]] = []
    best = results.get("decoder-per-layer")
    if best and "text-only" in results:
        rows = [("text only (no synapse)", results["text-only"]["both"]),
                ("image only (captions dropped)", best["image_only"]),
                ("image + text", best["both"])]
        lines += _table("Table 4: which cues the model gets", rows)
        bars += rows
    table2 = [(label, results[key]["both"]) for key, label in (
        ("decoder-per-layer", "decoder taps, one alpha per layer"),
        ("decoder-shared", "decoder taps, one shared alpha"),
        ("encoder-per-layer", "encoder taps, one alpha per layer")) if key in results]
    if table2:
        lines += _table("Table 2: where the image features enter and how they are weighted", table2)
        bars += table2[1:] if bars else table2
    if best and "alpha_0" in best:
        swapped = best["swapped"]
        lines += _table("Controls on the decoder / per-layer model", [
            ("image + text", best["both"]), ("alpha forced to 0", best["alpha_0"]),
            ("pictures swapped between rows", swapped)])
        bars += [("alpha forced to 0", best["alpha_0"]), ("pictures swapped", swapped)]
        vs = swapped["accuracy_vs_image"]
        lines += [f"With swapped pictures the generated register follows the picture: {100 * vs['register']:.0f} % "
                  f"against the pictures' own register, tempo {100 * vs['tempo']:.0f} %.", ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.md", text)
    if bars:
        _plot(bars, out / "results.png", f"{n_rows} held-out clips, {music_steps} music training steps")
    return text


def _plot(bars: list[tuple[str, dict]], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(3.2 * len(ATTRIBUTES), 3.6), sharey=True)
    colours = plt.get_cmap("tab10").colors
    for ax, attribute in zip(axes, ATTRIBUTES, strict=True):
        values = [100 * score["accuracy"][attribute] for _, score in bars]
        ax.bar(range(len(bars)), values, color=[colours[i % 10] for i in range(len(bars))])
        ax.axhline(100 * CHANCE[attribute], color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{attribute} (chance {100 * CHANCE[attribute]:.0f} %)", fontsize=10)
        ax.set_xticks([])
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("recovered from the audio, %")
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colours[i % 10]) for i in range(len(bars))],
               [f"{name} (FD {score['fd']:.0f})" for name, score in bars], loc="lower center",
               ncol=min(4, len(bars)), fontsize=8, frameon=False)
    fig.suptitle(f"MeLFusion ablations on the synthetic world: {subtitle}", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/ablation")
    parser.add_argument("--music-steps", type=int, default=MiniRecipe.music_steps)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--limit", type=int, default=None, help="score only the first N held-out rows")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--controls", action="store_true",
                        help="also score the decoder model with alpha forced to 0 and with swapped pictures "
                             "(benchmarks/mini_controls.py does this for the shipped model)")
    parser.add_argument("--image-from", default=None,
                        help="take the frozen image LDM from this trained mini model (e.g. runs/mini/model) "
                             "instead of training one in the first variant")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    image_from = args.image_from
    for name in args.variants:
        # the classic recipe these tables were measured with: 64 px disc pictures, no augmentation
        recipe = MiniRecipe(music_steps=args.music_steps, synapse=VARIANTS[name], augment=False, n_image=None)
        folder = out / name
        model_dir = folder / "model"
        start = time.perf_counter()
        if not (model_dir / "melfusion_weights.json").is_file():
            train_mini(folder, recipe, image_from=image_from)
        image_from = image_from or model_dir
        trained_s = time.perf_counter() - start
        if name in results and results[name].get("music_steps") == args.music_steps:
            continue
        from melfusion import MelFusion

        model = MelFusion.from_pretrained(model_dir)
        heldout = folder / "data" / "heldout" / "manifest.jsonl"
        common = dict(limit=args.limit, num_inference_steps=args.steps, batch_size=48)
        entry = {"music_steps": args.music_steps, "recipe": dataclasses.asdict(recipe), "train_s": trained_s,
                 "alphas": model.synapse.mixer.alphas().tolist() if model.synapse is not None else None,
                 "both": score_synthetic(model, heldout, **common).as_dict()}
        if model.synapse is not None and name == "decoder-per-layer":
            entry["image_only"] = score_synthetic(model, heldout, text="", **common).as_dict()
            if args.controls:
                entry["alpha_0"] = score_synthetic(model, heldout, alpha=0.0, **common).as_dict()
                entry["swapped"] = score_synthetic(model, heldout, swap_images=True, **common).as_dict()
        results[name] = entry
        write_atomic(results_path, json.dumps(results, indent=2))
    print(report(results, args.music_steps, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
