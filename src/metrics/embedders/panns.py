"""PANNs CNN14 (Kong et al. 2020): the 2048-d clip embedding behind FD and the 527 AudioSet logits behind KL.

Front end (32 kHz mono): centred STFT (reflect padding), n_fft 1024, hop
320, periodic Hann window; power spectrum -> 64 Slaney-normalised mel bands
from 50 to 14000 Hz (librosa's default mel basis) -> ``10 log10(max(x,
1e-10))``. Then ``bn0`` over the mel axis, six conv blocks (two 3x3
convolutions with batch norm and ReLU, then 2x2 average pooling; 1x1 in the
last) of 64 ... 2048 channels, the mean over mel bins, max + mean over time,
``fc1`` + ReLU (the 2048-d **embedding**) and ``fc_audioset`` (the 527
**logits**; their sigmoid is the clip-wise tagging output). 80.8M parameters.

The published checkpoint (``Cnn14_mAP=0.431.pth``) is a dict whose
``"model"`` entry holds the state dict; its front-end tensors
(``spectrogram_extractor.*``, ``logmel_extractor.*``) are dropped here, the
front end being computed with ``torch.stft`` and ``librosa.filters.mel``.
This is the model and settings audioldm_eval uses at 32 kHz.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import AudioEmbedder, check_waveform, read_checkpoint, resolve_weights_file

__all__ = ["PANNS_SAMPLE_RATE", "Cnn14", "PANNsEmbedder"]

PANNS_SAMPLE_RATE = 32_000
_N_FFT, _HOP, _MELS, _FMIN, _FMAX = 1024, 320, 64, 50.0, 14_000.0
_MIN_SAMPLES = 31 * _HOP
_FRONT_END_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.", "spec_augmenter.")
_WEIGHT_FILES = ("Cnn14_mAP=0.431.pth", "cnn14.safetensors", "model.safetensors", "Cnn14.pth")


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> average pooling."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool) if pool > 1 else x


class Cnn14(nn.Module):
    """CNN14 on ``(batch, samples)`` 32 kHz waveforms -> ``{"embedding": (batch, C), "logits": (batch, classes)}``.

    ``channels`` are the six block widths (``C = channels[-1]``); tiny values
    give fast test models with the published key layout.
    """

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 512, 1024, 2048), classes: int = 527):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 6:
            raise ValueError(f"channels: expected 6 block widths, got {channels}")
        self.bn0 = nn.BatchNorm2d(_MELS)
        widths = [1, *channels]
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(widths[i], widths[i + 1]))
        self.fc1 = nn.Linear(channels[-1], channels[-1])
        self.fc_audioset = nn.Linear(channels[-1], classes)
        import librosa

        mel = librosa.filters.mel(sr=PANNS_SAMPLE_RATE, n_fft=_N_FFT, n_mels=_MELS, fmin=_FMIN, fmax=_FMAX)
        self.register_buffer("mel_basis", torch.from_numpy(mel.T.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(_N_FFT, periodic=True), persistent=False)
        self.channels = tuple(channels)

    @classmethod
    def shapes_from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The ``channels`` and ``classes`` a state dict was saved with."""
        try:
            return {
                "channels": tuple(int(state[f"conv_block{i}.conv1.weight"].shape[0]) for i in range(1, 7)),
                "classes": int(state["fc_audioset.weight"].shape[0]),
            }
        except KeyError as exc:
            raise ValueError(f"panns: the weights have no {exc.args[0]!r}; expected PANNs CNN14 keys "
                             "(conv_block1..6.*, bn0.*, fc1.*, fc_audioset.*)") from None

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, frames, 64)`` log-mel (dB, ref 1, floor 1e-10, no top_db)."""
        spec = torch.stft(waveform, _N_FFT, hop_length=_HOP, win_length=_N_FFT, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)
        power = spec.real**2 + spec.imag**2  # (batch, freq, frames)
        mel = torch.matmul(power.transpose(1, 2), self.mel_basis)
        return (10.0 * torch.log10(torch.clamp(mel, min=1e-10)))[:, None]

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.log_mel(waveform)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # batch norm over the mel bins
        for i in range(1, 7):
            x = getattr(self, f"conv_block{i}")(x, pool=2 if i < 6 else 1)
            x = F.dropout(x, p=0.2, training=self.training)
        x = x.mean(dim=3)  # over mel bins -> (batch, C, time)
        x = x.max(dim=2).values + x.mean(dim=2)
        x = F.dropout(x, p=0.5, training=self.training)
        embedding = F.relu(self.fc1(x))
        logits = self.fc_audioset(F.dropout(embedding, p=0.5, training=self.training))
        return {"embedding": embedding, "logits": logits}


class PANNsEmbedder(AudioEmbedder):
    """Clip-level CNN14 outputs: ``embed_outputs(waveform at 32 kHz)`` -> ``embedding (1, 2048)``, ``logits (1, 527)``."""

    name = "panns"
    sample_rate = PANNS_SAMPLE_RATE
    outputs = ("embedding", "logits")

    def __init__(self, model: Cnn14, *, device: str | torch.device = "cpu", source: str | None = None):
        self.model = model.eval().requires_grad_(False).to(device)
        self.source = source

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, device: str | torch.device = "cpu") -> PANNsEmbedder:
        """Load CNN14 from ``Cnn14_mAP=0.431.pth`` (``{"model": state_dict}``, read with weights_only) or safetensors.

        ``source`` is a file, a folder holding one, or a hub repo id (``owner/repo[:file]``).
        """
        path = resolve_weights_file(source, _WEIGHT_FILES, "panns")
        state = read_checkpoint(path, "panns")
        state = {k: v for k, v in state.items() if not k.startswith(_FRONT_END_PREFIXES)}
        model = Cnn14(**Cnn14.shapes_from_state_dict(state))
        expected = model.state_dict()
        for key, value in expected.items():  # older checkpoints lack the batch-norm step counters
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros_like(value)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"panns: the weights in {str(path)!r} do not fit CNN14 (missing: {missing[:5]}, "
                             f"unexpected: {unexpected[:5]})")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"panns: the weights in {str(path)!r} do not fit CNN14 ({exc})") from None
        return cls(model, device=device, source=str(path))

    def weights_module(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def embed_outputs(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        x = check_waveform(waveform)
        if x.size < _MIN_SAMPLES:  # five 2x2 poolings need at least 32 STFT frames
            raise ValueError(f"waveform: {x.size} samples at 32 kHz is too short for CNN14 "
                             f"(needs {_MIN_SAMPLES}, {_MIN_SAMPLES / PANNS_SAMPLE_RATE:.2f} s)")
        out = self.model(torch.from_numpy(x)[None].to(self.device))
        return {k: v.float().cpu().numpy() for k, v in out.items()}
