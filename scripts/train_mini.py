"""Train the shipped ``mini`` model from scratch on this machine's CPU (about 40 minutes, fixed seed).

    python scripts/train_mini.py --output runs/mini            # data, image LDM, music model -> runs/mini/model
    python scripts/train_mini.py --output runs/mini --install  # ... and copy it to src/weights/mini (the package)

Interrupted? Run the same command again: the data is reused and the music stage resumes from its last
checkpoint (the image LDM stage is short and is redone). The settings are ``MiniRecipe``'s defaults; any
of them can be changed on the command line (``--music-steps 300`` for a quick look).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from melfusion.training.mini import MiniRecipe, train_mini

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "weights" / "mini"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/mini", help="run folder (default: runs/mini)")
    parser.add_argument("--install", action="store_true", help=f"copy the trained model to {SHIPPED}")
    parser.add_argument("--image-from", default=None,
                        help="reuse the frozen image LDM of this trained mini model instead of training one")
    for f in dataclasses.fields(MiniRecipe):
        if f.type in ("int", "float", int, float, "int | None"):
            kind = float if f.type in ("float", float) else int
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                                help=f"(default: {f.default})")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=MiniRecipe.augment,
                        help="training pictures of several families, sizes and JPEG qualities; --no-augment: "
                             f"the classic 64 px discs (default: {MiniRecipe.augment})")
    low, high = MiniRecipe.saturation
    parser.add_argument("--saturation", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(low, high),
                        help=f"the augmented pictures' saturation range (default: {low} {high})")
    args = parser.parse_args(argv)
    try:
        recipe = MiniRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MiniRecipe)
                               if hasattr(args, f.name)})
    except ValueError as e:
        parser.error(str(e))  # one line, exit status 2
    start = time.perf_counter()
    model = train_mini(args.output, recipe, image_from=args.image_from)
    print(f"trained {model} in {(time.perf_counter() - start) / 60:.1f} min")
    if args.install:
        from melfusion.files import replace_folder
        from melfusion.pipeline import is_model_entry

        with replace_folder(SHIPPED, "--install", owned=is_model_entry) as tmp:  # swapped in whole
            shutil.copytree(model, tmp, dirs_exist_ok=True)
        print(f"installed into {SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
