"""``melfusion benchmark``: the paper's conditioning ablation (its Table 4) on a test set, in one command.

For a model and a test manifest, :func:`run_benchmark` generates the set (resumably, with
:func:`melfusion.batch.generate_manifest`) under each condition:

- ``text + image``: the model as trained;
- ``text only (alpha 0)``: every synapse weight forced to 0 (the text-only path of the same weights);
- ``image only (no caption)``: every caption replaced by the empty text;
- and, for each ``extra`` model (``LABEL=MODEL``: e.g. encoder instead of decoder taps, one shared alpha),
  that model with text and image,

then scores each set and writes ``OUT/table.md`` (the table it prints), ``OUT/results.json`` and one folder of
files (with ``generations.jsonl``) per condition. Scores:

- on a synthetic manifest (rows carrying ``register``, ``tempo``, ``instrument``, ``mood``): the accuracy of
  each attribute read back from the audio (:func:`~melfusion.datasets.synthetic.read_attributes`), with its
  standard error ``sqrt(p (1 - p) / n)``, and the Frechet distance of a 32-number log-mel-band embedding to the
  rows' reference clips (``FD (mel)``; :func:`~melfusion.metrics.synthetic.mel_band_embedding`);
- with real embedders' weights (``vggish``, ``panns``, ``clap``, ``clip``) and a ``reference`` folder: FAD, FD,
  KL, IMSM and CLAP through :func:`~melfusion.metrics.evaluate.evaluate`, whose protocol record is kept per
  condition.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .batch import real_path
from .files import OutputExistsError, check_output, write_atomic

__all__ = ["CONDITIONS", "run_benchmark", "format_benchmark", "add_benchmark_arguments", "run_benchmark_cli"]

#: the built-in conditions: label -> (key, generate_manifest overrides)
CONDITIONS = {
    "both": ("text + image", {}),
    "text": ("text only (alpha 0)", {"alpha": 0.0}),
    "image": ("image only (no caption)", {"text": ""}),
}


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "condition"


def _synthetic_truth(manifest: Path) -> dict[str, dict] | None:
    """Ground truth by resolved reference path, when the manifest is a synthetic one (JSONL with attributes)."""
    from .datasets.synthetic import ATTRIBUTES
    from .metrics.synthetic import read_synthetic_rows

    if manifest.suffix.lower() not in (".jsonl", ".json") or not manifest.is_file():
        return None
    try:
        rows = read_synthetic_rows(manifest)
    except ValueError:
        return None
    return {str(real_path(r["location"])): {a: r[a] for a in ATTRIBUTES} for r in rows}


def _score_synthetic(folder: Path, truth: Mapping[str, dict], references: dict[tuple[str, int], np.ndarray]
                     ) -> dict[str, Any]:
    """Attribute accuracy and FD (mel) of one condition's files; ``references`` remembers the reference clips'
    embeddings across conditions (by path and rate), so each is read once per benchmark."""
    from .batch import read_generations
    from .datasets.audio import load_audio
    from .datasets.synthetic import ATTRIBUTES, CHANCE, attribute_accuracy, read_attributes
    from .metrics.frechet import frechet_distance
    from .metrics.synthetic import mel_band_embedding

    records = read_generations(folder) or []
    readings, rows, gen, real = [], [], [], []
    for r in records:
        ref = str(real_path(r["reference"])) if r.get("reference") else None
        if ref not in truth:
            raise ValueError(f"{str(folder)!r}: {r['file']} has no synthetic ground truth (reference {ref!r})")
        wave = load_audio(folder / r["file"], r["sample_rate"], name="generated audio")
        readings.append(read_attributes(wave, r["sample_rate"]))
        rows.append(truth[ref])
        gen.append(mel_band_embedding(wave, r["sample_rate"]))
        key = (ref, r["sample_rate"])
        if key not in references:
            references[key] = mel_band_embedding(load_audio(ref, r["sample_rate"], name="reference audio"),
                                                 r["sample_rate"])
        real.append(references[key])
    if not readings:
        raise ValueError(f"{str(folder)!r}: no generated files to score")
    accuracy = attribute_accuracy(readings, rows)
    n = len(readings)
    return {"n": n, "accuracy": accuracy, "se": {a: float(np.sqrt(accuracy[a] * (1 - accuracy[a]) / n))
                                                  for a in ATTRIBUTES},
            "chance": dict(CHANCE), "chance_se": {a: float(np.sqrt(CHANCE[a] * (1 - CHANCE[a]) / n))
                                                  for a in ATTRIBUTES},
            # a Frechet distance needs two clips a side to estimate a covariance: None (n/a) for one
            "fd_mel": float(frechet_distance(np.stack(gen), np.stack(real))) if n >= 2 else None}


def run_benchmark(
    model: Any,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    conditions: Sequence[str] = ("both", "text", "image"),
    extra: Mapping[str, Any] | None = None,
    reference: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    embedders: Mapping[str, Any] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    model_name: str | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Generate and score every condition (see the module docstring); returns the results as a dict.

    ``extra`` maps a label to another model (built, or a name/folder for ``MelFusion.from_pretrained``), scored
    with text and image. ``metrics`` (a subset of fad, fd, kl, imsm, clap) need ``embedders`` (keyword
    arguments of :func:`~melfusion.metrics.evaluate.evaluate`: vggish, panns, clap, clip) and, for fad/fd/kl,
    ``reference``. Generation resumes: a second call reuses every complete file.
    """
    from .batch import generate_manifest
    from .metrics.evaluate import evaluate

    manifest, out = Path(manifest), Path(out)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise ValueError(f"conditions: expected some of {', '.join(CONDITIONS)}, got {list(conditions)}")
    if len(set(conditions)) != len(conditions):
        raise ValueError(f"conditions: each condition once, got {list(conditions)}")
    _check_metric_inputs(metrics, reference, embedders)  # before any generation, not after the first condition
    if model.synapse is None and any(c != "both" for c in conditions):
        raise ValueError("conditions: this model has no synapse; only 'both' (its own conditioning) applies")
    truth = _synthetic_truth(manifest)
    runs: list[tuple[str, Any, dict, str | None]] = [
        (CONDITIONS[c][0], model, CONDITIONS[c][1], model_name) for c in conditions]
    for label, other in (extra or {}).items():
        if isinstance(other, (str, os.PathLike)):
            from .pipeline import MelFusion

            try:
                runs.append((label, MelFusion.from_pretrained(other), {}, str(other)))
            except (ValueError, OSError) as exc:
                raise (ValueError if isinstance(exc, ValueError) else OSError)(f"extra: {label}={other}: {exc}") \
                    from None
        else:
            runs.append((label, other, {}, label))
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels) or len({_slug(x) for x in labels}) != len(labels):
        raise ValueError(f"extra: labels must differ from each other and from the conditions, got {labels}")
    results: dict[str, Any] = {"manifest": str(manifest), "conditions": {}, "synthetic": truth is not None}
    references: dict[tuple[str, int], np.ndarray] = {}
    for label, m, overrides, name in runs:
        folder = out / _slug(label)
        try:
            report = generate_manifest(m, manifest, folder, batch_size=batch_size, seed=seed, limit=limit,
                                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                       image_guidance_scale=image_guidance_scale, model_name=name,
                                       progress=progress, **overrides)
        except OutputExistsError as exc:  # its advice (--out-dir, --overwrite) is generate's, not this command's
            detail = str(exc).removeprefix("out_dir: ").split("; use another", 1)[0].split("; it is kept", 1)[0]
            raise OutputExistsError(f"out: the condition folder {str(folder)!r} cannot be reused ({detail}); give "
                                    "the benchmark another out folder (--out)") from None
        _check_only_this_run(folder, report.files)
        entry: dict[str, Any] = {"folder": str(folder), "files": len(report.files), "bad_rows": report.bad,
                                 "written": len(report.written), "seconds": round(report.seconds, 2)}
        if truth is not None:
            entry["synthetic"] = _score_synthetic(folder, truth, references)
        if metrics:
            entry["evaluate"] = evaluate(folder, reference, metrics=list(metrics), progress=progress, device=device,
                                         **dict(embedders or {}))
        results["conditions"][label] = entry
    from .batch import read_generations

    first = read_generations(out / _slug(runs[0][0])) or [{}]
    results["generation"] = {"settings": first[0].get("settings"), "model": first[0].get("model")}
    return results


