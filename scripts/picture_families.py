"""Draw docs/images/picture_families.png: every picture family of the synthetic world, in each colour and
shade, marked as a training or a held-out family.

    python scripts/picture_families.py [--out docs/images/picture_families.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from melfusion.datasets.synthetic import COLOURS, HELDOUT_FAMILIES, PICTURE_FAMILIES, SHADES, render_picture
from melfusion.files import atomic_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/images/picture_families.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    classes = [(c, s) for s in range(len(SHADES)) for c in range(len(COLOURS))]
    fig, axes = plt.subplots(len(classes), len(PICTURE_FAMILIES), figsize=(1.25 * len(PICTURE_FAMILIES), 1.2 * 8))
    for j, family in enumerate(PICTURE_FAMILIES):
        for i, (colour, shade) in enumerate(classes):
            ax = axes[i, j]
            size = ((160, 120), (64, 64), (40, 90), (300, 300))[i % 4]
            # shown at 64 px, the resolution the mini image LDM sees every picture at
            ax.imshow(render_picture(colour, shade, rng, family, size).resize((64, 64)), aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                held = family in HELDOUT_FAMILIES
                ax.set_title(f"{family}\n({'held out' if held else 'training'})", fontsize=8,
                             color="firebrick" if held else "black")
            if j == 0:
                ax.set_ylabel(f"{SHADES[shade][0]} {COLOURS[colour][0]}", fontsize=8)
    fig.suptitle("Synthetic-world pictures: hue sets the tempo (warm fast, cool slow), brightness the register",
                 fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=72, format="png")
    with Image.open(buf) as im, atomic_path(out) as tmp:  # a 64-colour palette: a tenth of the size
        im.convert("RGB").quantize(64).save(tmp, format="PNG", optimize=True)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
