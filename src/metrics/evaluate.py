"""``evaluate(generated, reference, metrics=...)``: every metric on two folders of audio, and its CLI shell.

The library function does all the work (listing and pairing files, loading
embedders, resampling, caching, computing) and returns a JSON-ready dict;
``add_evaluate_arguments`` / ``run_evaluate`` are the thin ``melfusion
evaluate`` command on top of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..batch import settings_key
from ..checks import NonFiniteError, check_finite_params
from ..files import OutputExistsError, check_output, same_file, write_atomic
from .audio import RESAMPLER, file_sha256, list_audio_files, load_audio, overlapping_files
from .cache import EmbeddingCache, cache_key, default_cache_dir
from .embedders import DEFAULT_CLAP, DEFAULT_CLIP, load_embedder
from .frechet import fit_frechet_distance_inf, frechet_distance
from .kl import KL_DIRECTION, KL_VARIANTS, kl_divergence, pair_by_stem
from .manifest import ManifestRow, match_manifest, read_manifest
from .similarity import IMSM_MODES, clap_score, cosine_similarity, imsm

__all__ = ["METRICS", "evaluate", "embed_files", "format_table", "write_json", "add_evaluate_arguments",
           "run_evaluate", "protocol_record", "protocol_differences", "generation_records", "pair_by_records"]

METRICS = ("fad", "fd", "kl", "imsm", "clap")
#: the metrics that compare against reference audio (the others need captions and images)
NEEDS_REFERENCE = ("fad", "fd", "kl")
_NEEDS_MANIFEST = ("imsm", "clap")


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """``"fad,fd"`` or ``["fad", "fd"]`` -> ``["fad", "fd"]`` (known names, no duplicates, in order)."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"metrics: expected a comma-separated subset of {','.join(METRICS)}, got "
                         f"{','.join(names) or '(nothing)'}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return list(dict.fromkeys(names))


def embed_files(embedder: Any, files: Sequence[Path], cache: EmbeddingCache | None = None, progress: bool = True,
                desc: str = "") -> dict[str, list[np.ndarray]]:
    """Every output of ``embedder`` for each file (resampled to its rate), read from / written to ``cache``.

    A file that cannot be read or embedded is a ``ValueError`` naming it.
    """
    from tqdm.auto import tqdm

    from ..progress import show_progress

    identity = embedder.identity()
    resampling = f"{embedder.sample_rate}Hz:{RESAMPLER}:mono-mean"
    out: dict[str, list[np.ndarray]] = {name: [] for name in embedder.outputs}
    for path in tqdm(files, desc=desc or embedder.name, disable=not show_progress(progress), leave=False, file=sys.stderr):
        keys = None
        if cache is not None:
            digest = file_sha256(path)
            keys = {name: cache_key(identity, name, resampling, digest) for name in embedder.outputs}
            found = {name: cache.get(key) for name, key in keys.items()}
            if all(v is not None for v in found.values()):
                for name, value in found.items():
                    out[name].append(value)
                continue
        waveform = load_audio(path, embedder.sample_rate)  # its errors name the file already
        try:
            values = embedder.embed_outputs(waveform)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r}: {exc}") from None
        arrays = {name: np.asarray(values[name], dtype=np.float32) for name in embedder.outputs}
        for name, value in arrays.items():
            if not np.isfinite(value).all():
                raise NonFiniteError(f"{str(path)!r}: the {embedder.name} {name} holds NaN or infinite values "
                                     "(the audio decodes to finite samples; are the embedder's weights sound?)")
        for name, value in arrays.items():
            out[name].append(value)
            if keys is not None:
                cache.put(keys[name], value)
    return out


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise NonFiniteError(f"{what}: NaN or infinite values; no metric is computed from them")
    return values


