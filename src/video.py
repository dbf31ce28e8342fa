"""Video in: a storyboard from a video's scenes, and the video written back with a new soundtrack.

Needs PyAV (``pip install 'melfusion[video]'``), a maintained FFmpeg binding whose wheels bundle FFmpeg.

:func:`read_storyboard` cuts a video into scenes, at scene changes (the colour histograms of consecutive
frames, 16 bins per RGB channel on a 64x36 thumbnail, differ by more than ``threshold`` in total variation,
and the scene so far lasts at least ``min_scene`` seconds) or every ``every`` seconds, and takes each scene's
middle frame as its picture; the scenes' durations add up to the video's, so the music is as long as the video.
:func:`mux` writes a copy of the video (its video stream copied as it is, not re-encoded) with an AAC
soundtrack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checks import finite_float, positive_int

__all__ = ["Scene", "VideoStoryboard", "read_storyboard", "mux", "require_av", "VIDEO_SUFFIXES"]

#: containers :func:`mux` writes, by suffix
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")
_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
_THUMB = (64, 36)


def require_av(name: str = "video"):
    """The ``av`` module, or an ``ImportError`` saying what to install."""
    try:
        import av
    except ImportError:
        raise ImportError(f"{name}: reading and writing video needs PyAV; install it with "
                          "pip install 'melfusion[video]' (or pip install av)") from None
    return av


@dataclass
class Scene:
    """One scene: ``start`` and ``end`` in seconds and its middle frame as a PIL image."""

    start: float
    end: float
    image: Any

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class VideoStoryboard:
    """The scenes of a video; ``images`` and ``durations`` go straight to ``MelFusion.generate``."""

    path: Path
    duration: float
    fps: float
    scenes: list[Scene]

    @property
    def images(self) -> list[Any]:
        return [s.image for s in self.scenes]

    @property
    def durations(self) -> list[float]:
        return [s.duration for s in self.scenes]


def _open(path: Path, name: str):
    av = require_av(name)
    if not path.is_file():
        raise ValueError(f"{name}: no such file {str(path)!r}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ValueError(f"{name}: {str(path)!r} is not a video FFmpeg can read ({' '.join(str(exc).split())[:160]})"
                         ) from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{name}: {str(path)!r} has no video stream")
    return container


def _frames(path: Path, name: str):
    """``(time in seconds, av.VideoFrame)`` of every decodable frame."""
    av = require_av(name)
    container = _open(path, name)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time is None:
                    continue
                yield float(frame.time), frame
        except av.error.FFmpegError as exc:
            raise ValueError(f"{name}: {str(path)!r} is corrupt ({' '.join(str(exc).split())[:160]})") from None
    finally:
        container.close()


def read_storyboard(path: str | os.PathLike, *, every: float | None = None, threshold: float = 0.35,
                    min_scene: float = 1.0, max_scenes: int | None = 32, name: str = "video") -> VideoStoryboard:
    """The scenes of the video at ``path`` (see the module doc); a ``ValueError`` naming ``name`` for a missing,
    unreadable or empty video. ``max_scenes``: the shortest scenes are merged into a neighbour until at most
    that many remain (None: no limit)."""
    path = Path(path)
    if every is not None:
        every = finite_float(every, "every", low=0.0, low_open=True)
    threshold = finite_float(threshold, "threshold", low=0.0, high=1.0)
    min_scene = finite_float(min_scene, "min_scene", low=0.0)
    if max_scenes is not None:
        max_scenes = positive_int(max_scenes, "max_scenes")
    times, cuts, previous = [], [0.0], None
    for t, frame in _frames(path, name):
        times.append(t)
        if every is not None:
            continue
        thumb = frame.to_ndarray(format="rgb24", width=_THUMB[0], height=_THUMB[1])
        hist = np.concatenate([np.bincount(thumb[..., c].reshape(-1) // 16, minlength=16) for c in range(3)])
        hist = hist / max(1, thumb.shape[0] * thumb.shape[1])
        if previous is not None:
            change = 0.5 * float(np.abs(hist - previous).sum()) / 3.0
            if change > threshold and t - cuts[-1] >= min_scene:
                cuts.append(t)
        previous = hist
    if not times:
        raise ValueError(f"{name}: {str(path)!r} has no decodable frames")
    container = _open(path, name)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else (len(times) - 1) / max(times[-1] - times[0], 1e-9) if len(times) > 1 else 25.0
    finally:
        container.close()
    duration = times[-1] + 1.0 / fps
    if every is not None:
        cuts = [float(x) for x in np.arange(0.0, duration - 1e-6, every)]
    bounds = [*cuts, duration]
    spans = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b - a > 1e-6]
    while max_scenes is not None and len(spans) > max_scenes:  # merge the shortest into its shorter neighbour
        k = min(range(len(spans)), key=lambda i: spans[i][1] - spans[i][0])
        j = k - 1 if k == len(spans) - 1 or (k > 0 and spans[k - 1][1] - spans[k - 1][0]
                                              <= spans[k + 1][1] - spans[k + 1][0]) else k + 1
        a, b = min(spans[k][0], spans[j][0]), max(spans[k][1], spans[j][1])
        spans[min(j, k)] = (a, b)
        del spans[max(j, k)]
    middles = [(a + b) / 2 for a, b in spans]
    wanted = [min(range(len(times)), key=lambda i: abs(times[i] - m)) for m in middles]
    pictures: dict[int, Any] = {}
    for i, (_, frame) in enumerate(_frames(path, name)):
        if i in wanted and i not in pictures:
            pictures[i] = frame.to_image()
        if len(pictures) == len(set(wanted)):
            break
    scenes = [Scene(a, b, pictures[w]) for (a, b), w in zip(spans, wanted, strict=True)]
    return VideoStoryboard(path, duration, fps, scenes)


def mux(video: str | os.PathLike, waveform: np.ndarray, sample_rate: int, out: str | os.PathLike, *,
        overwrite: bool = False, name: str = "mux") -> Path:
    """Write ``out``: the video stream of ``video`` copied as it is, with ``waveform`` (``(samples,)`` or
    ``(channels, samples)``, in [-1, 1]) as its only audio stream (AAC). The file is written beside ``out`` and
    renamed onto it; ``out`` may never be ``video`` and, unless ``overwrite``, must not exist."""
    from .files import atomic_path, check_output

    av = require_av(name)
    video, out = Path(video), Path(out)
    out = check_output(out, name, overwrite=overwrite, inputs=[video], suffixes=VIDEO_SUFFIXES)
    wave = np.asarray(waveform, dtype=np.float32)
    wave = wave[None] if wave.ndim == 1 else wave
    if wave.ndim != 2 or wave.shape[0] not in (1, 2) or wave.shape[1] == 0 or not np.isfinite(wave).all():
        raise ValueError(f"waveform: expected finite (samples,) or (channels, samples) audio, got {wave.shape}")
    sample_rate = positive_int(sample_rate, "sample_rate")
    source = _open(video, "--video" if name == "--mux" else "video")
    try:
        with atomic_path(out, overwrite=overwrite) as tmp:
            target = av.open(str(tmp), mode="w", format=_FORMATS[out.suffix.lower()])
            try:
                v_in = source.streams.video[0]
                v_out = target.add_stream_from_template(v_in)
                layout = "mono" if wave.shape[0] == 1 else "stereo"
                a_out = target.add_stream("aac", rate=sample_rate, layout=layout)
                for packet in source.demux(v_in):
                    if packet.dts is None:
                        continue
                    packet.stream = v_out
                    target.mux(packet)
                step, at = 1024, 0
                while at < wave.shape[1]:
                    block = np.ascontiguousarray(np.clip(wave[:, at: at + step], -1.0, 1.0))
                    frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
                    frame.sample_rate = sample_rate
                    frame.pts = at
                    for packet in a_out.encode(frame):
                        target.mux(packet)
                    at += step
                for packet in a_out.encode(None):
                    target.mux(packet)
            finally:
                target.close()
    finally:
        source.close()
    return out