def _check_metric_inputs(metrics: Sequence[str] | None, reference: Any, embedders: Mapping[str, Any] | None) -> None:
    """What the real metrics need (a reference folder, the embedders' weights), checked before any work."""
    if not metrics:
        return
    from .metrics.evaluate import NEEDS_REFERENCE, parse_metrics

    names = parse_metrics(list(metrics))
    given = dict(embedders or {})
    needs_ref = [m for m in names if m in NEEDS_REFERENCE]
    if needs_ref and reference is None:
        raise ValueError(f"reference: the metrics {', '.join(needs_ref)} need a reference audio folder")
    if needs_ref and not Path(reference).is_dir():
        raise ValueError(f"reference: no such folder {str(reference)!r}")
    for metric, embedder in (("fad", "vggish"), ("fd", "panns"), ("kl", "panns")):
        if metric in names and given.get(embedder) is None:
            raise ValueError(f"{embedder}: the metric {metric} needs {embedder} weights (a file, folder or hub id)")


def _check_only_this_run(folder: Path, files: Sequence[Path]) -> None:
    """A condition folder is scored whole: refuse one that also holds files of an earlier run over other rows
    (a larger --rows, a row that has turned bad), which would be scored with this run's."""
    from .batch import read_generations

    mine = {p.name for p in files}
    others = [r["file"] for r in read_generations(folder) or [] if r["file"] not in mine]
    if others:
        shown = ", ".join(others[:3]) + (f" ... ({len(others)} in all)" if len(others) > 3 else "")
        raise ValueError(f"out: {str(folder)!r} also holds files of an earlier run over other rows ({shown}; a "
                         "larger --rows?), which would be scored with this run's; give the benchmark another --out")