def _no_nan(value: Any, where: str = "result") -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite float inside a JSON-ready ``value``."""
    check_finite_params(value, where)


def input_files(generated: str | os.PathLike, reference: str | os.PathLike | None,
                needs_reference: bool = True) -> tuple[list[Path], list[Path]]:
    """The generated and the reference audio files, two sets that never overlap.

    The same folder for both is a ``ValueError``; a folder nested in the other is left out of the other's
    listing (``--generated out --reference out/ref`` evaluates ``out`` without ``out/ref``); a file that
    is in both sets anyway (a link) is a ``ValueError`` naming it. The reference is listed only when
    ``needs_reference``, but it is always left out of the generated set.
    """
    gen_root = Path(generated)
    ref_root = Path(reference) if reference is not None else None
    if ref_root is not None and gen_root.is_dir() and ref_root.is_dir() and same_file(gen_root, ref_root):
        raise ValueError(f"reference: {str(ref_root)!r} is the generated folder itself; --generated and "
                         "--reference must name different folders (the two sets must not overlap)")
    gen_files = list_audio_files(gen_root, "generated", exclude=[ref_root])
    ref_files = list_audio_files(ref_root, "reference", exclude=[gen_root]) if needs_reference else []
    shared = overlapping_files(gen_files, ref_files)
    if shared:
        shown = ", ".join(str(p) for p in shared[:5]) + (f" ... ({len(shared)} in all)" if len(shared) > 5 else "")
        raise ValueError(f"generated, reference: {shown} {'is' if len(shared) == 1 else 'are'} in both sets "
                         "(a link?); --generated and --reference must not share files")
    return gen_files, ref_files


def _check_cache_dir(root: Path, inputs: Sequence[str | os.PathLike | None]) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"cache_dir: {str(root)!r} is a file; give a folder (or cache=False / --no-cache)")
    resolved = root.expanduser().resolve()
    for folder in inputs:
        if folder is not None and Path(folder).is_dir() and resolved.is_relative_to(Path(folder).resolve()):
            raise ValueError(f"cache_dir: {str(root)!r} is inside the input folder {str(folder)!r}; the cache "
                             "never writes into the audio it evaluates: choose another --cache-dir or --no-cache")


def _embedder(value: Any, name: str, what: str, device: str, **options: Any) -> Any:
    if value is None:
        raise ValueError(what)
    if isinstance(value, (str, os.PathLike)):
        return load_embedder(name, value, device=device, **options)
    return value  # an already built embedder


def _describe(embedder: Any) -> dict[str, Any]:
    source = getattr(embedder, "source", None)
    return {"source": source, "identity": embedder.identity(),
            "sample_rate": getattr(embedder, "sample_rate", None), "weight_files": weight_file_hashes(source)}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")


def weight_file_hashes(source: Any) -> dict[str, str] | None:
    """sha256 of the weight files behind an embedder's ``source``: the file itself, or the weight files of a
    folder (by name); None for a hub id that is not a local path (its ``identity`` still hashes the weights)."""
    if source is None:
        return None
    path = Path(str(source).split(":")[0] if not Path(str(source)).exists() else str(source)).expanduser()
    if path.is_file():
        return {path.name: file_sha256(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)[:64]
        return {str(p.relative_to(path)): file_sha256(p) for p in files}
    return None


#: how each embedder sees a file (nothing is cropped or padded by evaluate itself)
_FRAMING = {"vggish": "0.96 s non-overlapping examples of each whole file (a partial last example dropped)",
            "panns": "each whole file, one clip",
            "clap": "each whole file: consecutive windows of at most 10 s, length-weighted mean (no random crop)",
            "clip": "each image, the model's own resize and crop"}


def protocol_record(result: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two ``evaluate`` results comparable: the embedders (source, weight hashes, identity, rate),
    the resampler and channel mix, how files are framed, the number of files and the metric variants, and the
    generation settings when the generated folder records them. Compare two with :func:`protocol_differences`."""
    from .. import __version__

    metrics = {}
    for name, m in result.get("metrics", {}).items():
        metrics[name] = {k: m[k] for k in ("embedder", "variant", "direction", "mode", "n_generated",
                                            "n_reference", "pairs", "sizes") if k in m}
    gen = result.get("generation") or {}
    return {
        "melfusion_version": __version__,
        "metrics": metrics,
        "embedders": {name: {k: e.get(k) for k in ("source", "weight_files", "identity", "sample_rate")}
                      for name, e in result.get("embedders", {}).items()},
        "audio": {"resampler": RESAMPLER, "channels": "mono: the mean of the channels",
                  "crop_or_pad": "none: each file is used whole",
                  "framing": {k: v for k, v in _FRAMING.items() if k in result.get("embedders", {})}},
        "files": dict(result.get("files", {})),
        "settings": dict(result.get("settings", {})),
        "generation": {"settings": gen.get("settings"), "model": gen.get("model")} if gen else None,
    }


