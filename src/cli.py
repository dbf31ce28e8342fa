"""``melfusion generate | train | evaluate | inspect``: a thin shell over the library."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from .scheduler_names import SCHEDULERS

__all__ = ["main"]


def _inspect(args: argparse.Namespace) -> int:
    from .config import MelFusionConfig
    from .pipeline import MelFusion, probe_shape

    cfg = MelFusionConfig.load(args.config) if args.config else MelFusionConfig.preset(args.preset)
    fs = cfg.feature_source.build(weights=False, device="meta")
    den = cfg.denoiser.build(weights=False, device="meta")
    codec = cfg.codec.build(weights=False, device="meta")
    synapse = MelFusion.build_synapse(cfg, fs, den, codec)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    def modules(part) -> str:
        return ", ".join(f"{name} {count(m):,}" for name, m in part.stored_modules().items())

    shape = probe_shape(cfg, codec, den)
    print(f"preset: {cfg.name or args.config}   (built on the meta device: no weights, no memory)")
    print(f"image model ({cfg.feature_source.name}): {count(fs):,} parameters ({modules(fs)}), "
          f"{len(fs.layers)} taps")
    print(f"music denoiser ({cfg.denoiser.name}): {count(den):,} parameters ({modules(den)}), "
          f"{cfg.sampling.seconds} s -> latent {tuple(shape)}, {den.noise_schedule.family} schedule "
          f"({den.noise_schedule.prediction_type})")
    rule = "explicit pairs" if cfg.synapse.pairs else f"pairing: {cfg.synapse.pairing}"
    print(f"mixer: {cfg.synapse.mixer.name} {cfg.synapse.mixer.params or ''}  aligner: {cfg.synapse.aligner.name}"
          f"  ({rule})")
    rows = synapse.wiring()
    cols = ["image_layer", "music_layer", "heads", "head_dim", "image_tokens", "music_tokens", "aligner", "params"]
    table = [cols] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for j, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"{len(rows)} layer pairs; parameters added by the synapse: {count(synapse):,}")
    return 0


def _load_model(args: argparse.Namespace, dtype):
    """The model the flags name: --model (default: the shipped mini), --preset or --config."""
    from .config import MelFusionConfig
    from .pipeline import MelFusion

    if args.model or not (args.preset or args.config):
        # no model, preset or config: the shipped mini model (docs/mini.md)
        try:
            return MelFusion.from_pretrained(args.model or "mini", device=args.device, dtype=dtype)
        except ValueError as exc:
            raise _as_flag(exc) from None
    cfg = MelFusionConfig.load(args.config) if args.config else MelFusionConfig.preset(args.preset)
    if not args.quiet:
        print(f"note: --{'preset' if args.preset else 'config'} builds {cfg.name or 'the model'} with random or "
              "pretrained-hub weights, as its config says; leave it out to use the shipped trained model.",
              file=sys.stderr)
    try:
        return MelFusion.from_config(cfg, device=args.device, dtype=dtype)
    except ValueError as exc:
        raise _as_flag(exc) from None


def _model_name(args: argparse.Namespace) -> str:
    if args.model:
        return str(args.model)
    if args.config:
        return f"config:{args.config}"
    return f"preset:{args.preset}" if args.preset else "mini"


def _check_device_flag(args: argparse.Namespace) -> None:
    if args.device is not None and str(args.device).split(":")[0] == "meta":
        raise ValueError("--device: 'meta' holds no weights and cannot generate; `melfusion inspect` builds a "
                         "model there")


def _generate_manifest(args: argparse.Namespace) -> int:
    from .batch import generate_manifest
    from .files import OutputExistsError

    for flag, value in (("--image", args.image), ("--text", args.text), ("--out", args.out),
                        ("--spectrogram", args.spectrogram), ("--durations", args.durations),
                        ("--crossfade", args.crossfade), ("--audio", args.audio), ("--video", args.video),
                        ("--mux", args.mux), ("--every", args.every)):
        if value is not None:
            raise ValueError(f"{flag}: not used with --manifest (each row gives its image and caption; files go "
                             "to --out-dir)")
    if not args.out_dir:
        raise ValueError("--out-dir: required with --manifest (the folder the generated files go to)")
    if not str(args.manifest).strip():  # Path("") is ".": the current folder would be read as a manifest
        raise ValueError("--manifest: expected a file or folder, got an empty string")
    if not Path(args.manifest).exists():
        raise ValueError(f"--manifest: no such file or folder {args.manifest!r}")
    _check_device_flag(args)
    if args.device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        args.device = str(PartialState().device)  # under accelerate launch: this process's device
    model = _load_model(args, _dtype(args.dtype))
    try:
        report = generate_manifest(
            model, args.manifest, args.out_dir, seed=args.seed,
            batch_size=1 if args.batch_size is None else args.batch_size,  # 0 is refused, not taken as 1
            num_samples=args.num_samples, num_inference_steps=args.steps, guidance_scale=args.guidance,
            image_guidance_scale=args.image_guidance, scheduler=args.scheduler, seconds=args.seconds,
            image_steps=args.image_steps, alpha=args.alpha, format=args.manifest_format, limit=args.limit,
            model_name=_model_name(args), overwrite=args.overwrite, progress=not args.no_progress)
    except ValueError as exc:
        raise _as_flag(exc) from None
    except OutputExistsError as exc:  # "out_dir: ..." -> "--out-dir: ..."
        raise OutputExistsError(str(_as_flag(ValueError(str(exc))))) from None
    if os.environ.get("RANK", "0") == "0":
        print(report.summary(), file=sys.stderr if report.bad else sys.stdout)
        if report.generations is not None:
            print(f"provenance: {report.generations}  [{report.seconds:.1f} s]")
    if report.bad:
        if os.environ.get("RANK", "0") == "0":
            print(f"melfusion generate: {len(report.bad)} bad rows were skipped (listed above); the other rows' "
                  "files are complete", file=sys.stderr)
        return 2
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .files import AUDIO_SUFFIXES, check_output, output_paths
    from .images import open_image

    if args.manifest is not None:
        return _generate_manifest(args)
    if args.video is not None and args.image is not None:
        raise ValueError("--video: give --video (its scenes are the pictures) or --image, not both")
    if args.image is None and args.video is None:
        raise ValueError("--image: required (or --video, or --manifest and --out-dir to generate a whole test set)")
    for flag, value in (("--text", args.text), ("--out", args.out)):
        if value is None:
            raise ValueError(f"{flag}: required (or give --manifest and --out-dir to generate a whole test set)")
    for flag, value in (("--out-dir", args.out_dir), ("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--manifest-format", args.manifest_format)):
        if value is not None:
            raise ValueError(f"{flag}: only with --manifest")
    if args.video is None:
        for flag, value in (("--mux", args.mux), ("--every", args.every)):
            if value is not None:
                raise ValueError(f"{flag}: only with --video")
    if args.audio is None:
        for flag, value in (("--continue-seconds", args.continue_seconds), ("--regenerate", args.regenerate)):
            if value is not None:
                raise ValueError(f"{flag}: needs --audio (the clip to continue or repaint)")
    # fail early, before any model is built
    pictures = [open_image(p, "--image") for p in args.image] if args.image is not None else None
    if args.audio is not None:
        from .files import check_input_file

        check_input_file(args.audio, "--audio")
    storyboard = None
    inputs = [*(args.image or []), args.config, args.audio, args.video]
    # every output is checked before any work: a folder, a wrong suffix, an input or (without --overwrite)
    # an existing file is refused now, not after the generation
    count = args.num_samples if args.num_samples is not None and 0 < args.num_samples <= 4096 else 1
    outs = [check_output(p, "--out", overwrite=args.overwrite, inputs=inputs, suffixes=AUDIO_SUFFIXES)
            for p in output_paths(args.out, count)]
    spectrogram = args.spectrogram or str(Path(args.out).with_suffix(".png"))
    check_output(spectrogram, "--spectrogram", overwrite=args.overwrite, inputs=inputs + [str(p) for p in outs],
                 suffixes=(".png",))
    if args.mux is not None:
        from .video import VIDEO_SUFFIXES

        check_output(args.mux, "--mux", overwrite=args.overwrite, inputs=inputs + [str(p) for p in outs]
                     + [spectrogram], suffixes=VIDEO_SUFFIXES)
    if args.video is not None:
        from .video import read_storyboard

        try:
            storyboard = read_storyboard(args.video, every=args.every, name="--video")
        except ValueError as exc:
            raise _as_flag(exc) from None
        pictures = storyboard.images
        if args.durations is not None:
            raise ValueError("--durations: with --video each scene lasts as long as in the video")
    dtype = _dtype(args.dtype)
    _check_device_flag(args)
    start = time.perf_counter()
    model = _load_model(args, dtype)
    if args.alpha is not None:
        raise ValueError("--alpha: only with --manifest (in Python: model.synapse.mixer.forced(alpha))")
    if args.num_samples is None and model.config.sampling.num_samples != 1:  # the config's count: check again
        for p in output_paths(args.out, model.config.sampling.num_samples):
            check_output(p, "--out", overwrite=args.overwrite, inputs=inputs, suffixes=AUDIO_SUFFIXES)
    extra: dict = {}
    several = len(pictures) > 1 or len(args.text) > 1 or args.durations is not None or storyboard is not None
    if several:
        extra["images"] = pictures
        extra["durations"] = storyboard.durations if storyboard is not None else args.durations
        if len(args.text) > 1:
            extra["texts"] = args.text
    else:
        extra["image"] = pictures[0]
    text = args.text[0] if len(args.text) == 1 else ""
    for key in ("crossfade", "continue_seconds"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    if args.audio is not None:
        extra["audio"] = args.audio
    if args.regenerate is not None:
        extra["regenerate"] = tuple(args.regenerate)
    try:
        out = model.generate(
            text=text, num_inference_steps=args.steps, guidance_scale=args.guidance,
            image_guidance_scale=args.image_guidance, scheduler=args.scheduler, seconds=args.seconds,
            num_samples=args.num_samples, seed=args.seed, image_steps=args.image_steps, progress=not args.no_progress,
            **extra,
        )
    except ValueError as exc:
        raise _as_flag(exc) from None
    paths = out.save(args.out, overwrite=args.overwrite)
    out.save_spectrogram(spectrogram, overwrite=args.overwrite)
    took = time.perf_counter() - start
    for p in paths:
        print(f"wrote {p} ({out.waveforms.shape[-1] / out.sample_rate:.2f} s at {out.sample_rate} Hz)")
    if len(out.sections) > 1:
        print("sections: " + ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in out.sections))
    print(f"wrote {spectrogram}  [{took:.1f} s]")
    if args.mux is not None:
        from .video import mux

        written = mux(args.video, out.waveforms[0], out.sample_rate, args.mux, overwrite=args.overwrite, name="--mux")
        print(f"wrote {written} (the video with the new soundtrack)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training import NonFiniteLossError, TrainConfig, Trainer

    config = TrainConfig.load(args.config, **{"data.manifest": args.manifest, "output": args.output,
                                              "max_steps": args.max_steps})
    trainer = Trainer(config)
    main = trainer.accelerator.is_main_process
    try:
        result = trainer.train(resume=args.resume if args.resume is not None else False)
    except NonFiniteLossError as exc:
        print(f"melfusion train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from .training import latest_checkpoint

        last = latest_checkpoint(trainer.checkpoint_dir)
        print(f"melfusion train: interrupted at step {trainer.step}; "
              + (f"continue from {last} with --resume" if last else "no checkpoint was written yet"),
              file=sys.stderr)
        return 130
    if main:
        skipped = f"; {len(trainer.skipped)} bad rows skipped (see {config.output}/skipped_rows.json)" \
            if trainer.skipped else ""
        print(f"trained {result.step} steps on {len(trainer.rows)} rows{skipped}")
        print(f"model: {result.model_path}   checkpoint: {result.last_checkpoint}")
        print(f"log: {Path(config.output) / 'train_log.csv'}   plot: {Path(config.output) / 'training.png'}")
    return 0


def _app(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port: expected 1-65535, got {args.port}")
    if not 0 < args.max_upload_mb < float("inf"):
        raise ValueError(f"--max-upload-mb: expected a positive number, got {args.max_upload_mb:g}")
    import socket

    try:  # the address and the port, checked before the model loads
        family, _, _, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"--host: cannot serve on {args.host!r} ({exc})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"--port: cannot serve on {args.host}:{args.port} ({exc.strerror or exc}); is another "
                             "app using it? Choose another --port") from None
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("melfusion app needs gradio: pip install 'melfusion[app]'") from None
    from .app import launch

    _check_device_flag(args)
    print(f"melfusion app: loading model {args.model!r}, then serving on http://{args.host}:{args.port}/ "
          "(Ctrl+C stops it)")
    try:
        launch(args.host, args.port, args.model, device=args.device, dtype=_dtype(args.dtype), share=args.share,
               max_upload_mb=args.max_upload_mb)
    except (ValueError, OSError) as exc:
        text = " ".join(str(exc).split())
        if text.startswith("model:"):
            raise ValueError("--model:" + text[len("model:"):]) from None
        raise
    return 0


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with every option's default (``(default: X)``, unless the help already says it) and the examples
    (the parser's epilog) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or re.search(r"\bdefault\b", text) or not action.option_strings
                or action.nargs == 0  # a flag: store_true/false, --help, --version
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _mini_sampling() -> dict:
    """The shipped mini model's sampling settings, read from its config file (no torch): the defaults that
    ``generate --help`` shows."""
    import json

    try:
        config = json.loads((Path(__file__).parent / "weights" / "mini" / "melfusion_config.json").read_text())
        return dict(config.get("sampling") or {})
    except (OSError, ValueError):
        return {}


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``melfusion generate: error: ...``) and exit status 2.

    A subcommand's arguments may be added late, by ``populate(parser)``, the first time that subcommand is
    parsed or its help printed: ``melfusion --help`` then imports no subcommand's module (nor torch).
    """

    def __init__(self, *args, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _populated(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)
            for action in self._actions:  # a populated command's own subcommands (data check, ...) take -q too
                if action.nargs == argparse.PARSER:
                    for command in action.choices.values():
                        _add_quiet(command)
                        command.epilog = command.epilog or self.epilog

    def parse_known_args(self, args=None, namespace=None):
        self._populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populated()
        return super().format_help()

    def format_usage(self) -> str:
        self._populated()
        return super().format_usage()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: generate's Python argument names -> its flags, so an error names what the user typed
_FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "image_guidance_scale": "--image-guidance",
          "seconds": "--seconds", "num_samples": "--num-samples", "seed": "--seed", "image_steps": "--image-steps",
          "scheduler": "--scheduler", "device": "--device", "dtype": "--dtype", "text": "--text", "image": "--image",
          "batch_size": "--batch-size", "out_dir": "--out-dir", "manifest": "--manifest", "alpha": "--alpha",
          "limit": "--limit", "num_processes": "--num-processes", "images": "--image", "texts": "--text",
          "durations": "--durations", "crossfade": "--crossfade", "audio": "--audio",
          "continue_seconds": "--continue-seconds", "regenerate": "--regenerate", "video": "--video",
          "every": "--every"}


