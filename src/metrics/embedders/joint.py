"""CLAP (audio-text) and CLIP (image-text) embedders on transformers' ``ClapModel`` and ``CLIPModel``.

Both return L2-normalised embeddings, so a dot product is a cosine
similarity, and expose ``logit_scale`` (``exp`` of the model's learned
temperature: the factor between cosine similarities and the
``logits_per_*`` the models return), which the released IMSM script's
softmaxes see.

CLAP (default ``laion/clap-htsat-unfused``) takes 48 kHz audio and at most
``max_length_s`` (10 s) per forward pass; its feature extractor crops longer
input at a *random* offset. To stay deterministic, longer audio is cut here
into consecutive windows of at most 10 s whose normalised embeddings are
averaged (weighted by their length) and normalised again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import AudioEmbedder, check_waveform

__all__ = ["DEFAULT_CLAP", "DEFAULT_CLIP", "ClapEmbedder", "ClipEmbedder"]

DEFAULT_CLAP = "laion/clap-htsat-unfused"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _check_source(source: str | os.PathLike, what: str) -> str:
    src = str(source)
    if not os.path.exists(src) and not (_HUB_ID.match(src) and ".." not in src):
        raise OSError(f"{what}: no such folder {src!r} (and it is not a hub id)")
    return src


def _load(cls: Any, source: str, what: str, kind: str) -> Any:
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise OSError(f"{what}: could not load the {kind} from {source!r} ({type(exc).__name__}: {exc}). "
                      "Give a local folder written by save_pretrained, or allow hub downloads.") from exc


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose ``pooler_output`` holds the projected features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check_texts(texts: Any, name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name}: expected a non-empty list of strings")
    return texts


def _small_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The scalar settings of a processor config (large arrays such as mel filters left out)."""
    return {k: v for k, v in config.items() if not isinstance(v, (list, tuple, np.ndarray)) or len(v) <= 16}


class _JointEmbedder(AudioEmbedder):
    model: Any
    tokenizer: Any

    def weights_module(self) -> torch.nn.Module:
        return self.model

    def _check_tokenizer(self, what: str) -> None:
        if len(self.tokenizer) == 0:
            raise OSError(f"{what}: the tokenizer of {self.source!r} loaded with an empty vocabulary")

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(n, d)`` unit-norm text embeddings (captions longer than the model's context are truncated)."""
        texts = _check_texts(texts)
        out = []
        limit = self._max_text_tokens()
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=limit,
                                   return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            out.append(F.normalize(_pooled(self.model.get_text_features(**batch)).float(), dim=-1).cpu())
        return torch.cat(out).numpy()

    def _max_text_tokens(self) -> int:
        cfg = self.model.config.text_config
        longest = int(cfg.max_position_embeddings)
        if getattr(cfg, "model_type", "") in ("clap_text_model", "roberta"):
            longest -= int(getattr(cfg, "pad_token_id", 1) or 0) + 1  # RoBERTa offsets its positions
        return min(longest, int(getattr(self.tokenizer, "model_max_length", longest) or longest))


class ClapEmbedder(_JointEmbedder):
    """CLAP audio (``embed``: ``(1, d)`` per clip) and text (``embed_text``: ``(n, d)``) embeddings."""

    name = "clap"
    outputs = ("embedding",)

    def __init__(self, model: Any, feature_extractor: Any, tokenizer: Any, *, device: str | torch.device = "cpu",
                 source: str | None = None):
        self.model = model.eval().requires_grad_(False).to(device)
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.source = source
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.max_samples = int(getattr(feature_extractor, "nb_max_samples", 10 * self.sample_rate))
        self._check_tokenizer("clap")

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = DEFAULT_CLAP, *, device: str | torch.device = "cpu",
                        tokenizer: Any = None) -> ClapEmbedder:
        """``ClapModel`` and ``ClapProcessor`` from a hub id or a ``save_pretrained`` folder (``tokenizer`` overrides)."""
        from transformers import ClapModel, ClapProcessor

        src = _check_source(source, "clap")
        model = _load(ClapModel, src, "clap", "model")
        processor = _load(ClapProcessor, src, "clap", "processor")
        return cls(model, processor.feature_extractor, tokenizer or processor.tokenizer, device=device, source=src)

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale_a)``: ``logits_per_audio = logit_scale * cosine``."""
        return float(self.model.logit_scale_a.exp())

    def settings(self) -> dict[str, Any]:
        return {"feature_extractor": _small_settings(self.feature_extractor.to_dict()),
                "windows": "consecutive, length-weighted mean"}

    @torch.no_grad()
    def embed_outputs(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        x = check_waveform(waveform)
        windows = [x[i:i + self.max_samples] for i in range(0, x.size, self.max_samples)]
        feats = self.feature_extractor(windows, sampling_rate=self.sample_rate, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in feats.items() if k in ("input_features", "is_longer")}
        emb = F.normalize(_pooled(self.model.get_audio_features(**inputs)).float(), dim=-1).cpu()
        weights = torch.tensor([w.size for w in windows], dtype=torch.float32)[:, None]
        pooled = F.normalize((emb * weights).sum(0, keepdim=True), dim=-1)
        return {"embedding": pooled.numpy()}


class ClipEmbedder(_JointEmbedder):
    """CLIP image (``embed_images``) and text (``embed_text``) embeddings, both ``(n, d)`` unit-norm."""

    name = "clip"
    sample_rate = 0  # not an audio embedder
    outputs = ("embedding",)

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, *, device: str | torch.device = "cpu",
                 source: str | None = None):
        self.model = model.eval().requires_grad_(False).to(device)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.source = source
        self._check_tokenizer("clip")

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = DEFAULT_CLIP, *, device: str | torch.device = "cpu",
                        tokenizer: Any = None) -> ClipEmbedder:
        """``CLIPModel`` and ``CLIPProcessor`` from a hub id or a ``save_pretrained`` folder."""
        from transformers import CLIPModel, CLIPProcessor

        src = _check_source(source, "clip")
        model = _load(CLIPModel, src, "clip", "model")
        processor = _load(CLIPProcessor, src, "clip", "processor")
        return cls(model, processor.image_processor, tokenizer or processor.tokenizer, device=device, source=src)

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)``: ``logits_per_image = logit_scale * cosine`` (100 for the released models)."""
        return float(self.model.logit_scale.exp())

    def settings(self) -> dict[str, Any]:
        return {"image_processor": _small_settings(self.image_processor.to_dict())}

    def embed_outputs(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        raise TypeError("clip embeds images and texts, not audio: use embed_images / embed_text")

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """``(n, d)`` unit-norm embeddings of RGB PIL images (or image paths)."""
        from ...images import open_image

        images = [open_image(im, "image") if isinstance(im, (str, os.PathLike)) else im for im in images]
        if not images:
            raise ValueError("images: expected at least one image")
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.image_processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device))
            out.append(F.normalize(_pooled(feats).float(), dim=-1).cpu())
        return torch.cat(out).numpy()
