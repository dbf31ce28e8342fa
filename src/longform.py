"""Music beyond one window: long pieces, storyboards, continuation and inpainting.

:meth:`melfusion.MelFusion.generate` comes here when a call asks for more than one clip of the denoiser's
training length (``seconds`` above the window, ``images=[...]``, ``durations``, ``audio``). The method:

**Windows (MultiDiffusion).** The latent of the whole piece, ``(batch, C, T, ...)`` with ``T`` latent frames
on the time axis, is covered by windows of ``W`` frames (default: the model's clip, ``config.sampling.seconds``),
one every ``W - overlap`` frames from 0 (``overlap``: the config's ``sampling.window_overlap``, else half a
window; the piece is padded at the end to a whole number of hops and the padding is cut off after decoding).
At every sampling step each window is denoised (windows batched, ``window_batch`` at a time, so memory is
bounded by the batch, not by the piece), and the guided predictions are blended::

    pred(f) = sum_j w_j(f) pred_j(f) / sum_j w_j(f),     w_j = Hann taper over window j (positive everywhere)

then the scheduler takes one step on the whole latent. Every frame is a smooth average of the windows that
cover it, so there are no seams; a piece of ``T`` frames costs ``branches x n_windows`` denoiser rows per
step, ``n_windows = ceil((T - W) / (W - overlap)) + 1`` (plus one row per extra section a window overlaps).

**Sections (a storyboard).** Section ``s`` (its picture, caption and span) has a weight ``c_s(f)`` per latent
frame: 1 inside it, a raised-cosine crossfade of ``crossfade`` seconds centred on each boundary (shortened to
half of the shorter neighbouring section), the weights of all sections summing to 1 at every frame. A window
is denoised once for every section whose weight is non-zero in it, with that section's text and image
features, and these predictions enter the blend with weights ``w_j(f) c_s(f)``. The synapse thus receives
image features per query position: the music model's cross-attention keys are text tokens, which have no
position, so the blend is taken over the predictions of the query positions' windows (MultiDiffusion's
region prompts), and the music turns from one picture to the next over the crossfade instead of jumping.

**Known audio (RePaint).** With ``audio``, the given clip is encoded (mel front end and codec, as in
training) to a known latent ``z0`` and a mask of the latent frames to keep. After every step the kept frames
are replaced by ``z0`` noised to the level of the next step (``scheduler.add_noise``; fresh noise each step)
and, at the end, by ``z0`` itself, so the generated frames are denoised in the context of the known ones.
``continue_seconds`` appends new music after the clip; ``regenerate=(t0, t1)`` repaints that span. The returned
waveform is the given audio, sample for sample, outside the regenerated span; the generated audio is matched
in loudness to the given audio and crossfaded into it over ``seam`` seconds (default 0.05) at each seam, inside
the regenerated span (a continuation's single seam lies in the clip's last ``seam`` seconds, which are
crossfaded into the model's rendering of them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import NonFiniteError, finite_float, positive_int

__all__ = ["WindowPlan", "plan_windows", "window_taper", "section_weights", "blend_windows", "LongRequest",
           "Section", "check_long_request", "generate_long", "seam_crossfade", "DEFAULT_SEAM", "DEFAULT_OVERLAP",
           "seam_report", "SeamReport", "frame_seconds", "encode_audio", "load_given_audio"]

#: seconds of crossfade between the given and the generated audio at each seam (continuation, inpainting)
DEFAULT_SEAM = 0.05
#: consecutive windows share this fraction of a window by default (``window_overlap``)
DEFAULT_OVERLAP = 0.5
#: a section enters a window's jobs when its weight somewhere in the window exceeds this
_ACTIVE = 1e-4


# ---------------------------------------------------------------------------------------------
# the math: windows, tapers, section weights, the blend

@dataclass(frozen=True)
class WindowPlan:
    """Windows of ``size`` frames starting at ``starts`` that cover ``total`` frames."""

    total: int
    size: int
    starts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.starts)


def plan_windows(total: int, size: int, overlap: int) -> WindowPlan:
    """Windows of ``size`` frames, one every ``size - overlap`` frames from 0 (``0 <= overlap < size``), as many
    as cover ``total`` frames (``total >= size``). The plan's ``total`` is where the last window ends: the piece
    is padded at the end to a whole number of hops (the padding is generated and cut off), so every pair of
    neighbours shares exactly ``overlap`` frames and windows stay a whole number of hops apart."""
    total, size = positive_int(total, "total"), positive_int(size, "size")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < size:
        raise ValueError(f"overlap: expected an int from 0 to {size - 1} frames, got {overlap!r}")
    if total < size:
        raise ValueError(f"total: {total} frames is shorter than one window of {size}")
    hop = size - int(overlap)
    n = math.ceil((total - size) / hop) + 1
    return WindowPlan(size + (n - 1) * hop, int(size), tuple(k * hop for k in range(n)))


def window_taper(size: int) -> np.ndarray:
    """The blend weight over a window's ``size`` frames: a Hann taper sampled at frame centres, positive at
    every frame (so a frame only one window covers keeps that window's prediction) and 1 in the middle."""
    size = positive_int(size, "size")
    k = np.arange(size, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2 * np.pi * (k + 0.5) / size)


def section_weights(total: int, bounds: Sequence[float], crossfade: float) -> np.ndarray:
    """``(sections, total)`` weights of consecutive sections split at frame positions ``bounds`` (increasing,
    inside ``(0, total)``): 1 inside a section, a raised-cosine ramp over ``crossfade`` frames centred on each
    boundary (at most half of each neighbouring section), summing to 1 at every frame."""
    total = positive_int(total, "total")
    edges = [0.0, *[float(b) for b in bounds], float(total)]
    if any(not b - a > 0 for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bounds: expected increasing positions inside (0, {total}), got {list(bounds)}")
    crossfade = finite_float(crossfade, "crossfade", low=0.0)
    centres = np.arange(total, dtype=np.float64) + 0.5
    weights = np.ones((len(edges) - 1, total))
    for s, b in enumerate(edges[1:-1]):
        half = min(crossfade / 2, (b - edges[s]) / 2, (edges[s + 2] - b) / 2)
        if half <= 1e-9:
            ramp = (centres >= b).astype(np.float64)
        else:
            r = np.clip((centres - (b - half)) / (2 * half), 0.0, 1.0)
            ramp = 0.5 - 0.5 * np.cos(np.pi * r)  # 0 before the crossfade, 1 after
        weights[s] *= 1.0 - ramp
        weights[s + 1] *= ramp
    return weights


def blend_windows(total: int, starts: Sequence[int], predictions: Sequence[torch.Tensor],
                  weights: Sequence[torch.Tensor], axis: int = 2) -> torch.Tensor:
    """``sum_j w_j pred_j / sum_j w_j`` on a latent of ``total`` frames along ``axis``: ``predictions[j]`` covers
    frames ``starts[j]:starts[j] + len(weights[j])``; ``weights[j]`` (frames,) is positive where it counts.
    Every frame must be covered by a positive weight."""
    if not predictions:
        raise ValueError("predictions: expected at least one window")
    first = predictions[0]
    shape = list(first.shape)
    shape[axis] = int(total)
    acc = torch.zeros(shape, dtype=torch.float32, device=first.device)
    norm = torch.zeros(int(total), dtype=torch.float32, device=first.device)
    view = [1] * first.ndim
    for start, pred, w in zip(starts, predictions, weights, strict=True):
        w = torch.as_tensor(w, dtype=torch.float32, device=first.device)
        view[axis] = w.numel()
        acc.narrow(axis, int(start), w.numel()).add_(pred.float() * w.view(view))
        norm[int(start): int(start) + w.numel()] += w
    if not bool((norm > 0).all()):
        raise ValueError("weights: some frames are covered by no window")
    view[axis] = int(total)
    return acc / norm.view(view)


# ---------------------------------------------------------------------------------------------
# the request

@dataclass
class Section:
    """One section of a piece: its picture (a ``(1, 3, H, W)`` tensor, or None), caption and span in seconds."""

    image: torch.Tensor | None
    text: str
    start: float
    end: float


@dataclass
class LongRequest:
    """The checked long-form arguments of one ``generate`` call."""

    pieces: list[list[Section]]     # the sections of each piece (a storyboard: one piece)
    seconds: float                  # of each piece
    window_seconds: float
    overlap: float                  # seconds
    crossfade: float                # seconds
    window_batch: int
    audio: np.ndarray | None = None  # the given clip at the model's rate
    keep: list[tuple[float, float]] | None = None  # spans (seconds) of the given audio kept as they are
    seam: float = DEFAULT_SEAM


def _seconds(value: Any, name: str, *, low: float = 0.0, low_open: bool = True) -> float:
    return finite_float(value, name, low=low, low_open=low_open, high=86_400.0)


def check_long_request(model: Any, image: Any, text: Any, seconds: Any, images: Any, texts: Any, durations: Any,
                       crossfade: Any, window_seconds: Any, window_overlap: Any, window_batch: Any, audio: Any,
                       continue_seconds: Any, regenerate: Any, seam: Any) -> LongRequest:
    """Every long-form argument checked (a ``ValueError`` naming the first bad one)."""
    from .backbones.text import check_texts
    from .images import load_images

    clip = float(model.config.sampling.seconds)
    window = clip if window_seconds is None else _seconds(window_seconds, "window_seconds")
    model.latent_hw(window, "window_seconds")  # a window the denoiser can run on
    if window_overlap is None:
        configured = model.config.sampling.window_overlap
        overlap = window * DEFAULT_OVERLAP if configured is None or window_seconds is not None else configured
    else:
        overlap = finite_float(window_overlap, "window_overlap", low=0.0)
    if not overlap < window:
        raise ValueError(f"window_overlap: expected fewer seconds than the window ({window:g} s), got {overlap:g}")
    batch = 8 if window_batch is None else positive_int(window_batch, "window_batch")
    seam_s = DEFAULT_SEAM if seam is None else finite_float(seam, "seam", low=0.0, high=10.0)

    # the given audio
    wave = None
    if audio is not None:
        wave = load_given_audio(audio, model.sample_rate)
    given = None if wave is None else wave.size / model.sample_rate
    if continue_seconds is not None and regenerate is not None:
        raise ValueError("continue_seconds: give continue_seconds or regenerate, not both")
    if (continue_seconds is not None or regenerate is not None) and wave is None:
        raise ValueError(f"{'continue_seconds' if continue_seconds is not None else 'regenerate'}: needs the "
                         "audio to continue or repaint (audio=...)")
    keep = None
    if wave is not None:
        if continue_seconds is not None:
            extra = _seconds(continue_seconds, "continue_seconds")
            if seconds is not None:
                raise ValueError("seconds: with continue_seconds the piece is the audio plus the continuation; "
                                 "give one of them")
            seconds = given + extra
            keep = [(0.0, given)]
        elif regenerate is not None:
            if isinstance(regenerate, (str, bytes)) or not isinstance(regenerate, Sequence) or len(regenerate) != 2:
                raise ValueError(f"regenerate: expected (start, end) in seconds, got {regenerate!r}")
            t0 = finite_float(regenerate[0], "regenerate", low=0.0)
            t1 = finite_float(regenerate[1], "regenerate", low=0.0)
            if not t0 < t1 <= given + 1e-9:
                raise ValueError(f"regenerate: expected 0 <= start < end <= {given:g} s (the audio's length), "
                                 f"got ({t0:g}, {t1:g})")
            if seconds is not None:
                raise ValueError("seconds: with regenerate the piece is as long as the audio; leave seconds out")
            seconds = given
            keep = [(0.0, t0), (t1, given)]
        else:
            raise ValueError("audio: say what to do with it: continue_seconds=S (continue it) or "
                             "regenerate=(start, end) (repaint a span)")

    # the sections: one storyboard (images / texts / durations), or a batch of pieces of one section each
    storyboard = images is not None or texts is not None or durations is not None
    if images is not None and image is not None:
        raise ValueError("images: give image (one picture) or images (a storyboard), not both")
    if texts is not None and not (isinstance(text, str) and text == ""):
        raise ValueError("texts: give text (one caption for all sections) or texts (one per section), not both")
    if images is not None:
        if isinstance(images, (str, bytes, Path)) or not isinstance(images, Sequence) or not images:
            raise ValueError(f"images: expected a non-empty list of pictures, got {type(images).__name__}")
        pictures = [load_images(x, f"images[{i}]") for i, x in enumerate(images)]
    elif image is not None:
        one = load_images(image, "image")
        pictures = [one[i: i + 1] for i in range(one.shape[0])]
    else:
        pictures = None
    captions = check_texts(texts, "texts") if texts is not None else check_texts(text, "text")
    if durations is not None and (isinstance(durations, (str, bytes)) or not isinstance(durations, Sequence)
                                  or not durations):
        raise ValueError(f"durations: expected a list of seconds, one per section, got {durations!r}")
    if storyboard:
        n = max(len(pictures) if pictures is not None else 1, len(captions),
                len(durations) if durations is not None else 1)
        checks = (("images" if images is not None else "image", pictures), ("texts" if texts is not None else
                  "text", captions), ("durations", durations))
        for name, got in checks:
            if got is not None and len(got) not in (1, n):
                raise ValueError(f"{name}: got {len(got)} for {n} sections; give one, or one per section")
        if durations is not None and len(durations) != n:
            raise ValueError(f"durations: got {len(durations)} for {n} sections; give one per section")
        if durations is not None:
            spans = [_seconds(d, f"durations[{i}]") for i, d in enumerate(durations)]
            if seconds is not None and abs(sum(spans) - float(seconds)) > 1e-6:
                raise ValueError(f"durations: they add up to {sum(spans):g} s but the piece lasts "
                                 f"{float(seconds):g} s (seconds, or the audio and its continuation)")
        else:
            total = clip * n if seconds is None else _seconds(seconds, "seconds")
            spans = [total / n] * n
        piece_pictures = [[(pictures[i] if len(pictures) > 1 else pictures[0]) if pictures is not None else None
                           for i in range(n)]]
        piece_captions = [[captions[i] if len(captions) > 1 else captions[0] for i in range(n)]]
    else:
        if pictures is not None and len(pictures) not in (1, len(captions)):
            raise ValueError(f"image: got {len(pictures)} images for {len(captions)} texts; give 1 or one per text")
        total = clip if seconds is None else _seconds(seconds, "seconds")
        spans = [total]
        piece_pictures = [[(pictures[p] if len(pictures) > 1 else pictures[0]) if pictures is not None else None]
                          for p in range(len(captions))]
        piece_captions = [[c] for c in captions]
    total = sum(spans)
    if total > 86_400.0:
        raise ValueError(f"seconds: expected at most a day, got {total:g} s")
    if model.synapse is None and pictures is not None:
        raise ValueError(f"{'images' if images is not None else 'image'}: this model has no synapse "
                         "(config.synapse.enabled is false)")
    xfade = min(1.0, window / 5) if crossfade is None else finite_float(crossfade, "crossfade", low=0.0)
    pieces = []
    for pics, caps in zip(piece_pictures, piece_captions, strict=True):
        sections, at = [], 0.0
        for i, span in enumerate(spans):
            sections.append(Section(pics[i], caps[i], at, at + span))
            at += span
        pieces.append(sections)
    return LongRequest(pieces, total, window, overlap, xfade, batch, wave, keep, seam_s)


def load_given_audio(audio: Any, sample_rate: int) -> np.ndarray:
    """The clip to continue or repaint: a path (any rate, mono-mixed), a 1-D array at the model's rate or an
    ``(array, rate)`` pair, as float32 mono at ``sample_rate``."""
    from .datasets.audio import load_audio

    if isinstance(audio, (str, Path)):
        return load_audio(audio, sample_rate, name="audio")
    rate = sample_rate
    if isinstance(audio, tuple) and len(audio) == 2 and not isinstance(audio[1], np.ndarray):
        audio, rate = audio
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 1000 <= rate <= 768_000:
            raise ValueError(f"audio: expected (waveform, sample rate in Hz), got a rate of {rate!r}")
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    try:
        wave = np.asarray(audio, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"audio: expected a path or a waveform array, got {type(audio).__name__}") from None
    if wave.ndim == 2:  # (channels, samples)
        wave = wave.mean(axis=0)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"audio: expected a mono waveform (samples,) or (channels, samples), got shape "
                         f"{np.shape(audio)}")
    if not np.isfinite(wave).all():
        raise ValueError("audio: holds NaN or infinite samples")
    if int(rate) != int(sample_rate):
        import librosa

        wave = librosa.resample(wave, orig_sr=int(rate), target_sr=int(sample_rate), res_type="soxr_hq")
    return wave.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# generation

def frame_seconds(model: Any) -> float:
    """Seconds per latent frame on the time axis."""
    codec, c = model.codec, model.config
    if codec.output == "waveform":
        return float(codec.downsample) / float(getattr(codec, "sample_rate", model.sample_rate))
    return float(c.hop_length) * float(codec.downsample) / float(c.sample_rate)


def encode_audio(model: Any, wave: np.ndarray, frames: int) -> torch.Tensor:
    """The latent ``(1, C, frames, ...)`` of ``wave`` (model rate), padded with silence or cut to ``frames``."""
    from .datasets.mel import MelFrontEnd

    codec, c = model.codec, model.config
    if codec.output == "waveform":
        samples = frames * int(codec.downsample)
        x = torch.from_numpy(np.ascontiguousarray(wave[:samples]))
        x = torch.nn.functional.pad(x, (0, samples - x.numel()))[None, None]
        latent = codec.encode(x.to(model.device, codec.dtype)).float()
    else:
        fe = MelFrontEnd(sample_rate=c.sample_rate, hop_length=c.hop_length, n_mels=c.n_mels)
        mel = fe.batch(torch.from_numpy(np.ascontiguousarray(wave))[None])  # (1, mel frames, mels)
        want = frames * int(codec.downsample)
        if mel.shape[1] >= want:
            mel = mel[:, :want]
        else:
            pad = mel.new_full((1, want - mel.shape[1], mel.shape[2]), math.log(fe.log_floor))
            mel = torch.cat([mel, pad], dim=1)
        latent = codec.encode(mel[:, None].to(model.device, codec.dtype)).float()
    if latent.shape[2] < frames:
        latent = torch.nn.functional.pad(latent, (0, 0) * (latent.ndim - 3) + (0, frames - latent.shape[2]))
    return latent.narrow(2, 0, frames)


def seam_crossfade(given: np.ndarray, generated: np.ndarray, keep: Sequence[tuple[float, float]],
                   sample_rate: int, seam: float) -> np.ndarray:
    """``generated`` with ``given`` put back on the ``keep`` spans (seconds), crossfaded over ``seam`` seconds at
    each seam on the generated side; a seam at the end of the given audio (a continuation) fades inside the
    given audio's last ``seam`` seconds instead."""
    out = np.array(generated, dtype=np.float32, copy=True)
    n_given = given.size
    fade = int(round(seam * sample_rate))
    for a, b in keep:
        i0, i1 = int(round(a * sample_rate)), min(int(round(b * sample_rate)), n_given, out.size)
        if i1 <= i0:
            continue
        out[i0:i1] = given[i0:i1]
        if fade <= 0:
            continue
        # the seam after the kept span
        if i1 < out.size:
            if i1 >= n_given:  # the given audio ends here: fade inside its last samples
                j0 = max(i0, i1 - fade)
                r = _ramp(i1 - j0)
                out[j0:i1] = (1 - r) * given[j0:i1] + r * generated[j0:i1]
            else:
                j1 = min(out.size, i1 + fade)
                r = _ramp(j1 - i1)
                out[i1:j1] = (1 - r) * given[i1:j1] + r * generated[i1:j1]
        # the seam before it
        if i0 > 0:
            j0 = max(0, i0 - fade)
            r = _ramp(i0 - j0)
            out[j0:i0] = (1 - r) * generated[j0:i0] + r * given[j0:i0]
    return out


def _ramp(n: int) -> np.ndarray:
    """``n`` samples rising from near 0 to near 1 (raised cosine at sample centres)."""
    if n <= 0:
        return np.zeros(0, dtype=np.float32)
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


class WindowBlend:
    """The running blend ``sum_j w_j pred_j / sum_j w_j`` of :func:`blend_windows`, one window at a time."""

    def __init__(self, like: torch.Tensor, axis: int = 2):
        self.axis = axis
        self.acc = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        self.norm = torch.zeros(like.shape[axis], dtype=torch.float32, device=like.device)
        self._view = [1] * like.ndim

    def add(self, rows: slice, start: int, pred: torch.Tensor, weight: torch.Tensor) -> None:
        view = list(self._view)
        view[self.axis] = weight.numel()
        self.acc[rows].narrow(self.axis, start, weight.numel()).add_(pred.float() * weight.view(view))
        if rows.start in (None, 0):
            self.norm[start: start + weight.numel()] += weight

    def result(self) -> torch.Tensor:
        view = list(self._view)
        view[self.axis] = self.norm.numel()
        return self.acc / self.norm.view(view)


@dataclass
class _Job:
    piece: int
    section: int
    start: int
    weight: torch.Tensor  # (W,) blend weight over the window's frames


def generate_long(model: Any, req: Any, lreq: LongRequest, sched: Any, generator: Any, latents: Any,
                  callback: Any, progress: bool, peak_normalize: bool) -> Any:
    """The long-form sampling loop (see the module doc); ``req`` is the pipeline's checked ``_Request``."""
    from dataclasses import replace

    from .checks import check_size
    from .pipeline import GenerationOutput
    from .sampling import denoise

    c = model.config
    fs = frame_seconds(model)
    window_shape = tuple(model.latent_shape(lreq.window_seconds, round_up=True))
    size = window_shape[1]
    pieces = lreq.pieces
    samples = req.samples
    n_sections = len(pieces[0])
    total_frames = max(size, model.codec.latent_shape(lreq.seconds, c.sample_rate, c.hop_length, c.n_mels)[1])
    plan = plan_windows(total_frames, size, min(size - 1, int(round(lreq.overlap / fs))))
    total_frames = plan.total  # padded to a whole number of hops; decode cuts the piece to its seconds
    bounds = [sec.start / fs for sec in pieces[0][1:]]
    weights = section_weights(total_frames, bounds, lreq.crossfade / fs)
    taper = window_taper(size)
    jobs = []
    for p in range(len(pieces)):
        for a in plan.starts:
            for s in range(n_sections):
                w = weights[s, a: a + size]
                if w.max() > _ACTIVE:
                    jobs.append(_Job(p, s, a, torch.tensor(taper * w, dtype=torch.float32, device=model.device)))
    chunk_jobs = max(1, lreq.window_batch)
    chunk = min(chunk_jobs, len(jobs))
    branches = req.branches
    # memory: the denoiser's rows of one chunk, the latents of the pieces and their audio
    activations = model.denoiser.activation_bytes(window_shape, chunk * samples * branches)
    cells = int(np.prod(window_shape)) // size * total_frames
    audio = len(pieces) * samples * int(lreq.seconds * model.sample_rate) * 128
    check_size(activations + 4 * 4 * cells * len(pieces) * samples + audio,
               "seconds" if len(pieces) * samples == 1 else "num_samples",
               f"{len(pieces) * samples} piece(s) of {lreq.seconds:g} s", limit=_device_limit(model.device),
               hint="generate a shorter piece or fewer samples, or lower window_batch")

    sched.set_timesteps(req.steps, device=model.device)
    texts = [sec.text for piece in pieces for sec in piece]
    negatives = [req.negatives[0]] * len(texts)
    cond_emb, cond_mask, null_emb, null_mask = model.encode_prompt(texts, negatives, samples)

    def text_rows(emb, p, s):
        k = (p * n_sections + s) * samples
        return emb[k: k + samples]

    use_image = req.use_image and any(sec.image is not None for piece in pieces for sec in piece)
    caches, per_step = {}, None
    if use_image:
        one = replace(req, texts=req.texts[:1], negatives=req.negatives[:1], samples=1)
        for p, piece in enumerate(pieces):
            for s, sec in enumerate(piece):
                cache, per_step, _ = model.prepare_image_features(sec.image, sched, one, cond_emb.shape[1],
                                                                  window_shape)
                caches[p, s] = cache
    rows_total = len(pieces) * samples
    shape = (rows_total, window_shape[0], total_frames, *window_shape[2:])
    start = model.prepare_latents(shape, sched, generator, latents)
    hook, g_text, g_image = model.synapse_hook, req.g_text, req.g_image
    three = branches == 3
    timing = torch.tensor([[0.0, float(lreq.window_seconds)]], device=model.device)

    def predict(x: torch.Tensor, t: Any, i: int) -> torch.Tensor:
        blend = WindowBlend(x)
        for at in range(0, len(jobs), chunk):
            group = jobs[at: at + chunk]
            xb = torch.cat([x[j.piece * samples:(j.piece + 1) * samples].narrow(2, j.start, size) for j in group])
            cond = torch.cat([text_rows(cond_emb, j.piece, j.section) for j in group])
            cmask = torch.cat([text_rows(cond_mask, j.piece, j.section) for j in group])
            null = torch.cat([text_rows(null_emb, j.piece, j.section) for j in group])
            nmask = torch.cat([text_rows(null_mask, j.piece, j.section) for j in group])
            k = xb.shape[0]
            emb_all = torch.cat([null, cond] + ([cond] if three else []))
            mask_all = torch.cat([nmask, cmask] + ([cmask] if three else []))
            if hook is not None and use_image:
                steps = [caches[j.piece, j.section].at(per_step[i]) for j in group]
                features = {name: tuple(torch.cat([f[name][m].expand(samples, *f[name][m].shape[1:]) for f in steps])
                                        for m in range(2)) for name in steps[0]}
                rows = torch.zeros(branches * k, dtype=torch.bool, device=model.device)
                rows[-k:] = True
                hook.set_features(features, timestep=torch.tensor(per_step[i], device=model.device),
                                  image_rows=rows)
            try:
                out = model.denoiser(torch.cat([xb] * branches).to(model.dtype), t, emb_all, mask_all,
                                     timing.expand(branches * k, 2)).float().chunk(branches)
            finally:
                if hook is not None:
                    hook.set_features(None)
            if three:
                guided = out[0] + g_text * (out[1] - out[0]) + g_image * (out[2] - out[1])
            else:
                guided = out[0] + g_text * (out[1] - out[0])
            for n, j in enumerate(group):
                blend.add(slice(j.piece * samples, (j.piece + 1) * samples), j.start,
                          guided[n * samples:(n + 1) * samples], j.weight)
        return blend.result()

    known = mask = None
    if lreq.audio is not None:
        known = encode_audio(model, lreq.audio, total_frames).to(model.device)
        keep = torch.zeros(total_frames, dtype=torch.bool)
        for a, b in lreq.keep:
            f0, f1 = math.ceil(a / fs - 1e-6), math.floor(b / fs + 1e-6)
            keep[f0: max(f0, f1)] = True
        view = [1] * len(shape)
        view[2] = total_frames
        mask = keep.to(model.device).view(view)
        timesteps = sched.timesteps
        start = torch.where(mask, _noised(sched, known.expand_as(start), timesteps[:1], generator, start), start)

    def step_end(m: Any, i: int, t: Any, tensors: dict) -> dict | None:
        x = tensors["latents"]
        result: dict[str, Any] = {}
        if known is not None:
            ts = sched.timesteps
            target = known.expand_as(x) if i + 1 >= len(ts) else _noised(sched, known.expand_as(x), ts[i + 1: i + 2],
                                                                         generator, x)
            x = torch.where(mask, target.to(x.dtype), x)
            result["latents"] = x
        if callback is not None:
            user = callback(m, i, t, {"latents": x})
            if user is not None:
                if not isinstance(user, dict):
                    return user  # denoise reports it
                result.update(user)
        return result or None

    def nonfinite(i: int, t: Any) -> Exception:
        return NonFiniteError(f"guidance_scale: the music latent became NaN or infinite at timestep {float(t):g} "
                              f"(step {i}); use smaller guidance scales (or check the starting latents and the "
                              "model's weights)")

    final = denoise(model, start, sched, predict, generator=generator,
                    callback=step_end if (known is not None or callback is not None) else None, progress=progress,
                    on_nonfinite=nonfinite, model_timesteps=model.denoiser.noise_schedule.model_timesteps(sched))
    given = lreq.audio
    waves, mel = model.decode(final, lreq.seconds, peak_normalize and given is None)
    if given is not None:
        waves = np.stack([_composite(given, w, lreq.keep, model.sample_rate, lreq.seam) for w in waves])
    prompts = [piece[0].text for piece in pieces for _ in range(samples)]
    out = GenerationOutput(waveforms=waves, sample_rate=model.sample_rate, mel=mel, texts=prompts,
                           mel_params=model.mel_params())
    out.sections = [(sec.start, sec.end) for sec in pieces[0]]
    return out


def _device_limit(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _noised(sched: Any, clean: torch.Tensor, timestep: torch.Tensor, generator: Any, like: torch.Tensor
            ) -> torch.Tensor:
    """``clean`` noised to the level of ``timestep`` in the scheduler's own sample space (fresh noise)."""
    dev = generator.device if generator is not None else "cpu"
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32, device=dev).to(clean.device)
    if hasattr(sched, "add_noise"):
        return sched.add_noise(clean.float(), noise, timestep.reshape(1)).to(like.dtype)
    if hasattr(sched, "scale_noise"):  # flow matching
        return sched.scale_noise(clean.float(), timestep.reshape(1), noise).to(like.dtype)
    raise ValueError(f"scheduler: {type(sched).__name__} cannot noise the given audio (no add_noise or "
                     "scale_noise); continuation and inpainting need one that can")


def _composite(given: np.ndarray, wave: np.ndarray, keep: Sequence[tuple[float, float]], sample_rate: int,
               seam: float) -> np.ndarray:
    """One generated clip (``(samples,)`` or ``(channels, samples)``) with the given audio put back: the
    generated audio matched in loudness to the given audio where both exist, kept below 0.99, crossfaded in."""
    n = min(given.size, wave.shape[-1])
    region = np.zeros(wave.shape[-1], dtype=bool)
    for a, b in keep:
        region[int(round(a * sample_rate)): int(round(b * sample_rate))] = True
    region[n:] = False
    mono = wave if wave.ndim == 1 else wave.mean(axis=0)
    ref, got = float(np.sqrt(np.mean(given[:n][region[:n]] ** 2))) if region.any() else 0.0, \
        float(np.sqrt(np.mean(mono[region] ** 2))) if region.any() else 0.0
    gain = float(np.clip(ref / got, 0.1, 10.0)) if ref > 1e-6 and got > 1e-6 else 1.0
    peak = float(np.abs(wave[..., ~region]).max()) if (~region).any() else 0.0
    if peak * gain > 0.99:
        gain = 0.99 / peak
    scaled = (wave * gain).astype(np.float32)
    if wave.ndim == 1:
        return seam_crossfade(given, scaled, keep, sample_rate, seam)
    return np.stack([seam_crossfade(given, ch, keep, sample_rate, seam) for ch in scaled])


# ---------------------------------------------------------------------------------------------
# measuring seams

@dataclass
class SeamReport:
    """Click measures near each boundary against the same measures inside the sections.

    ``jump``: the largest absolute sample-to-sample difference; ``flux``: the largest spectral flux (the
    positive part of the frame-to-frame change of the STFT magnitude, 32 ms frames every 8 ms, relative to
    the clip's mean frame magnitude). ``boundary_*`` has one value per boundary (within ``span`` seconds of
    it); ``inside_*`` one per stretch of ``2 * span`` seconds lying at least ``span`` away from every boundary.
    """

    boundary_jump: list[float]
    boundary_flux: list[float]
    inside_jump: list[float]
    inside_flux: list[float]

    @property
    def clean(self) -> bool:
        """Every boundary's jump and flux within the range measured inside the sections."""
        return (max(self.boundary_jump, default=0.0) <= max(self.inside_jump, default=0.0)
                and max(self.boundary_flux, default=0.0) <= max(self.inside_flux, default=0.0))


def seam_report(wave: np.ndarray, sample_rate: int, boundaries: Sequence[float], span: float = 0.05) -> SeamReport:
    """:class:`SeamReport` of a mono ``wave`` with section ``boundaries`` in seconds."""
    y = np.asarray(wave, dtype=np.float64).reshape(-1)
    if y.size < 2 or not np.isfinite(y).all():
        raise ValueError(f"wave: expected finite audio of at least two samples, got {y.size}")
    span = finite_float(span, "span", low=0.0, low_open=True)
    diff = np.abs(np.diff(y))
    n_fft, hop = max(16, int(round(0.032 * sample_rate))), max(1, int(round(0.008 * sample_rate)))
    frames = 1 + max(0, (y.size - n_fft) // hop)
    idx = np.arange(n_fft)[None] + hop * np.arange(frames)[:, None]
    padded = np.pad(y, (0, max(0, idx.max() + 1 - y.size)))
    mag = np.abs(np.fft.rfft(padded[idx] * np.hanning(n_fft), axis=1))
    flux = np.concatenate([[0.0], np.maximum(mag[1:] - mag[:-1], 0.0).sum(axis=1)])
    flux = flux / max(float(mag.sum(axis=1).mean()), 1e-12)
    centres = (np.arange(frames) * hop + n_fft / 2) / sample_rate  # seconds

    def jump_in(a: float, b: float) -> float:
        i0, i1 = max(0, int(a * sample_rate)), min(diff.size, int(np.ceil(b * sample_rate)))
        return float(diff[i0:i1].max()) if i1 > i0 else 0.0

    def flux_in(a: float, b: float) -> float:
        sel = (centres >= a) & (centres <= b)
        return float(flux[sel].max()) if sel.any() else 0.0

    bounds = [float(b) for b in boundaries]
    duration = y.size / sample_rate
    b_jump = [jump_in(b - span, b + span) for b in bounds]
    b_flux = [flux_in(b - span, b + span) for b in bounds]
    i_jump, i_flux = [], []
    at = span
    while at + 2 * span <= duration - span:
        a, b = at, at + 2 * span
        if all(b <= c - span or a >= c + span for c in bounds):
            i_jump.append(jump_in(a, b))
            i_flux.append(flux_in(a, b))
        at += 2 * span
    return SeamReport(b_jump, b_flux, i_jump, i_flux)