def _as_flag(exc: ValueError) -> ValueError:
    text = str(exc)
    name, sep, rest = text.partition(":")
    base = name.split("[")[0]  # images[2] -> --image
    if sep and base in _FLAGS:
        return ValueError(f"{_FLAGS[base]}{name[len(base):]}:{rest}")
    return exc


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="melfusion", description="Music from an image and a text prompt.")
    parser.add_argument("--version", action="version", version=f"melfusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mini = _mini_sampling()

    def model_default(key: str, fallback: str = "?") -> str:
        return f"default: the model's own; the shipped mini's is {mini.get(key, fallback)}"

    g = sub.add_parser("generate", help="generate music from an image and a text, or for every row of a manifest",
                       epilog=_GENERATE_EXAMPLES)
    g.add_argument("--image", default=None, action="append",
                   help="image file (any PIL mode or size); repeat it for a storyboard, one section per picture")
    g.add_argument("--text", default=None, action="append",
                   help="text prompt; repeat it to give each storyboard section its own")
    g.add_argument("--durations", type=float, nargs="+", default=None, metavar="S",
                   help="seconds of each storyboard section (default: --seconds split evenly, or one clip each)")
    g.add_argument("--crossfade", type=float, default=None,
                   help="seconds over which one section's picture turns into the next (default: a fifth of the "
                        "model's clip, at most 1)")
    g.add_argument("--audio", default=None, help="a clip to continue (--continue-seconds) or repaint (--regenerate)")
    g.add_argument("--continue-seconds", type=float, default=None, metavar="S", help="continue --audio by S seconds")
    g.add_argument("--regenerate", type=float, nargs=2, default=None, metavar=("T0", "T1"),
                   help="repaint --audio from T0 to T1 seconds, keeping the rest")
    g.add_argument("--video", default=None,
                   help="a video: its scenes become storyboard sections and the music lasts as long "
                        "(needs melfusion[video])")
    g.add_argument("--every", type=float, default=None, metavar="S",
                   help="with --video: a section every S seconds instead of one per scene")
    g.add_argument("--mux", default=None, help="with --video: also write the video with the music as its soundtrack "
                   "(.mp4, .mov, .mkv)")
    g.add_argument("--out", default=None, help="output WAV path")
    g.add_argument("--manifest", default=None,
                   help="generate one file per row of this test set instead (JSONL, CSV or folder: captions, "
                   "img_path, optional location); resumable, see docs/generation.md")
    g.add_argument("--out-dir", default=None, help="with --manifest: the folder for the files and generations.jsonl")
    g.add_argument("--batch-size", type=int, default=None, help="with --manifest: rows per batch (default 1)")
    g.add_argument("--manifest-format", default=None, choices=["jsonl", "csv", "folder"],
                   help="with --manifest: its format (default: from the suffix)")
    g.add_argument("--limit", type=int, default=None, help="with --manifest: only the first N rows")
    g.add_argument("--alpha", type=float, default=None,
                   help="with --manifest: force every synapse weight to this value (0: text only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (--quiet also drops the output lines)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="folder written by MelFusion.save_pretrained, a shipped model name, or a "
                     "hub id when online (default: the shipped 'mini' model)")
    src.add_argument("--preset", default=None, help="build a preset (tiny, mini, paper...) from its config instead")
    src.add_argument("--config", help="build from a model config file (.json or .yaml) instead")
    g.add_argument("--steps", type=int, default=None, help=f"denoising steps ({model_default('num_inference_steps')})")
    g.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale ({model_default('guidance_scale')})")
    g.add_argument("--image-guidance", type=float, default=None,
                   help=f"separate image guidance scale ({model_default('image_guidance_scale')})")
    g.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="sampler (default: the model's config, else its noise schedule's own)")
    g.add_argument("--seconds", type=float, default=None, help=f"audio length in seconds ({model_default('seconds')}; "
                   "longer is generated in overlapping windows)")
    g.add_argument("--num-samples", type=int, default=None, help="samples per prompt (default: the model's own, 1)")
    g.add_argument("--image-steps", type=int, default=None,
                   help="image-UNet timesteps (default: every step; fewer is faster, see the README)")
    g.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same music")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: as the model was saved; the shipped mini's is float32)")
    g.add_argument("--spectrogram", default=None, help="spectrogram PNG path (default: OUT with .png)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never an input file); without it they are refused")
    g.set_defaults(func=_generate)

    t = sub.add_parser("train", help="train the synapse (and the music UNet) on image-text-music triplets")
    t.add_argument("--config", required=True, help="training config (.yaml or .json; see docs/training.md)")
    t.add_argument("--manifest", default=None, help="data manifest (overrides data.manifest)")
    t.add_argument("--output", default=None, help="run folder (overrides output)")
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides max_steps)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in the run folder (or the one given)")
    t.set_defaults(func=_train)

    sub.add_parser("evaluate", help="FAD, FD, KL, IMSM and CLAP score of generated audio (docs/evaluation.md)",
                   populate=_evaluate_arguments)
    sub.add_parser("benchmark", help="the paper's conditioning ablation (text + image / text only / image only) "
                   "on a test set: generate, score, print the table (docs/evaluation.md)",
                   populate=_benchmark_arguments)

    i = sub.add_parser("inspect", help="print the synapse wiring of a preset (built on the meta device)")
    isrc = i.add_mutually_exclusive_group()
    isrc.add_argument("--preset", default="paper", help="a preset name (tiny, mini, paper, reference, audioldm, ...)")
    isrc.add_argument("--config", help="config file (.json or .yaml)")
    i.set_defaults(func=_inspect)

    sub.add_parser("data", help="check a manifest, or split it into train/val/test (docs/datasets.md)",
                   populate=_data_arguments)

    a = sub.add_parser("app", help="serve the web app: picture + prompt -> music, compare, storyboard "
                       "(needs melfusion[app]; docs/app.md)")
    a.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: %(default)s, this machine only; 0.0.0.0 for every network)")
    a.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    a.add_argument("--model", default="mini", help="the model the page starts with: a shipped name, a folder "
                   "written by save_pretrained, or preset:NAME (default: %(default)s)")
    a.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    a.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weights dtype")
    a.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default: %(default)s)")
    a.add_argument("--share", action="store_true", help="also a public gradio.live link (needs the internet)")
    a.set_defaults(func=_app)
    for name, command in sub.choices.items():
        _add_quiet(command)
        command.epilog = command.epilog or _EXAMPLES.get(name)
    return parser


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    try:
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="print nothing but errors and warnings: no progress bars (melfusion's, nor "
                                 "transformers' or diffusers' weight loading), no notes, no output lines; what a "
                                 "failing command printed is shown on stderr")
    except argparse.ArgumentError:  # it has one already
        pass