def format_benchmark(results: Mapping[str, Any]) -> str:
    """The Table 4-shaped markdown of :func:`run_benchmark`'s results."""
    from .datasets.synthetic import ATTRIBUTES

    conds = results["conditions"]
    header = ["condition", "n"]
    synthetic = results.get("synthetic")
    if synthetic:
        chance = next(iter(conds.values()))["synthetic"]["chance"]
        header += [f"{a} % (chance {100 * chance[a]:.0f})" for a in ATTRIBUTES] + ["FD (mel)"]
    metric_names: list[str] = []
    for entry in conds.values():
        for name in (entry.get("evaluate") or {}).get("metrics", {}):
            if name not in metric_names:
                metric_names.append(name)
    header += [name.upper() if name != "fad_inf" else "FAD-inf" for name in metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, entry in conds.items():
        cells = [label]
        if synthetic:
            s = entry["synthetic"]
            cells.append(str(s["n"]))
            cells += [f"{100 * s['accuracy'][a]:.0f} ± {100 * s['se'][a]:.1f}" for a in ATTRIBUTES]
            cells.append(f"{s['fd_mel']:.2f}" if s["fd_mel"] is not None else "n/a")
        else:
            cells.append(str(entry["files"]))
        ms = (entry.get("evaluate") or {}).get("metrics", {})
        cells += [f"{ms[n]['value']:.4g}" if n in ms else "" for n in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    gen = results.get("generation") or {}
    s = gen.get("settings") or {}
    foot = (f"\nmodel {(gen.get('model') or {}).get('name_or_path')}, {s.get('num_inference_steps')} steps, guidance "
            f"{s.get('guidance_scale')}, image guidance {s.get('image_guidance_scale')}, seed {s.get('seed')}, batch "
            f"{s.get('batch_size')}; ± is one standard error, sqrt(p (1 - p) / n)")
    return "\n".join(lines) + "\n" + foot


def add_benchmark_arguments(parser) -> None:
    parser.add_argument("--model", default="mini", help="a save_pretrained folder or a shipped name")
    parser.add_argument("--manifest", required=True, help="the test set (JSONL, CSV or folder)")
    parser.add_argument("--out", required=True, help="run folder: one sub-folder per condition, table.md, results.json")
    parser.add_argument("--conditions", default="both,text,image",
                        help="comma-separated: both (text + image), text (alpha 0), image (no caption)")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=MODEL",
                        help="another model to score with text and image (repeatable), e.g. 'encoder taps=runs/enc'")
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="text guidance scale (default: the model's)")
    parser.add_argument("--image-guidance", type=float, default=None,
                        help="image guidance scale (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first row (each row has its own)")
    parser.add_argument("--reference", default=None, help="reference audio folder (fad, fd, kl)")
    parser.add_argument("--metrics", default=None, help="real metrics too: a subset of fad,fd,kl,imsm,clap")
    for name in ("vggish", "panns", "clap", "clip"):
        parser.add_argument(f"--{name}", default=None, metavar="PATH_OR_ID", help=f"{name} weights (evaluate)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing table.md / results.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


#: run_benchmark's argument names -> this command's flags, so an error names what the user typed
_FLAGS = {"limit": "--rows", "batch_size": "--batch-size", "seed": "--seed", "num_inference_steps": "--steps",
          "guidance_scale": "--guidance", "image_guidance_scale": "--image-guidance", "reference": "--reference",
          "conditions": "--conditions", "extra": "--extra", "metrics": "--metrics", "manifest": "--manifest",
          "out": "--out", "vggish": "--vggish", "panns": "--panns", "device": "--device"}


def run_benchmark_cli(args) -> int:
    """``melfusion benchmark``: 0 done, 2 (after writing the table) when bad manifest rows were skipped."""
    try:
        return _run_benchmark_cli(args)
    except (ValueError, OSError) as exc:
        name, sep, rest = str(exc).partition(":")
        if sep and name in _FLAGS:
            raise (ValueError if isinstance(exc, ValueError) else OSError)(f"{_FLAGS[name]}:{rest}") from None
        raise


def _run_benchmark_cli(args) -> int:
    from .metrics.evaluate import parse_metrics
    from .pipeline import MelFusion

    out = Path(args.out)
    table_path, results_path = out / "table.md", out / "results.json"
    for p in (table_path, results_path):
        check_output(p, "--out", overwrite=args.overwrite or _ours(p), inputs=[args.manifest])
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    extra = {}
    for item in args.extra:
        label, sep, path = item.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise ValueError(f"--extra: expected LABEL=MODEL, got {item!r}")
        extra[label.strip()] = path.strip()
    metrics = parse_metrics(args.metrics) if args.metrics else None
    embedders = {k: getattr(args, k) for k in ("vggish", "panns", "clap", "clip") if getattr(args, k)}
    model = MelFusion.from_pretrained(args.model, device=args.device)
    results = run_benchmark(model, args.manifest, out, conditions=conditions, extra=extra, reference=args.reference,
                            metrics=metrics, embedders=embedders, limit=args.rows, batch_size=args.batch_size,
                            seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                            image_guidance_scale=args.image_guidance, model_name=args.model,
                            progress=not args.no_progress, device=args.device)
    table = format_benchmark(results)
    print(table)
    write_atomic(table_path, table + "\n")
    write_atomic(results_path, json.dumps(results, indent=2, default=str, allow_nan=False) + "\n")
    if not getattr(args, "quiet", False):
        print(f"wrote {table_path} and {results_path}", file=sys.stderr)
    bad = next(iter(results["conditions"].values()))["bad_rows"]
    if bad:  # the same rows in every condition (one manifest)
        listed = "; ".join(f"row {row}: {why}" for row, why in bad[:5]) + (f"; ... ({len(bad)} in all)"
                                                                         if len(bad) > 5 else "")
        print(f"melfusion benchmark: {len(bad)} bad rows of {args.manifest} were skipped ({listed}); the table "
              "covers the other rows", file=sys.stderr)
        return 2
    return 0


def _ours(path: Path) -> bool:
    """Whether ``path`` is a table or results file an earlier benchmark wrote (so a rerun may replace it)."""
    if not path.is_file():
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".md":
        return text.startswith("| condition | n |")
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and {"manifest", "conditions", "synthetic"} <= set(data)
