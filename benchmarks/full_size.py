"""Full-size presets with random weights: build time, memory, sampling and one training step per mode.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/full_size.py                     # paper preset, CPU
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/full_size.py --preset tiny --train-seconds 1   # a quick check
    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/full_size.py --preset audioldm
    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/full_size.py --preset stable_audio --modes alphas
    .venv/bin/python benchmarks/full_size.py --device cuda                                   # on a GPU
    .venv/bin/python benchmarks/full_size.py --report benchmarks/results/full_size_*.json    # tables again

The preset is built at its real size with random weights
(``MelFusion.from_config(cfg, weights=False)``: real tensors, no downloads), in
one process, and measured in this order:

1. build: wall time, resident memory (RSS) after it, parameters per part
   (``feature_source``, ``denoiser``, ``text_encoder``, ``codec``, ``vocoder``,
   ``synapse``) and the parameters each training mode trains;
2. generation (``--parts generate``): ``model.generate`` on a PIL image of the
   first ``--image-sizes`` size, ``--steps`` sampling steps (classifier-free
   guidance: a batch of 2 in the denoiser), ``--seconds`` of audio, in float32
   and then bfloat16 (``model.to(dtype=torch.bfloat16)``, done after training);
   every image is resized to ``model.feature_source.resolution`` before the
   image VAE, so for the other sizes only that preparation and the VAE encoding
   differ and are timed (``feature_source.encode``);
3. training (``--parts train``): one optimizer step (``TrainConfig.max_steps=1``)
   per mode of ``melfusion.training.config.TRAIN_MODES`` (read at run time), via
   ``Trainer(config, model=model).train()``, batch 1, a ``--train-seconds`` clip,
   text and image dropout 0 (so every step runs the image UNet), no EMA; the
   step is a fresh one, so it includes encoding the image into the run's latent
   cache. The checkpoint and ``model/`` writes at the end of the run are
   skipped (the instance's ``save_state``/``save_model`` replaced by no-ops)
   because at full size they would write gigabytes; their cost is not in the
   figures. A mode whose estimated peak RSS exceeds ``--max-rss-gib`` is not run
   (unless MemAvailable is above ``--override-available-gib`` at that moment);
   its memory is then given by arithmetic. ``--big-batch`` (4) is run for
   ``--big-batch-modes`` where the arithmetic says it fits, and estimated
   otherwise. With a ``gradient_checkpointing`` field in ``TrainConfig``,
   ``synapse+unet`` is also run with it on.

Memory: a background thread samples the process's RSS (``/proc/self/status``
VmRSS) every ``--sample-ms`` ms; each measurement reports the RSS just before
it, the peak during it and the increase. Freed memory is handed back to the OS
(``gc.collect`` + glibc ``malloc_trim``) between measurements. On CUDA also
``torch.cuda.max_memory_allocated`` (reset before each). Every figure is one
run (no warm-up, no repeats): a first call, including one-time costs.

GPU fit (arithmetic, labelled ``estimate`` in the JSON): per training mode,
weights (float32, or bfloat16 for the frozen parts with trained weights kept in
float32, as ``mixed_precision: bf16`` does on GPUs) + float32 gradients and
two AdamW moments for the trained parameters + activations, where activations
are the measured CPU float32 peak increase of a batch-1 step less the
gradient/optimizer bytes (halved for bf16, an assumption). A card "fits" when
the total is at most 90% of 24 GB / 80 GB (the rest for the CUDA context and
allocator slack).

The results go to ``--out`` (JSON, rewritten atomically after each section, so
an interrupted run keeps what it measured) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import functools
import gc
import importlib
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a clone without installing
    sys.path.insert(0, str(ROOT))

import melfusion as mf  # noqa: E402

GIB = 2**30
PARTS = ("feature_source", "denoiser", "text_encoder", "codec", "vocoder", "synapse")
TEXT = "a calm piano melody"
GPU_CARDS = {"24GB": 24e9, "80GB": 80e9}
GPU_USABLE = 0.9  # of a card's memory, the rest for the CUDA context and allocator slack


# -- memory ---------------------------------------------------------------------------------
def _proc_bytes(file: str, field: str) -> int | None:
    """A ``field:   N kB`` line of a /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(file) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The process's resident set size now (VmRSS)."""
    rss = _proc_bytes("/proc/self/status", "VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss


def mem_available_bytes() -> int | None:
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next "RSS before" is what is really held."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakRSS:
    """Samples RSS in a background thread while the ``with`` block runs."""

    def __init__(self, interval_s: float, cuda: bool):
        self.interval, self.cuda = interval_s, cuda
        self.before = self.peak = self.after = 0
        self.cuda_peak = None
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        release_memory()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated()
        self._stop.set()
        self._thread.join()
        self.after = rss_bytes()
        self.peak = max(self.peak, self.after)
        return False

    def record(self) -> dict:
        out = {"rss_before_gib": gib(self.before), "peak_rss_gib": gib(self.peak),
               "peak_increase_gib": gib(self.peak - self.before), "rss_after_gib": gib(self.after)}
        if self.cuda_peak is not None:
            out["cuda_max_allocated_gib"] = gib(self.cuda_peak)
        return out


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def measure(fn, args, label: str) -> dict:
    """Run ``fn()`` once: wall time and memory; an exception becomes ``error`` (the run goes on)."""
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    rec: dict = {"loadavg_1min_start": round(os.getloadavg()[0], 2)}
    with PeakRSS(args.sample_ms / 1000, args.device == "cuda") as mem:
        start = time.perf_counter()
        try:
            rec["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-4:]
        if args.device == "cuda":
            torch.cuda.synchronize()
        rec["wall_s"] = round(time.perf_counter() - start, 2)
    rec.update(mem.record())
    rec["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    status = rec.get("error", "ok")
    print(f"    {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_gib']:.2f} GiB "
          f"(+{rec['peak_increase_gib']:.2f}): {status}", flush=True)
    return rec


# -- output -------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside ``path``, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    total = None
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_total_gib": gib(total), "torch": torch.__version__, "python": platform.python_version(),
            "melfusion": getattr(mf, "__version__", None), "nice": os.nice(0)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- parts ------------------------------------------------------------------------------------------
def count(module) -> int:
    if module is None or not hasattr(module, "parameters"):
        return 0
    return sum(p.numel() for p in module.parameters())


def parameters(model) -> dict:
    out = {part: count(getattr(model, part, None)) for part in PARTS}
    out["total"] = sum(out.values())
    return out


def optimizer_params(trainer) -> int:
    return sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])


# -- generation ---------------------------------------------------------------------------------------
def pil_image(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def generate(model, args, size: int, seed: int):
    model.feature_cache.clear()  # a new image: the image UNet runs (inversion and the reverse pass)
    out = model.generate(image=pil_image(size, seed), text=TEXT, num_inference_steps=args.steps,
                         seconds=args.seconds, seed=0, progress=False)
    wave = np.asarray(out.waveforms)
    return {"waveform_shape": list(wave.shape), "sample_rate": out.sample_rate,
            "finite": bool(np.isfinite(wave).all())}


def encode(model, size: int, seed: int):
    from melfusion.images import load_images

    fs = model.feature_source
    x = load_images(pil_image(size, seed), "image", size=getattr(fs, "resolution", None)).to(model.device)
    with torch.no_grad():
        latents = fs.encode(x)
    return {"input_px": size, "encoded_from": list(x.shape[-2:]), "latent_shape": list(latents.shape)}


# -- training ----------------------------------------------------------------------------------------
def write_manifest(folder: Path, sample_rate: int, seconds: float, image_px: int) -> Path:
    """Two rows: one PNG (both rows, so the second would find its latent cached) and noise WAVs."""
    import soundfile as sf

    (folder / "audio").mkdir(parents=True)
    (folder / "images").mkdir()
    pil_image(image_px, 7).save(folder / "images" / "img.png")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        noise = (0.1 * rng.standard_normal(int(round(seconds * sample_rate)))).astype(np.float32)
        sf.write(folder / "audio" / f"noise{i}.wav", noise, sample_rate, subtype="PCM_16")
        rows.append({"captions": TEXT if i == 0 else "drums and bass", "location": f"audio/noise{i}.wav",
                     "img_path": "images/img.png"})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(model, mode: str, batch: int, manifest: Path, output: Path, args, extra: dict):
    from melfusion.training import TrainConfig

    fields = TrainConfig.model_fields
    data = dict(model=model.config, mode=mode, output=str(output), batch_size=batch, max_steps=1,
                checkpoint_every=10**9, plot=False, tensorboard=False, progress=False, text_dropout=0.0,
                image_dropout=0.0, data={"manifest": str(manifest), "seconds": args.train_seconds},
                ema={"enabled": False}, **extra)
    if args.device == "cuda" and args.train_mixed_precision != "no":
        data["mixed_precision"] = args.train_mixed_precision
    return TrainConfig(**{k: v for k, v in data.items() if k in fields or k in extra})


def train_once(trainer) -> dict:
    steps = []
    step = trainer.optimizer_step

    def timed(*a, **kw):
        start = time.perf_counter()
        result = step(*a, **kw)
        steps.append(round(time.perf_counter() - start, 2))
        return result

    trainer.optimizer_step = timed
    trainer.save_state = lambda: None  # no gigabyte checkpoint (see the module doc)
    trainer.save_model = lambda path=None: None
    result = trainer.train()
    return {"step_s": steps, "loss": [float(x) for x in result.losses]}


def reload(holder: dict, folder: Path, args) -> dict:
    """``save_pretrained`` the model, drop it, ``from_pretrained`` it back (every module is written, the weights
    being random): the way to a model whose base can be named, which LoRA training needs."""
    rec = {"why": "mode refused the random-weights model (LoRA needs a base that can be loaded again)"}
    s = measure(lambda: holder["model"].save_pretrained(folder), args, "save_pretrained (for LoRA)")
    s.pop("result", None)
    rec["save"] = s
    rec["saved_gib"] = gib(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
    holder["model"] = None
    release_memory()
    device = None if args.device == "cpu" else args.device
    loaded = measure(lambda: mf.MelFusion.from_pretrained(folder, device=device), args, "from_pretrained")
    holder["model"] = loaded.pop("result")
    rec["load"] = loaded
    return rec


def training(holder: dict, args, results: dict, save) -> None:
    """One step per mode at batch 1, then ``--big-batch``, then gradient checkpointing (it stays on once
    enabled), then the modes that needed the model saved and loaded back (LoRA)."""
    from melfusion.training import TrainConfig, Trainer

    modes = list(importlib.import_module("melfusion.training.config").TRAIN_MODES)
    if args.modes != "all":
        wanted = [m.strip() for m in args.modes.split(",")]
        modes = [m for m in modes if m in wanted] + [m for m in wanted if m not in modes]
    big_modes = modes if args.big_batch_modes == "all" else [m.strip() for m in args.big_batch_modes.split(",")]
    cap = args.max_rss_gib * GIB
    tmp_root = Path(tempfile.mkdtemp(prefix="melfusion-full-size-"))
    manifest = write_manifest(tmp_root / "data", holder["model"].sample_rate, args.train_seconds,
                              getattr(holder["model"].feature_source, "resolution", None) or 512)
    results["training_setup"] = {"train_seconds": args.train_seconds, "manifest_rows": 2, "max_steps": 1,
                                 "text_dropout": 0.0, "image_dropout": 0.0, "ema": False,
                                 "modes_at_run_time": modes}
    rows = results.setdefault("training", [])
    activations: dict[str, float] = {}  # label -> measured batch-1 activation bytes
    counter = [0]

    def make_trainer(mode, batch, extra):
        counter[0] += 1
        config = train_config(holder["model"], mode, batch, manifest, tmp_root / f"run{counter[0]}", args, extra)
        return Trainer(config, model=holder["model"])

    def run(label, mode, batch, extra=None, allow_reload=False):
        """Returns "reload" when the mode needs a model that can be loaded again (and ``allow_reload`` is off)."""
        extra = extra or {}
        rec = {"label": label, "mode": mode, "batch": batch, **({"extra": extra} if extra else {})}
        try:
            needs_reload = False
            try:
                trainer = make_trainer(mode, batch, extra)
            except ValueError as exc:
                # LoRA refuses a model with random weights (its adapters name a base that could not be loaded
                # again): save the model and load it back, as the message says, then retry once
                if "save_pretrained" not in str(exc) or holder["model"].name_or_path is not None:
                    raise
                needs_reload = True
            # outside the except block: the exception's traceback holds the old model until it ends
            if needs_reload:
                if not allow_reload:
                    return "reload"
                rec["reload"] = reload(holder, tmp_root / "saved", args)
                trainer = make_trainer(mode, batch, extra)
        except Exception as exc:  # noqa: BLE001
            rec.update(measured=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(rec)
            print(f"    {label} (batch {batch}): {rec['error']}", flush=True)
            save()
            return None
        rows.append(rec)
        trained = optimizer_params(trainer)
        fixed = 3 * 4 * trained  # float32 gradients + two AdamW moments
        release_memory()
        now = rss_bytes()
        act = max(activations.values()) if activations else None
        estimate = now + fixed + (batch * act if act is not None else 0)
        rec.update(trainable_params=trained, model_params=parameters(holder["model"])["total"], rss_before_gib=gib(now), grad_adam_gib=gib(fixed),
                   estimated_peak_rss_gib=gib(estimate),
                   estimate_basis="RSS before + 12 B/trained param" + (
                       f" + {batch} x measured batch-1 activations" if act is not None else " (no activation yet)"))
        avail = mem_available_bytes()
        if estimate > cap and not (avail is not None and avail > args.override_available_gib * GIB):
            rec.update(measured=False, skipped=(
                f"estimated peak RSS {estimate / GIB:.1f} GiB > cap {args.max_rss_gib:g} GiB and MemAvailable "
                f"{(avail or 0) / GIB:.1f} GiB <= {args.override_available_gib:g} GiB"))
            print(f"    {label} (batch {batch}): not run: {rec['skipped']}", flush=True)
        else:
            step = functools.partial(train_once, trainer)
            out = measure(step, args, f"train {label}, batch {batch}")
            res = out.pop("result", None)
            rec.update(measured="error" not in out, **out, **(res or {}))
            if "error" not in out and batch == 1:
                activations[label] = max(0, (out["peak_increase_gib"] * GIB) - fixed)
                rec["activation_gib"] = gib(activations[label])
            step = None
        with contextlib.suppress(Exception):
            trainer.close()
        trainer = None
        release_memory()
        save()
        return None

    deferred = [m for m in modes if run(m, m, 1) == "reload"]
    if args.big_batch > 1:
        for mode in modes:
            if mode in big_modes and any(r["label"] == mode and r.get("measured") for r in rows):
                run(mode, mode, args.big_batch)
    if "gradient_checkpointing" in TrainConfig.model_fields and "synapse+unet" in modes:
        run("synapse+unet, gradient_checkpointing", "synapse+unet", 1, {"gradient_checkpointing": True})
    for mode in deferred:
        run(mode, mode, 1, allow_reload=True)
    with contextlib.suppress(Exception):
        import shutil

        shutil.rmtree(tmp_root)


# -- arithmetic -------------------------------------------------------------------------------------------
def estimates(results: dict, args) -> dict:
    """Training memory by arithmetic: batch ``--big-batch`` on this machine, and GPU cards per mode."""
    params = results["parameters"]["total"]
    rows = [r for r in results.get("training", []) if r["batch"] == 1 and "trainable_params" in r]
    measured = {r["label"]: r["activation_gib"] * GIB for r in rows if r.get("activation_gib") is not None}
    gen = {g["dtype"]: g for g in results.get("generation", []) if "error" not in g}
    out = {"note": "estimate: arithmetic, not measured", "gpu_usable_fraction": GPU_USABLE, "training": []}
    for r in rows:
        label, trained = r["label"], r["trainable_params"]
        params = r.get("model_params", results["parameters"]["total"])  # LoRA adapters included
        if label in measured:
            act, basis = measured[label], f"measured ({label})"
        elif measured:
            src = max(measured, key=measured.get)
            act, basis = measured[src], f"from {src}, measured (the largest)"
        else:
            act, basis = None, "none measured"
        e = {"label": label, "trainable_params": trained, "activation_batch1_gib": gib(act),
             "activation_basis": basis}
        if act is not None:
            fixed = r["rss_before_gib"] * GIB + 12 * trained
            e[f"cpu_batch{args.big_batch}_peak_rss_gib"] = gib(fixed + args.big_batch * act)
            if not r.get("measured"):
                e["cpu_batch1_peak_rss_gib"] = gib(fixed + act)
            big = max(args.big_batch, 4)
            for dtype, wbytes, ascale in (("fp32", 4, 1.0), ("bf16", 2, 0.5)):
                weights = (params - trained) * wbytes + trained * 4
                total = weights + 12 * trained + act * ascale
                total_big = weights + 12 * trained + big * act * ascale  # activations grow with the batch
                e[dtype] = {"weights_gib": gib(weights), "grads_adam_gib": gib(12 * trained),
                            "activations_gib": gib(act * ascale), "total_gib": gib(total),
                            **{f"fits_{k}": total <= GPU_USABLE * v for k, v in GPU_CARDS.items()},
                            f"total_batch{big}_gib": gib(total_big),
                            **{f"fits_{k}_batch{big}": total_big <= GPU_USABLE * v for k, v in GPU_CARDS.items()}}
        out["training"].append(e)
    gen_rows = []
    for dtype, g in gen.items():
        wbytes = 2 if dtype == "bfloat16" else 4
        total = params * wbytes + g["peak_increase_gib"] * GIB
        gen_rows.append({"dtype": dtype, "weights_gib": gib(params * wbytes),
                         "activations_gib": g["peak_increase_gib"], "total_gib": gib(total),
                         **{f"fits_{k}": total <= GPU_USABLE * v for k, v in GPU_CARDS.items()}})
    out["generation"] = gen_rows
    return out


# -- report ------------------------------------------------------------------------------------------
def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(results: dict, args) -> str:
    lines = [f"## {results['preset']} on {results['device']} (random weights)", ""]
    b = results.get("build", {})
    lines += ["| what | wall s | peak RSS GiB | increase GiB | note |", "|---|---|---|---|---|",
              f"| build | {fmt(b.get('wall_s'))} | {fmt(b.get('peak_rss_gib'), '.2f')} | "
              f"{fmt(b.get('peak_increase_gib'), '.2f')} | RSS after {fmt(b.get('rss_after_gib'), '.2f')} |"]
    for g in results.get("generation", []):
        note = g.get("error") or f"{args.steps} steps, {args.seconds:g} s, image {g['image_px']} px"
        lines.append(f"| generate {g['dtype']} | {fmt(g.get('wall_s'))} | {fmt(g.get('peak_rss_gib'), '.2f')} | "
                     f"{fmt(g.get('peak_increase_gib'), '.2f')} | {note} |")
    for e in results.get("image_encode", []):
        lines.append(f"| encode {e['image_px']} px image | {fmt(e.get('wall_s'))} | "
                     f"{fmt(e.get('peak_rss_gib'), '.2f')} | {fmt(e.get('peak_increase_gib'), '.2f')} | "
                     f"{e.get('error') or 'resized to ' + str(e.get('result', {}).get('encoded_from'))} |")
    if "to_bfloat16" in results:
        t = results["to_bfloat16"]
        lines.append(f"| model.to(bfloat16) | {fmt(t.get('wall_s'))} | {fmt(t.get('peak_rss_gib'), '.2f')} | "
                     f"{fmt(t.get('peak_increase_gib'), '.2f')} | RSS after {fmt(t.get('rss_after_gib'), '.2f')} |")
    for r in results.get("training", []):
        if r.get("measured"):
            note = f"trains {r['trainable_params']:,} params; step {r.get('step_s')} s"
            lines.append(f"| train {r['label']}, batch {r['batch']} | {fmt(r.get('wall_s'))} | "
                         f"{fmt(r.get('peak_rss_gib'), '.2f')} | {fmt(r.get('peak_increase_gib'), '.2f')} | {note} |")
        else:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| train {r['label']}, batch {r['batch']} | - | est. {fmt(r.get('estimated_peak_rss_gib'), '.2f')} "
                         f"| - | not measured: {why} |")
    p = results.get("parameters", {})
    lines += ["", "| part | parameters |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in p.items()]
    est = results.get("estimates", {})
    if est.get("training"):
        big = max(args.big_batch, 4)
        lines += ["", "GPU memory by arithmetic (estimate), GiB: weights + grads/AdamW + activations (batch 1, "
                  f"and batch {big} with {big}x the batch-1 activations)", "",
                  f"| mode | trains | fp32 b1 | fits 24/80 GB | bf16 b1 | fits 24/80 GB | fp32 b{big} | fits 24/80 GB "
                  f"| bf16 b{big} | fits 24/80 GB | activations from |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in est["training"]:
            f, h = e.get("fp32", {}), e.get("bf16", {})

            def yn(d, suffix=""):
                return "/".join("yes" if d.get(f"fits_{k}{suffix}") else "no" for k in GPU_CARDS) if d else "-"

            lines.append(f"| {e['label']} | {e['trainable_params']:,} | {fmt(f.get('total_gib'))} | {yn(f)} | "
                         f"{fmt(h.get('total_gib'))} | {yn(h)} | {fmt(f.get(f'total_batch{big}_gib'))} | "
                         f"{yn(f, f'_batch{big}')} | {fmt(h.get(f'total_batch{big}_gib'))} | {yn(h, f'_batch{big}')} | "
                         f"{e['activation_basis']} |")
    lines.append(f"\nru_maxrss at the end: {fmt(results.get('ru_maxrss_gib'), '.2f')} GiB")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", help="paper (default), audioldm, stable_audio, tiny, mini, ...")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parts", default="generate,train", help="comma list of generate, train")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps")
    parser.add_argument("--seconds", type=float, default=2.56, help="generated clip length")
    parser.add_argument("--image-sizes", default="768,512", help="input image sizes (px); generate at the first")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="generation dtypes, in this order")
    parser.add_argument("--modes", default="all", help="training modes (default: every TRAIN_MODES entry)")
    parser.add_argument("--train-seconds", type=float, default=10.24, help="training clip length")
    parser.add_argument("--train-mixed-precision", default="bf16", choices=["no", "fp16", "bf16"],
                        help="on cuda only (CPU training is float32)")
    parser.add_argument("--big-batch", type=int, default=4, help="the larger training batch (1: none)")
    parser.add_argument("--big-batch-modes", default="alphas", help="modes run at --big-batch when they fit; all")
    parser.add_argument("--max-rss-gib", type=float, default=17.0, help="do not run a step estimated above this")
    parser.add_argument("--override-available-gib", type=float, default=22.0,
                        help="...unless MemAvailable is above this at that moment")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/full_size_<preset>_<device>.json)")
    parser.add_argument("--report", nargs="+", metavar="JSON", default=None,
                        help="only print the markdown tables of earlier results (no measuring)")
    args = parser.parse_args(argv)
    if args.report:
        for path in args.report:
            data = json.loads(Path(path).read_text())
            saved_args = argparse.Namespace(**data["args"])
            data["estimates"] = estimates(data, saved_args)  # the arithmetic as this version computes it
            print(table(data, saved_args))
            print()
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"generate", "train"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}")
    sizes = [int(s) for s in args.image_sizes.split(",")]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"full_size_{args.preset}_{args.device}.json")
    started = time.time()
    results: dict = {"preset": args.preset, "device": args.device, "args": vars(args), "machine": machine(),
                     "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "loadavg_start": os.getloadavg(), "mem_available_start_gib": gib(mem_available_bytes()),
                     "complete": False}

    def save():
        results["ru_maxrss_gib"] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        results["elapsed_s"] = round(time.time() - started, 1)
        write_json(out, results)

    print(f"melfusion full-size benchmark: {args.preset} on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; results -> {out}", flush=True)
    torch.manual_seed(0)
    cfg = mf.MelFusionConfig.preset(args.preset)
    built = measure(lambda: mf.MelFusion.from_config(cfg, weights=False,
                                                     device=None if args.device == "cpu" else args.device),
                    args, "build")
    model = built.pop("result", None)
    results["build"] = built
    if model is None:
        save()
        print(table(results, args))
        return 1
    results["parameters"] = parameters(model)
    results["feature_source_resolution"] = getattr(model.feature_source, "resolution", None)
    results["sample_rate"] = model.sample_rate
    save()

    if "generate" in parts and "float32" in args.dtypes:
        g = measure(lambda: generate(model, args, sizes[0], 1), args, f"generate float32, {sizes[0]} px")
        results.setdefault("generation", []).append({"dtype": "float32", "image_px": sizes[0], **g})
        for size in sizes:
            e = measure(lambda size=size: encode(model, size, 2), args, f"encode a {size} px image")
            results.setdefault("image_encode", []).append({"image_px": size, **e})
        save()
    if "generate" in parts and "bfloat16" in args.dtypes:
        t = measure(lambda: model.to(dtype=torch.bfloat16), args, "model.to(dtype=torch.bfloat16)")
        t.pop("result", None)
        results["to_bfloat16"] = t
        if "error" not in t:
            g = measure(lambda: generate(model, args, sizes[0], 3), args, f"generate bfloat16, {sizes[0]} px")
        else:
            g = {"error": f"model.to(bfloat16) failed: {t['error']}"}
        results.setdefault("generation", []).append({"dtype": "bfloat16", "image_px": sizes[0], **g})
        if "train" in parts:  # training is float32 on the CPU (the weights' values do not matter here)
            t = measure(lambda: model.to(dtype=torch.float32), args, "model.to(dtype=torch.float32)")
            t.pop("result", None)
            results["to_float32"] = t
        save()
    if "train" in parts:
        holder = {"model": model}
        del model
        training(holder, args, results, save)
    results["estimates"] = estimates(results, args)
    results["loadavg_end"] = os.getloadavg()
    results["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results["complete"] = True
    save()
    print()
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
