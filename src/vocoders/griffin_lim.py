"""Griffin-Lim: phase reconstruction from the log-mel spectrogram (no weights needed)."""

from __future__ import annotations

import numpy as np
import torch

from ..datasets.mel import MelFrontEnd
from ..dsp import griffin_lim
from ..interfaces import Vocoder
from ..registry import register

__all__ = ["GriffinLimVocoder"]


@register("vocoder", "griffin_lim")
class GriffinLimVocoder(Vocoder):
    """Inverts AudioLDM-style log-mel spectrograms by Griffin-Lim (``melfusion.dsp.griffin_lim``, equal to
    ``librosa.griffinlim`` with ``random_state=0``)."""

    def __init__(self, n_iter: int = 32, sample_rate: int = 16_000, hop_length: int = 160, n_mels: int = 64,
                 max_log_mel: float = 5.0, weights: bool = True, device=None, dtype=None):
        # weights/device/dtype: the build arguments shared by all parts; Griffin-Lim has no weights
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"n_iter: expected a positive int, got {n_iter}")
        self.front_end = MelFrontEnd(sample_rate=sample_rate, hop_length=hop_length, n_mels=n_mels)
        self.sample_rate = sample_rate
        self.n_iter = n_iter
        self.max_log_mel = max_log_mel
        self._inverse_basis = np.linalg.pinv(self.front_end.mel_basis())

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        mel = torch.as_tensor(mel)
        if mel.ndim == 4:  # (batch, 1, frames, mels)
            mel = mel[:, 0]
        if mel.ndim != 3 or mel.shape[-1] != self.front_end.n_mels:
            raise ValueError(f"mel: expected (batch, frames, {self.front_end.n_mels}), got {tuple(mel.shape)}")
        fe = self.front_end
        out = []
        for m in mel.detach().float().cpu().numpy():
            mel_mag = np.exp(np.clip(m, np.log(fe.log_floor), self.max_log_mel)).T  # (mels, frames)
            # linear magnitude by the mel basis' pseudo-inverse (fast; no NNLS), then phase by Griffin-Lim
            linear = np.maximum(self._inverse_basis @ mel_mag, 0.0)
            wav = griffin_lim(linear, self.n_iter, fe.n_fft, fe.hop_length, fe.win_length,
                              length=(m.shape[0] - 1) * fe.hop_length, seed=0)
            wav = np.pad(wav, (0, fe.hop_length))  # n frames <-> n * hop samples
            out.append(wav.astype(np.float32))
        return torch.from_numpy(np.stack(out))
