"""Draw docs/images/storyboard.png: a four-picture storyboard on the shipped mini model, its mel spectrogram
with the section boundaries marked and each section's picture above it.

    python scripts/storyboard_figure.py                      # writes docs/images/storyboard.png
    python scripts/storyboard_figure.py --out /tmp/story.png --seed 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from melfusion import MelFusion
from melfusion.datasets.synthetic import REGISTERS, TEMPO_OF_COLOUR, TEMPOS, read_attributes, render_picture
from melfusion.plots import draw_mel

ROOT = Path(__file__).resolve().parent.parent
#: (label, colour, shade, family): bright-warm, dark-cool, bright-cool, dark-warm
SECTIONS = (("bright red", 0, 1, "triangle"), ("dark blue", 3, 0, "photo"), ("bright green", 2, 1, "checker"),
            ("dark yellow", 1, 0, "gradient"))


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "storyboard.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    model = MelFusion.from_pretrained("mini")
    rng = np.random.default_rng(args.seed)
    pictures = [render_picture(c, s, rng, f, (160, 120)) for _, c, s, f in SECTIONS]
    text = "a calm flute melody"
    out = model.generate(images=pictures, text=text, num_inference_steps=args.steps, seed=args.seed, progress=False)
    sr, wave = out.sample_rate, out.waveforms[0]
    mel = out.mel[0]  # (frames, mels), natural log of the mel magnitude
    seconds = wave.size / sr
    fig = plt.figure(figsize=(11, 4.6), constrained_layout=True)
    grid = fig.add_gridspec(2, len(SECTIONS), height_ratios=[1, 2.4])
    for k, ((label, colour, shade, family), pic, (a, b)) in enumerate(zip(SECTIONS, pictures, out.sections,
                                                                          strict=True)):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(pic)
        heard = read_attributes(wave[int(a * sr): int(b * sr)], sr)
        reg = REGISTERS[heard.register][0] if heard.register is not None else "?"
        tempo = TEMPOS[heard.tempo][0] if heard.tempo is not None else "?"
        want = f"{REGISTERS[shade][0]}, {TEMPOS[TEMPO_OF_COLOUR[colour]][0]}"
        ax.set_title(f"{label} ({family})\nwants {want}; heard {reg}, {tempo}", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    # time in s, frequency in Hz on the mel axis, dB colours: the axes of GenerationOutput.save_spectrogram
    image, label = draw_mel(ax, mel, **out.mel_params)
    ax.set_xlim(0, seconds)
    for a, _ in out.sections[1:]:
        ax.axvline(a, color="white", linestyle="--", linewidth=1.2)
    ax.set_title(f"storyboard of four pictures, {out.sections[0][1]:.2f} s each, caption {text!r} "
                 f"(dashed: section boundaries, {model.config.sampling.seconds / 5:.2f} s crossfade)", fontsize=10)
    fig.colorbar(image, ax=ax, label=label, pad=0.01)
    from melfusion.files import atomic_path

    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