_GENERATE_EXAMPLES = """examples:
  melfusion generate --image examples/images/blue-bright.png --text "a calm flute melody" --out song.wav
  melfusion generate --image pic.png --text "lively jazz piano" --out song.wav --steps 50 --seed 3 --overwrite
  melfusion generate --image a.png --image b.png --text "a calm flute melody" --durations 4 4 --out story.wav
  melfusion generate --manifest test.jsonl --out-dir generated/ --batch-size 8

Outputs: OUT (WAV, FLAC or OGG by its suffix) and its spectrogram (OUT with .png, or --spectrogram). An
existing output is refused unless --overwrite is given (an input is never overwritten).
exit status: 0 done, 1 the run failed (a bug), 2 bad input, 130 interrupted."""

_EXAMPLES = {
    "train": """examples:
  melfusion train --config examples/train-tiny.yaml --output runs/tiny --max-steps 20
  melfusion train --config examples/train-tiny.yaml --output runs/tiny --resume

Outputs: the run folder: model/, checkpoints/, train_log.csv and training.png.
exit status: 0 done, 1 stopped on a NaN loss, 2 bad input, 130 interrupted (resume with --resume).""",
    "evaluate": """examples:
  melfusion evaluate --generated generated/ --reference test.jsonl
exit status: 0 done, 1 a bug, 2 bad input.""",
    "benchmark": """exit status: 0 done, 1 a bug, 2 bad input.""",
    "inspect": """examples:
  melfusion inspect                 # the paper's wiring
  melfusion inspect --preset mini""",
    "data": """examples:
  melfusion data check train.jsonl
  melfusion data split all.jsonl --out-dir splits/
exit status: 0 done, 2 bad input (or bad rows found).""",
    "app": """examples:
  melfusion app                     # http://127.0.0.1:7860/ with the shipped mini model
  melfusion app --port 8080 --model runs/tiny/model
exit status: 0 stopped, 2 bad input (e.g. gradio missing).""",
}


