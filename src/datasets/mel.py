"""The AudioLDM mel front end: 16 kHz, n_fft 1024, hop 160, win 1024, 64 mels, 0-8000 Hz, natural log."""

from __future__ import annotations

from dataclasses import dataclass

import librosa
import numpy as np
import torch

from ..dsp import mel_filterbank

__all__ = ["MelFrontEnd"]


@dataclass(frozen=True)
class MelFrontEnd:
    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5

    def frames(self, seconds: float) -> int:
        """Mel frames for ``seconds`` of audio (10.24 s -> 1024)."""
        return int(round(seconds * self.sample_rate / self.hop_length))

    def mel_basis(self) -> np.ndarray:
        # librosa.filters.mel's numbers, without importing librosa's numba-compiled core (melfusion.dsp)
        return mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """``(samples,)`` float waveform -> ``(frames, n_mels)`` log-mel magnitude (NaN/inf input: ValueError)."""
        waveform = np.asarray(waveform, dtype=np.float32)
        if not np.isfinite(waveform).all():
            raise ValueError("waveform: holds NaN or infinite samples; the mel spectrogram would not be finite")
        spec = np.abs(librosa.stft(waveform, n_fft=self.n_fft,
                                   hop_length=self.hop_length, win_length=self.win_length, center=True))
        mel = self.mel_basis() @ spec
        return np.log(np.maximum(mel, self.log_floor)).T.astype(np.float32)

    def batch(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``(batch, samples)`` float tensor -> ``(batch, frames, n_mels)`` log-mel, on the input's device.

        The same numbers as :meth:`__call__` (librosa's centred, zero-padded
        STFT with a periodic Hann window), computed with ``torch.stft`` so a
        training step can run it on the GPU.
        """
        if waveforms.ndim != 2:
            raise ValueError(f"waveforms: expected (batch, samples), got {tuple(waveforms.shape)}")
        x = waveforms.float()
        window = torch.hann_window(self.win_length, periodic=True, device=x.device)
        spec = torch.stft(x, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=window, center=True, pad_mode="constant", return_complex=True).abs()
        basis = torch.from_numpy(self.mel_basis()).to(x.device)
        mel = torch.einsum("mf,bft->btm", basis, spec)
        return torch.log(mel.clamp_min(self.log_floor))
