"""Does a mini model hear the register and tempo in plain, fully saturated pictures of the world's hues?

    python benchmarks/pure_colours.py                       # the shipped mini model
    python benchmarks/pure_colours.py --model runs/mini/model --seeds 4

Plain pictures (300x200) of pure RGB red, yellow, green and blue (saturation 1, outside the 0.6-0.95 the
training pictures are augmented over) at the two shades' HSV values (0.36 dark, 0.92 bright), with one
caption, 10 DDIM steps, one clip per seed. Prints each picture's register and tempo read back from the audio
and the accuracy. A bright pure red has the luminance of a dark picture: a model that learned luminance
rather than HSV value gets it wrong.
"""

from __future__ import annotations

import argparse
import sys

from PIL import Image

from melfusion import MelFusion
from melfusion.datasets.synthetic import REGISTERS, SHADES, TEMPO_OF_COLOUR, TEMPOS, read_attributes

PURE = (("red", (1, 0, 0)), ("yellow", (1, 1, 0)), ("green", (0, 1, 0)), ("blue", (0, 0, 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="a save_pretrained folder or a shipped name (default: mini)")
    parser.add_argument("--seeds", type=int, default=2, help="clips per picture (default: 2)")
    parser.add_argument("--text", default="a calm flute melody")
    args = parser.parse_args(argv)
    model = MelFusion.from_pretrained(args.model)
    pictures, labels = [], []
    for colour, (name, rgb) in enumerate(PURE):
        for shade, (shade_name, value) in enumerate(SHADES):
            pictures.append(Image.new("RGB", (300, 200), tuple(round(255 * value * c) for c in rgb)))
            labels.append((f"{shade_name} {name}", shade, TEMPO_OF_COLOUR[colour]))
    hits = {"register": 0, "tempo": 0}
    print(f"model {args.model}, caption {args.text!r}, 10 DDIM steps, {args.seeds} seed(s)\n")
    print("| picture | register heard | tempo heard |")
    print("|---|---|---|")
    for seed in range(args.seeds):
        out = model.generate(image=pictures, text=[args.text] * len(pictures), num_inference_steps=10, seed=seed,
                             progress=False)
        for (label, register, tempo), wave in zip(labels, out.waveforms, strict=True):
            r = read_attributes(wave, out.sample_rate)
            hits["register"] += r.register == register
            hits["tempo"] += r.tempo == tempo
            heard = REGISTERS[r.register][0] if r.register is not None else "none"
            print(f"| {label} (seed {seed}) | {heard}{'' if r.register == register else ' (wrong)'} | "
                  f"{TEMPOS[r.tempo][0]}{'' if r.tempo == tempo else ' (wrong)'} |")
    n = len(pictures) * args.seeds
    print(f"\nregister {hits['register']}/{n}, tempo {hits['tempo']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