# the subcommands whose arguments come from their own modules, added only when that subcommand is used
def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from .metrics.evaluate import add_evaluate_arguments, run_evaluate

    add_evaluate_arguments(parser)
    parser.set_defaults(func=run_evaluate)


def _benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    from .benchmark import add_benchmark_arguments, run_benchmark_cli

    add_benchmark_arguments(parser)
    parser.set_defaults(func=run_benchmark_cli)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    from .datasets.tools import add_data_arguments

    add_data_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Exit status: 0 done, 1 a training stopped on a NaN loss or an internal error (a bug),
    2 bad input or an expected failure (one line on stderr naming the argument or file), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    old_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # a warning is one line too, not the source line it came from
    quiet = getattr(args, "quiet", False)
    held = io.StringIO()  # with --quiet: stdout is held back, and shown on stderr only if the command fails
    bars_were_on = True
    if quiet:
        from .progress import disable_progress_bars, progress_bars_enabled

        bars_were_on = progress_bars_enabled()
        disable_progress_bars()
    code = 1
    try:
        with contextlib.redirect_stdout(held) if quiet else contextlib.nullcontext():
            code = args.func(args)
        return code
    except KeyboardInterrupt:
        code = 130
        print(f"melfusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one error boundary: every failure is one line, never a traceback
        code, line = describe_error(exc)
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch every rank fails alike: one line
            print(f"melfusion {args.command}: {line}", file=sys.stderr)
        if code == 1 and os.environ.get("MELFUSION_TRACEBACK"):
            raise
        return code
    finally:
        warnings.formatwarning = old_format
        if quiet:
            if code != 0 and held.getvalue():  # what the failed command said (e.g. data check's bad rows)
                sys.stderr.write(held.getvalue())
            if bars_were_on:
                from .progress import enable_progress_bars

                enable_progress_bars()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def describe_error(exc: BaseException) -> tuple[int, str]:
    """``(exit status, one line)`` for an exception reaching the CLI: 2 for expected failures, 1 for bugs."""
    from .config import ValidationError, validation_message

    if isinstance(exc, ValidationError):
        return 2, f"error: {validation_message(exc)}"
    text = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
    if len(text) > 400:  # one line still: the start (what failed) and the end (what to do), the middle cut
        text = text[:250] + " ... " + text[-145:]
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return 2, f"error: out of memory ({text}); try fewer samples, a shorter clip or a smaller model"
    if isinstance(exc, (ValueError, OSError, OverflowError, _yaml_error(), _bomb_error())):
        return 2, f"error: {text}"
    if isinstance(exc, ImportError):
        return 2, f"error: a dependency is missing ({text})"
    return 1, (f"internal error: {type(exc).__name__}: {text} (this is a bug; set MELFUSION_TRACEBACK=1 "
               "to see the traceback)")


def _yaml_error() -> type:
    import yaml

    return yaml.YAMLError


def _bomb_error() -> type:
    from PIL import Image

    return Image.DecompressionBombError


if __name__ == "__main__":
    sys.exit(main())
