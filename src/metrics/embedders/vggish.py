"""VGGish (Hershey et al. 2017), the embedding behind the Frechet Audio Distance (Kilgour et al. 2019).

Front end (16 kHz mono): 25 ms periodic-Hann frames every 10 ms, a 512-point
FFT magnitude, 64 HTK-mel bands from 125 to 7500 Hz (triangles in the mel
domain, DC bin dropped), ``log(mel + 0.01)``; the log-mel frames are cut
into non-overlapping 96 x 64 examples (0.96 s), each giving one 128-d
embedding. Network: VGG-style convolutions 64 -> pool -> 128 -> pool ->
256, 256 -> pool -> 512, 512 -> pool, then fully connected 4096, 4096, 128
(72.1M parameters). Before flattening, the ``(N, 512, 6, 4)`` maps are put in
TensorFlow's ``(N, 6, 4, 512)`` order, so weights converted from the
original TensorFlow model (``harritaylor/torchvggish``'s
``vggish-10086976.pth``: keys ``features.{0,3,6,8,11,13}.*`` and
``embeddings.{0,2,4}.*``) load unchanged.

Two settings change the numbers and are part of the embedder's identity:

- ``final_relu`` (default False): TensorFlow's VGGish has no activation on the
  128-d layer; torchvggish adds a ReLU there. The FAD tools in use
  (``frechet_audio_distance`` with ``use_activation=False``, hence
  audioldm_eval) drop it, as here by default.
- ``postprocess`` (default False): the released PCA whitening + 8-bit
  quantisation (``vggish_pca_params``). FAD is usually computed without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import AudioEmbedder, check_waveform, read_checkpoint, resolve_weights_file

__all__ = ["VGGISH_SAMPLE_RATE", "VGGish", "VGGishEmbedder", "vggish_log_mel", "vggish_examples"]

VGGISH_SAMPLE_RATE = 16_000
_WINDOW, _HOP, _FFT = 400, 160, 512  # 25 ms, 10 ms at 16 kHz; FFT size: next power of two
_MEL_BANDS, _MEL_LOW, _MEL_HIGH, _LOG_OFFSET = 64, 125.0, 7500.0, 0.01
EXAMPLE_FRAMES = 96  # 0.96 s of 10 ms frames, hop = window (no overlap)
_WEIGHT_FILES = ("vggish.safetensors", "model.safetensors", "vggish-10086976.pth", "vggish.pth")
_PCA_FILES = ("vggish_pca_params.safetensors", "vggish_pca_params-970ea276.pth", "vggish_pca_params.pth")


def _hz_to_mel_htk(hz: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_matrix() -> np.ndarray:
    """``(FFT/2 + 1, 64)`` weights: HTK-mel triangles computed in the mel domain, zero at the DC bin."""
    bins_mel = _hz_to_mel_htk(np.linspace(0.0, VGGISH_SAMPLE_RATE / 2, _FFT // 2 + 1))
    edges = np.linspace(_hz_to_mel_htk(_MEL_LOW), _hz_to_mel_htk(_MEL_HIGH), _MEL_BANDS + 2)
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - left) / (center - left)
    falling = (right - bins_mel[:, None]) / (right - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


_MEL = _mel_matrix()
_HANN = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_WINDOW) / _WINDOW)  # periodic Hann


def _frames(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    count = 1 + (x.shape[0] - length) // hop
    if count < 1:
        return np.zeros((0, length) + x.shape[1:], dtype=x.dtype)
    idx = np.arange(length)[None, :] + hop * np.arange(count)[:, None]
    return x[idx]


def vggish_log_mel(waveform: np.ndarray) -> np.ndarray:
    """``(frames, 64)`` log-mel features of a 16 kHz mono waveform (no padding: frames fit inside it)."""
    x = check_waveform(waveform).astype(np.float64)
    count = max(0, 1 + (x.size - _WINDOW) // _HOP)
    out = np.empty((count, _MEL_BANDS))
    block = 8192  # frames per block: long files never materialise all frames at once
    for start in range(0, count, block):
        stop = min(count, start + block)
        frames = _frames(x[start * _HOP:(stop - 1) * _HOP + _WINDOW], _WINDOW, _HOP)
        magnitude = np.abs(np.fft.rfft(frames * _HANN, n=_FFT, axis=1))
        out[start:stop] = np.log(magnitude @ _MEL + _LOG_OFFSET)
    return out


def vggish_examples(waveform: np.ndarray) -> np.ndarray:
    """``(examples, 96, 64)`` float32: the log-mel cut into non-overlapping 0.96 s examples."""
    return _frames(vggish_log_mel(waveform), EXAMPLE_FRAMES, EXAMPLE_FRAMES).astype(np.float32)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


class VGGish(nn.Module):
    """The VGGish network on ``(batch, 1, 96, 64)`` log-mel examples -> ``(batch, embedding_dim)``.

    ``channels`` are the widths of the four convolution stages (the last two
    stages have two convolutions each); tiny values give fast test models
    with the same key layout as the published weights.
    """

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 512), hidden: int = 4096,
                 embedding_dim: int = 128, final_relu: bool = False):
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in channels)
        pool = lambda: nn.MaxPool2d(2, 2)  # noqa: E731
        self.features = nn.Sequential(
            _conv(1, c1), nn.ReLU(), pool(),
            _conv(c1, c2), nn.ReLU(), pool(),
            _conv(c2, c3), nn.ReLU(), _conv(c3, c3), nn.ReLU(), pool(),
            _conv(c3, c4), nn.ReLU(), _conv(c4, c4), nn.ReLU(), pool(),
        )
        grid = (EXAMPLE_FRAMES // 16) * (_MEL_BANDS // 16)  # 6 x 4 after four 2x2 pools
        self.embeddings = nn.Sequential(
            nn.Linear(grid * c4, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, embedding_dim), nn.ReLU(),
        )
        self.channels = (c1, c2, c3, c4)
        self.final_relu = bool(final_relu)

    @classmethod
    def shapes_from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The ``channels``, ``hidden`` and ``embedding_dim`` a state dict was saved with."""
        try:
            return {
                "channels": tuple(int(state[f"features.{i}.weight"].shape[0]) for i in (0, 3, 6, 11)),
                "hidden": int(state["embeddings.0.weight"].shape[0]),
                "embedding_dim": int(state["embeddings.4.weight"].shape[0]),
            }
        except KeyError as exc:
            raise ValueError(f"vggish: the weights have no {exc.args[0]!r}; expected torchvggish's keys "
                             "features.{0,3,6,8,11,13}.* and embeddings.{0,2,4}.*") from None

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        x = self.features(examples)  # (batch, c4, 6, 4)
        x = x.permute(0, 2, 3, 1).flatten(1)  # TensorFlow's (batch, 6, 4, c4) order
        layers = self.embeddings if self.final_relu else self.embeddings[:-1]
        return layers(x)