def protocol_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every leaf that differs between two protocol records (or two results: their ``protocol``), as
    ``"path: a -> b"`` lines; empty when the two numbers were computed the same way on as many files."""
    if not prefix:  # two results, two protocols, or one of each
        a = a.get("protocol", a) if isinstance(a, Mapping) else a
        b = b.get("protocol", b) if isinstance(b, Mapping) else b
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):  # a hand-edited record: compared whole
        return [] if a == b else [f"{prefix.rstrip('.') or 'protocol'}: {a!r} -> {b!r}"]
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        where = f"{prefix}{key}"
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out.extend(protocol_differences(x, y, where + "."))
        elif x != y:
            out.append(f"{where}: {x!r} -> {y!r}")
    return out


def evaluate(
    generated: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    metrics: str | Sequence[str] = ("fad", "fd", "kl"),
    manifest: str | os.PathLike | None = None,
    *,
    vggish: Any = None,
    panns: Any = None,
    clap: Any = DEFAULT_CLAP,
    clip: Any = DEFAULT_CLIP,
    vggish_pca_params: str | os.PathLike | None = None,
    vggish_postprocess: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    device: str = "cpu",
    progress: bool = True,
    fad_inf: bool = False,
    fad_inf_sizes: Sequence[int] | None = None,
    kl_variant: str = "softmax",
    imsm_mode: str = "paper",
    seed: int = 0,
    allow_mixed_settings: bool = False,
) -> dict[str, Any]:
    """Compute ``metrics`` for the audio files in ``generated`` against ``reference``.

    Args:
        generated: folder of generated audio (searched recursively).
        reference: folder of reference audio (needed by fad, fd, kl; kl pairs files by stem).
        metrics: any of ``fad`` (VGGish frames), ``fd`` (PANNs clips), ``kl`` (PANNs
            logits), ``imsm`` (CLIP + CLAP), ``clap`` (CLAP score), as a list or "a,b".
        manifest: JSON lines with ``captions``, ``location``, ``img_path`` (for imsm, clap).
        vggish, panns: weights (file, folder or hub id ``owner/repo[:file]``) or a built embedder.
        clap, clip: hub id or ``save_pretrained`` folder, or a built embedder.
        vggish_pca_params, vggish_postprocess: VGGish's PCA + quantisation (off by default).
        cache_dir: embedding cache folder (default ``$MELFUSION_CACHE`` or
            ``~/.cache/melfusion/embeddings``); ``cache=False`` turns caching off.
        fad_inf: also report FAD extrapolated to infinitely many generated frames.
        kl_variant: ``"softmax"`` or ``"sigmoid"``; imsm_mode: ``"paper"`` or ``"released"``.
        allow_mixed_settings: compare files made with different generation settings or models (refused
            otherwise; see below).

    A generated folder written by :func:`melfusion.batch.generate_manifest` holds ``generations.jsonl``: then
    every file must have its record (and the hash it records), KL pairs each file with the reference clip its
    record names (so ``ROW_k.wav`` samples and ``clip__image.wav`` rows pair too), IMSM and CLAP take each
    file's caption and image from its record when no ``manifest`` is given, and files made with different
    settings or model weights (in the folder, or between the folder and a generated ``reference`` folder) are
    a ``ValueError`` unless ``allow_mixed_settings``. The result's ``protocol`` records what makes two
    results comparable (:func:`protocol_record`).

    The generated and reference sets never overlap (:func:`input_files`): the same folder for both is a
    ``ValueError``, and a folder nested in the other is left out of the other's listing. The embedding
    cache must not be a file or lie inside an input folder. A clip of silence is valid input (its
    embeddings are finite); a clip with NaN/inf samples, a truncated or corrupt file, or an embedding
    that is not finite is a ``ValueError`` naming the file, so no metric is ever NaN (``fad_inf``'s
    ``r2`` is None when every subset size gives the same distance).

    Returns:
        ``{"metrics": {name: {"value", "n", ...}}, "embedders": {...}, "settings": {...}, ...}``.
    """
    names = parse_metrics(metrics)
    if kl_variant not in KL_VARIANTS:
        raise ValueError(f"kl_variant: expected one of {KL_VARIANTS}, got {kl_variant!r}")
    if imsm_mode not in IMSM_MODES:
        raise ValueError(f"imsm_mode: expected one of {IMSM_MODES}, got {imsm_mode!r}")
    needs_ref = [m for m in names if m in NEEDS_REFERENCE]
    if needs_ref and reference is None:
        raise ValueError(f"reference: the metrics {', '.join(needs_ref)} need a reference directory")
    gen_files, ref_files = input_files(generated, reference, needs_reference=bool(needs_ref))
    records = generation_records(generated, gen_files, reference, allow_mixed_settings)
    if "kl" in names:
        pairs = pair_by_records(gen_files, ref_files, records) if records else pair_by_stem(gen_files, ref_files)
    else:
        pairs = None
    rows = None
    needs_manifest = [m for m in names if m in _NEEDS_MANIFEST]
    if needs_manifest:
        if manifest is None and records:
            rows = rows_from_records(gen_files, records, need_images="imsm" in names)
        elif manifest is None:
            raise ValueError(f"manifest: the metrics {', '.join(needs_manifest)} need a manifest (JSON lines with "
                             "'captions', 'location' and, for imsm, 'img_path'), or a generated folder with "
                             "generations.jsonl (melfusion generate --manifest)")
        else:
            rows = match_manifest(gen_files, read_manifest(manifest), need_images="imsm" in names)

    store = None
    if cache:
        store = EmbeddingCache(cache_dir if cache_dir is not None else default_cache_dir())
        _check_cache_dir(store.root, [generated, reference])
    result: dict[str, Any] = {
        "metrics": {},
        "embedders": {},
        "settings": {"kl_variant": kl_variant, "kl_direction": KL_DIRECTION, "imsm_mode": imsm_mode,
                     "fad_inf": bool(fad_inf), "resampler": RESAMPLER, "vggish_postprocess": bool(vggish_postprocess)},
        "files": {"generated": len(gen_files), "reference": len(ref_files)},
        "generated": str(generated),
        "reference": str(reference) if reference is not None else None,
        "manifest": str(manifest) if manifest is not None else None,
        "warnings": [],
    }

    def _frechet(fn, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn(*args, **kwargs)
        for w in caught:
            result["warnings"].append(str(w.message))
            warnings.warn(w.message, w.category, stacklevel=3)
        return value

    if "fad" in names:
        emb = _embedder(vggish, "vggish", "vggish: FAD needs VGGish weights (torchvggish's vggish-10086976.pth "
                        "or a .safetensors file): pass vggish=PATH / --vggish PATH", device,
                        pca_params=vggish_pca_params, postprocess=vggish_postprocess)
        result["embedders"]["vggish"] = _describe(emb)
        g = np.concatenate(embed_files(emb, gen_files, store, progress, "vggish generated")["embedding"])
        r = np.concatenate(embed_files(emb, ref_files, store, progress, "vggish reference")["embedding"])
        result["metrics"]["fad"] = {"value": _frechet(frechet_distance, g, r), "n": f"{len(g)}/{len(r)} frames",
                                    "n_generated": len(g), "n_reference": len(r), "embedder": "vggish"}
        if fad_inf:
            fit = _frechet(fit_frechet_distance_inf, g, r, sizes=fad_inf_sizes, seed=seed)
            result["metrics"]["fad_inf"] = {
                "value": fit.value, "n": f"{len(fit.sizes)} sizes {fit.sizes[0]}..{fit.sizes[-1]}",
                "slope": fit.slope, "r2": fit.r2 if np.isfinite(fit.r2) else None,  # None: all sizes agree
                "sizes": fit.sizes, "distances": fit.distances,
                "embedder": "vggish"}

    if "fd" in names or "kl" in names:
        emb = _embedder(panns, "panns", "panns: FD and KL need PANNs CNN14 weights (Cnn14_mAP=0.431.pth): "
                        "pass panns=PATH / --panns PATH", device)
        result["embedders"]["panns"] = _describe(emb)
        g_out = embed_files(emb, gen_files, store, progress, "panns generated")
        r_out = embed_files(emb, ref_files, store, progress, "panns reference")
        if "fd" in names:
            g, r = np.concatenate(g_out["embedding"]), np.concatenate(r_out["embedding"])
            result["metrics"]["fd"] = {"value": _frechet(frechet_distance, g, r), "n": f"{len(g)}/{len(r)} clips",
                                       "n_generated": len(g), "n_reference": len(r), "embedder": "panns"}
        if "kl" in names:
            gen_logits = dict(zip(gen_files, g_out["logits"], strict=True))
            ref_logits = dict(zip(ref_files, r_out["logits"], strict=True))
            g = np.concatenate([gen_logits[gp] for _, gp, _ in pairs])
            r = np.concatenate([ref_logits[rp] for _, _, rp in pairs])
            result["metrics"]["kl"] = {"value": kl_divergence(g, r, variant=kl_variant), "n": f"{len(pairs)} pairs",
                                       "pairs": len(pairs), "variant": kl_variant, "direction": KL_DIRECTION,
                                       "embedder": "panns"}

    if needs_manifest:
        texts = [row.caption for row in rows]
        clap_emb = _embedder(clap, "clap", "clap: give a CLAP model (hub id or folder)", device)
        result["embedders"]["clap"] = _describe(clap_emb)
        audio = np.concatenate(embed_files(clap_emb, gen_files, store, progress, "clap generated")["embedding"])
        clap_texts = _finite(clap_emb.embed_text(texts), "clap: the caption embeddings")
        if "clap" in names:
            result["metrics"]["clap"] = {"value": clap_score(audio, clap_texts), "n": f"{len(audio)} pairs",
                                         "embedder": "clap"}
        if "imsm" in names:
            clip_emb = _embedder(clip, "clip", "clip: give a CLIP model (hub id or folder)", device)
            result["embedders"]["clip"] = _describe(clip_emb)
            images = _finite(clip_emb.embed_images([row.image for row in rows]), "clip: the image embeddings")
            image_text = cosine_similarity(images, _finite(clip_emb.embed_text(texts), "clip: the caption embeddings"))
            audio_text = cosine_similarity(audio, clap_texts)
            scales = ({"image_logit_scale": clip_emb.logit_scale, "audio_logit_scale": clap_emb.logit_scale}
                      if imsm_mode == "released" else {})
            result["metrics"]["imsm"] = {"value": imsm(image_text, audio_text, mode=imsm_mode, **scales),
                                         "n": f"{len(rows)} triplets", "mode": imsm_mode, "embedder": "clip+clap",
                                         **scales}

    if store is not None:
        result["cache"] = {"dir": str(store.root), "hits": store.hits, "misses": store.misses}
    if records:
        first = next(iter(records.values()))
        result["generation"] = {"records": len(records), "settings": first.get("settings"),
                                "model": first.get("model"), "melfusion_version": first.get("melfusion_version"),
                                "mixed_settings": len({settings_key(r) for r in records.values()}) > 1}
    result["protocol"] = protocol_record(result)
    _no_nan(result["metrics"], "metrics")
    return result


def generation_records(generated: str | os.PathLike, gen_files: Sequence[Path], reference: Any = None,
                       allow_mixed_settings: bool = False) -> dict[Path, dict] | None:
    """Each generated file's provenance record (``generations.jsonl``), or None for a folder without one.

    A file without a record, a record whose file is gone or whose hash differs, and (unless
    ``allow_mixed_settings``) records of different settings or model weights, are ``ValueError`` s.
    """
    from ..batch import read_generations, real_path, settings_key

    root = Path(generated)
    if not root.is_dir():
        return None
    listed = read_generations(root)
    if listed is None:
        return None
    by_file: dict[Path, dict] = {}
    for record in listed:
        by_file[real_path(root / record["file"])] = record
    found = {real_path(p): p for p in gen_files}
    orphans = [str(p) for r, p in found.items() if r not in by_file]
    if orphans:
        raise ValueError(f"generated: {_few(orphans)} {'is' if len(orphans) == 1 else 'are'} not in "
                         f"{str(root / 'generations.jsonl')!r} (not made by this generation run); move "
                         f"{'it' if len(orphans) == 1 else 'them'} out of the folder")
    gone = [r["file"] for p, r in by_file.items() if p not in found]
    if gone:
        raise ValueError(f"generated: generations.jsonl lists files that are missing: {_few(gone)}")
    changed = [str(found[p]) for p, r in by_file.items() if file_sha256(found[p]) != r.get("audio_sha256")]
    if changed:
        raise ValueError(f"generated: {_few(changed)} differ from the hash generations.jsonl records (changed "
                         "after generation?)")
    keys = {settings_key(r) for r in by_file.values()}
    if len(keys) > 1 and not allow_mixed_settings:
        raise ValueError(f"generated: the files were made with {len(keys)} different settings or models "
                         "(generations.jsonl); evaluate one set at a time, or pass allow_mixed_settings=True / "
                         "--allow-mixed-settings")
    if reference is not None and Path(reference).is_dir() and not allow_mixed_settings:
        other = read_generations(reference)
        if other:
            theirs = {settings_key(r) for r in other}
            if theirs != keys:
                raise ValueError("reference: a generated set made with other settings or another model than "
                                 "--generated (both have generations.jsonl); pass allow_mixed_settings=True / "
                                 "--allow-mixed-settings to compare them anyway")
    return {found[p]: r for p, r in by_file.items()}


def _few(items: Sequence[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" ... ({len(items)} in all)" if len(items) > k else "")


def pair_by_records(gen_files: Sequence[Path], ref_files: Sequence[Path], records: dict[Path, dict]
                    ) -> list[tuple[str, Path, Path]]:
    """``(file name, generated, reference)``: each generated file with the reference clip its record names
    (by path when that file is among the reference files, else by its stem); a ``ValueError`` lists the rest."""
    from ..batch import real_path

    by_path = {real_path(p): p for p in ref_files}
    by_stem: dict[str, list[Path]] = {}
    for p in ref_files:
        by_stem.setdefault(p.stem, []).append(p)
    pairs, missing = [], []
    for g in gen_files:
        ref = records[g].get("reference")
        match = None
        if ref:
            match = by_path.get(real_path(ref))
            if match is None and len(by_stem.get(Path(ref).stem, [])) == 1:
                match = by_stem[Path(ref).stem][0]
        if match is None:
            missing.append(f"{g.name} (reference {ref!r})" if ref else f"{g.name} (its row has no reference)")
        else:
            pairs.append((g.name, g, match))
    if missing:
        raise ValueError(f"KL pairs each generated file with the reference its generations.jsonl record names, "
                         f"but these have none among the reference files: {_few(missing)}")
    return sorted(pairs)


def rows_from_records(gen_files: Sequence[Path], records: dict[Path, dict], need_images: bool = False
                      ) -> list[ManifestRow]:
    """The caption and image of each generated file from its record (the manifest row's caption, even when the
    run replaced the text, e.g. image only)."""
    rows = []
    for g in gen_files:
        r = records[g]
        image = Path(r["image"]) if r.get("image") else None
        if need_images and (image is None or not image.is_file()):
            raise ValueError(f"generated: IMSM needs each file's image; {g.name}'s record names "
                             f"{r.get('image')!r}, which is not a file")
        rows.append(ManifestRow(g.stem, r["caption"], Path(r["reference"]) if r.get("reference") else g, image))
    return rows


def format_table(result: Mapping[str, Any]) -> str:
    """A compact text table: metric, value, n, embedder."""
    rows = [("metric", "value", "n", "embedder")]
    for name, m in result["metrics"].items():
        label = name
        if name == "kl":
            label = f"kl ({m['variant']})"
        elif name == "imsm":
            label = f"imsm ({m['mode']})"
        rows.append((label, f"{m['value']:.6g}", str(m.get("n", "")), str(m.get("embedder", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "kl" in result["metrics"]:
        lines.append(f"kl is {result['metrics']['kl']['direction']}, audioldm_eval's formulation")
    return "\n".join(lines)


def write_json(data: Any, path: str | os.PathLike, *, overwrite: bool = False,
               inputs: Sequence[str | os.PathLike | None] = (), name: str = "out") -> Path:
    """Write ``data`` as indented JSON, atomically (a temporary file in the same folder, then ``os.replace``).

    An existing ``path`` is replaced only with ``overwrite`` (else :class:`~melfusion.files.OutputExistsError`),
    one of ``inputs`` never; a non-finite number in ``data`` is a ``ValueError`` (JSON has no NaN).
    """
    path = check_output(path, name, overwrite=overwrite, inputs=inputs)
    _no_nan(data, "result")
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``melfusion evaluate``'s options to ``parser``."""
    parser.add_argument("--generated", required=True, help="folder of generated audio files")
    parser.add_argument("--reference", default=None,
                        help="folder of reference audio files (fad, fd, kl); never the generated folder; a folder "
                        "nested in the other is left out of the other's files")
    parser.add_argument("--manifest", default=None,
                        help="JSON lines with captions, location, img_path (imsm, clap)")
    parser.add_argument("--metrics", default="fad,fd,kl", help=f"comma-separated subset of {','.join(METRICS)}")
    parser.add_argument("--out", default=None,
                        help="write the results as JSON here (.json; an existing file only with --overwrite, "
                        "an input never)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--cache-dir", default=None,
                        help="embedding cache folder (default $MELFUSION_CACHE or ~/.cache/melfusion/embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    parser.add_argument("--device", default="cpu", help="torch device for the embedders")
    parser.add_argument("--vggish", default=None, metavar="PATH_OR_ID",
                        help="VGGish weights for fad: .pth (torchvggish) or .safetensors, or owner/repo[:file]")
    parser.add_argument("--vggish-pca", default=None, metavar="PATH",
                        help="VGGish PCA params (vggish_pca_params-970ea276.pth); implies the PCA postprocessing")
    parser.add_argument("--panns", default=None, metavar="PATH_OR_ID",
                        help="PANNs CNN14 weights for fd and kl (Cnn14_mAP=0.431.pth)")
    parser.add_argument("--clap", default=DEFAULT_CLAP, metavar="PATH_OR_ID", help="CLAP model (imsm, clap)")
    parser.add_argument("--clip", default=DEFAULT_CLIP, metavar="PATH_OR_ID", help="CLIP model (imsm)")
    parser.add_argument("--fad-inf", action="store_true", help="also report FAD extrapolated to N -> infinity")
    parser.add_argument("--kl-variant", choices=KL_VARIANTS, default="softmax",
                        help="softmax (audioldm_eval's KL, default) or sigmoid (its KL_Sigmoid)")
    parser.add_argument("--imsm-mode", choices=IMSM_MODES, default="paper",
                        help="paper: S_IT @ S_AT^T; released: the authors' script (softmaxes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of FAD-inf's subsets")
    parser.add_argument("--allow-mixed-settings", action="store_true",
                        help="compare files whose generations.jsonl records differ in settings or model")
    parser.add_argument("--compare-protocol", default=None, metavar="RESULTS.json",
                        help="list how this evaluation's protocol differs from an earlier result's")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _local_inputs(args: argparse.Namespace) -> list[Path]:
    """Files this run reads that a ``.json`` --out could name: the manifest, weights files, model folders' JSON."""
    found = []
    for value in (args.manifest, args.vggish, args.vggish_pca, args.panns, args.clap, args.clip):
        if value is None:
            continue
        path = Path(value).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(p for p in sorted(path.rglob("*.json"))[:1000])
    return found


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments, print the table, write ``--out``; 0 on success.

    ``--out`` is checked before any work: it must end in ``.json``, not be an input (the manifest, a
    weights or model-config file), and not exist unless ``--overwrite``. Bad input raises ``ValueError`` /
    ``OSError`` naming the argument or file.
    """
    overwrite = bool(getattr(args, "overwrite", False))
    inputs = _local_inputs(args) if args.out else []
    earlier = _read_results(args.compare_protocol) if args.compare_protocol else None
    if args.compare_protocol:
        inputs.append(Path(args.compare_protocol))
    protocol_path = None
    if args.out:
        check_output(args.out, "--out", overwrite=overwrite, inputs=inputs, suffixes=(".json",))
        protocol_path = Path(args.out).with_suffix(".protocol.json")
        check_output(protocol_path, "--out", overwrite=overwrite, inputs=inputs, suffixes=(".json",))
    result = evaluate(
        args.generated, args.reference, metrics=args.metrics, manifest=args.manifest,
        vggish=args.vggish, panns=args.panns, clap=args.clap, clip=args.clip,
        vggish_pca_params=args.vggish_pca, vggish_postprocess=args.vggish_pca is not None,
        cache_dir=args.cache_dir, cache=not args.no_cache, device=args.device, progress=not args.no_progress,
        fad_inf=args.fad_inf, kl_variant=args.kl_variant, imsm_mode=args.imsm_mode, seed=args.seed,
        allow_mixed_settings=args.allow_mixed_settings,
    )
    print(format_table(result))
    if args.compare_protocol:
        diffs = protocol_differences(earlier, result)
        print(f"protocol: the same as {args.compare_protocol}" if not diffs else
              f"protocol: {len(diffs)} differences from {args.compare_protocol} (the numbers are not comparable "
              "where they matter):\n" + "\n".join(f"  {d}" for d in diffs))
    for message in result["warnings"]:
        print(f"warning: {message}", file=sys.stderr)
    if args.out:
        try:
            path = write_json(result, args.out, overwrite=overwrite, inputs=inputs, name="--out")
        except OutputExistsError as exc:  # it appeared while the metrics were computed
            raise OutputExistsError(f"{exc} (it appeared during the run; the results above were not saved)") from None
        write_json(result["protocol"], protocol_path, overwrite=overwrite, inputs=inputs, name="--out")
        print(f"wrote {path} and its protocol record {protocol_path}")
    return 0


def _read_results(path: str | os.PathLike) -> dict[str, Any]:
    """An earlier results or protocol JSON (``--compare-protocol``); a ``ValueError`` naming it otherwise."""
    from ..files import check_input_file

    path = check_input_file(path, "--compare-protocol", "results or protocol JSON file")  # a pipe would block
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"--compare-protocol: cannot read {str(path)!r} as JSON ({exc})") from None
    if not isinstance(data, dict) or not ("protocol" in data or "embedders" in data):
        raise ValueError(f"--compare-protocol: {str(path)!r} is not a melfusion evaluate result or protocol")
    if not isinstance(data.get("protocol", data), dict):
        raise ValueError(f"--compare-protocol: {str(path)!r} has a 'protocol' that is not a JSON object (edited?)")
    return data
