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
accuracies as bars with +-1 standard error; the scorer stores only each accuracy and the clip count, and
:func:`accuracy_se` derives the standard error from them: the per-clip outcomes are 0/1). Re-running reuses
finished variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
    accuracies as bars with standard errors, chance marked: :func:`ablation_figure`); return the markdown."""
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


def accuracy_se(accuracy: float, n: int) -> float:
    """The standard error of an accuracy over ``n`` clips, as a fraction.

    results.json keeps each attribute's accuracy and the clip count, not the per-clip outcomes; those are 0/1
    (right or wrong) with ``round(accuracy * n)`` ones, so the accuracy and ``n`` determine them exactly. Their
    sample standard deviation (``ddof=1``) over ``sqrt(n)`` is ``sqrt(p (1 - p) / (n - 1))``: zero at 0 or 100 %
    (where it understates the uncertainty), and 0 when ``n < 2``.
    """
    n = int(n)
    if n < 2:
        return 0.0
    p = round(float(accuracy) * n) / n
    return math.sqrt(p * (1.0 - p) / (n - 1))


def ablation_figure(bars: list[tuple[str, dict]], subtitle: str):
    """The chart of ``results.png`` as a matplotlib ``Figure`` (plain, not registered with pyplot): one panel per
    attribute, one horizontal bar per row of the tables (named on the left, its FD beside the name), the
    accuracy in % printed at each bar, +-1 standard error (:func:`accuracy_se`, from the clip count) as error
    bars and chance as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(ATTRIBUTES) + 3.4, 0.42 * len(bars) + 1.9))
    axes = fig.subplots(1, len(ATTRIBUTES), sharey=True)
    colours = [f"C{i % 10}" for i in range(len(bars))]
    rows = range(len(bars))
    for ax, attribute in zip(axes, ATTRIBUTES, strict=True):
        values = [100 * score["accuracy"][attribute] for _, score in bars]
        errors = [100 * accuracy_se(score["accuracy"][attribute], score.get("n", 0)) for _, score in bars]
        ax.barh(rows, values, xerr=errors, color=colours, height=0.7, capsize=2.5,
                error_kw={"elinewidth": 0.9, "ecolor": "0.2"})
        for y, (value, error) in enumerate(zip(values, errors, strict=True)):
            ax.text(value + error + 1.5, y, f"{value:.0f}", va="center", ha="left", fontsize=7.5,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.85})
        chance = 100 * CHANCE[attribute]
        ax.axvline(chance, color="black", linestyle="--", linewidth=0.9)
        ax.set_title(f"{attribute} (chance {chance:.0f} %)", fontsize=9.5)
        ax.set_xlim(0, 114)
        ax.set_xticks([0, 25, 50, 75, 100])
        ax.set_xlabel("read back from the audio, % of clips", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.25)
    axes[0].set_yticks(list(rows), [f"{name}  (FD {score['fd']:.0f})" for name, score in bars], fontsize=8)
    axes[0].invert_yaxis()  # the tables' order, top to bottom
    axes[0].set_ylabel("model / condition  (FD: lower is better)", fontsize=8)
    n = sorted({int(score.get("n", 0)) for _, score in bars})
    fig.suptitle(f"MeLFusion ablations on the synthetic world: {subtitle}\n"
                 f"bars: accuracy of each attribute; error bars: \u00b11 standard error over "
                 f"{'/'.join(map(str, n))} clips; dashed: chance", fontsize=9.5)
    fig.tight_layout()
    return fig


def _plot(bars: list[tuple[str, dict]], path: Path, subtitle: str) -> None:
    fig = ablation_figure(bars, subtitle)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


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
    parser.add_argument("--report-only", action="store_true",
                        help="train and score nothing: redraw results.md and results.png from OUTPUT/results.json "
                             "(benchmarks/results/ablation holds the measured one docs/images/ablation.png shows)")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.report_only:
        if not results:
            parser.error(f"--report-only: no results in {results_path}")
        print(report(results, args.music_steps, out))
        return 0
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