def _load_pca(state: Mapping[str, torch.Tensor], dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    for matrix_key, means_key in (("pca_eigen_vectors", "pca_means"), ("pproc._pca_matrix", "pproc._pca_means")):
        if matrix_key in state and means_key in state:
            matrix = state[matrix_key].double().numpy()
            means = state[means_key].double().numpy().reshape(-1)
            if matrix.shape != (dim, dim) or means.shape != (dim,):
                raise ValueError(f"vggish: PCA params of shapes {matrix.shape} and {means.shape} do not fit a "
                                 f"{dim}-d embedding")
            return matrix, means
    return None


class VGGishEmbedder(AudioEmbedder):
    """Frame-level VGGish embeddings: ``embed(waveform at 16 kHz) -> (examples, 128)`` float32."""

    name = "vggish"
    sample_rate = VGGISH_SAMPLE_RATE
    outputs = ("embedding",)

    def __init__(self, model: VGGish, *, postprocess: bool = False, pca: tuple[np.ndarray, np.ndarray] | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64, source: str | None = None):
        if postprocess and pca is None:
            raise ValueError("postprocess: the PCA postprocessing needs PCA params (pass pca_params=PATH, "
                             "torchvggish's vggish_pca_params-970ea276.pth)")
        self.model = model.eval().requires_grad_(False).to(device)
        self.postprocess = bool(postprocess)
        self.pca = pca
        self.batch_size = int(batch_size)
        self.source = source

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, pca_params: str | os.PathLike | None = None,
                        postprocess: bool = False, final_relu: bool = False, device: str | torch.device = "cpu",
                        **kwargs: Any) -> VGGishEmbedder:
        """Load VGGish weights from a ``.pth`` (torchvggish's state dict) or ``.safetensors`` file.

        ``source`` is a file, a folder holding one of the usual file names, or a
        hub repo id (``owner/repo`` or ``owner/repo:file``). ``pca_params`` is
        the file with ``pca_eigen_vectors`` and ``pca_means`` (only used with
        ``postprocess=True``; they may also be stored in the weights file).
        """
        path = resolve_weights_file(source, _WEIGHT_FILES, "vggish")
        state = read_checkpoint(path, "vggish")
        model = VGGish(**VGGish.shapes_from_state_dict(state), final_relu=final_relu)
        weights = {k: v for k, v in state.items() if k.startswith(("features.", "embeddings."))}
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"vggish: the weights in {str(path)!r} do not fit VGGish ({exc})") from None
        pca = _load_pca(state, model.embeddings[4].out_features)
        if pca_params is not None:
            pca_path = resolve_weights_file(pca_params, _PCA_FILES, "vggish pca_params")
            pca = _load_pca(read_checkpoint(pca_path, "vggish pca_params"), model.embeddings[4].out_features)
            if pca is None:
                raise ValueError(f"pca_params: {str(pca_path)!r} has no 'pca_eigen_vectors' and 'pca_means'")
        return cls(model, postprocess=postprocess, pca=pca, device=device, source=str(path), **kwargs)

    def weights_module(self) -> nn.Module:
        return self.model

    def settings(self) -> dict[str, Any]:
        pca = None
        if self.postprocess and self.pca is not None:
            import hashlib

            pca = hashlib.sha256(self.pca[0].tobytes() + self.pca[1].tobytes()).hexdigest()
        return {"final_relu": self.model.final_relu, "postprocess": self.postprocess, "pca": pca}

    def _postprocess(self, emb: np.ndarray) -> np.ndarray:
        matrix, means = self.pca
        whitened = (emb.astype(np.float64) - means) @ matrix.T
        # 8-bit quantisation of [-2, 2], truncating as the released postprocessor's uint8 cast does
        quantised = np.floor((np.clip(whitened, -2.0, 2.0) + 2.0) * (255.0 / 4.0))
        return quantised.astype(np.float32)

    @torch.no_grad()
    def embed_outputs(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        examples = vggish_examples(waveform)
        if examples.shape[0] == 0:
            raise ValueError(f"waveform: {np.asarray(waveform).size} samples at 16 kHz is shorter than one VGGish "
                             "example (0.975 s)")
        out = []
        for start in range(0, examples.shape[0], self.batch_size):
            batch = torch.from_numpy(examples[start:start + self.batch_size])[:, None].to(self.device)
            out.append(self.model(batch).float().cpu().numpy())
        emb = np.concatenate(out, axis=0)
        if self.postprocess:
            emb = self._postprocess(emb)
        return {"embedding": emb}
