"""AudioLDM's music denoiser and its CLAP text encoder (``cvssp/audioldm-s-full-v2``).

AudioLDM conditions its UNet differently from Tango: the prompt enters as one
CLAP text embedding through the time embedding (``class_embed_type=
"simple_projection"``, concatenated), and the transformer blocks' ``attn2``
receives no encoder states, so it attends over the music tokens themselves.
For the synapse this means the music layer's keys come from the music token
grid (fixed by the clip length), not from a text of variable length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.nn import functional as F

from ..interfaces import TextEncoder
from ..registry import register
from ..schedules import NoiseSchedule
from .base import UNetDenoiser
from .loading import build_model
from .text import check_texts

__all__ = ["AudioLDMDenoiser", "ClapTextEncoder", "TINY_AUDIOLDM_UNET", "TINY_CLAP", "AUDIOLDM_NOISE_SCHEDULE",
           "TINY_AUDIOLDM_VAE", "TINY_AUDIOLDM_HIFIGAN"]

#: AudioLDM's training noise schedule (``linear_start``/``linear_end`` of the original config)
AUDIOLDM_NOISE_SCHEDULE = dict(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                               num_train_timesteps=1000)

#: a tiny AudioLDM-style UNet: CLAP embedding (32-d) as simple-projection class label, concatenated to the
#: time embedding; attention only at the lowest resolution (a quarter of the input), 4 heads of 12
TINY_AUDIOLDM_UNET = {
    "block_out_channels": [32, 32, 48],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "attention_head_dim": 4,
    "cross_attention_dim": [32, 32, 48],
    "class_embed_type": "simple_projection",
    "projection_class_embeddings_input_dim": 32,
    "class_embeddings_concat": True,
    "norm_num_groups": 8,
    "in_channels": 8,
    "out_channels": 8,
    "sample_size": 32,
}

#: a tiny AudioLDM-style VAE for mels of 32 bins: /2, 8 latent channels
TINY_AUDIOLDM_VAE = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "latent_channels": 8,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 64,
}
#: a tiny HiFi-GAN for 32 mel bins at 16 kHz, upsampling 4 * 4 = 16 samples per frame
TINY_AUDIOLDM_HIFIGAN = {
    "model_in_dim": 32,
    "sampling_rate": 16_000,
    "upsample_initial_channel": 16,
    "upsample_rates": [4, 4],
    "upsample_kernel_sizes": [8, 8],
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3]],
    "normalize_before": False,
}

#: a tiny CLAP text model for the byte tokenizer (384 ids, pad 0, eos 1); 32-d projection
TINY_CLAP = {
    "vocab_size": 384,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 66,
    "type_vocab_size": 1,
    "projection_dim": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@register("denoiser", "audioldm")
class AudioLDMDenoiser(UNetDenoiser):
    """Wraps AudioLDM's UNet; ``latents`` are ``(batch, 8, frames / 4, mels / 4)``.

    ``text`` is the CLAP text encoder's output ``(batch, 1, dim)`` (or
    ``(batch, dim)``); it is the UNet's ``class_labels``. The synapse is
    installed on ``layers`` (default: the decoder transformer layers), on
    their ``attn2``, which in AudioLDM attends over the music tokens.
    """

    attention = "attn2"
    beta_schedule = "scaled_linear"

    def __init__(
        self,
        unet: Mapping[str, Any],
        layers: Sequence[str] | None = None,
        prediction_type: str = "epsilon",
        weights: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.unet: UNet2DConditionModel = build_model(
            UNet2DConditionModel, unet, "denoiser.unet", weights=weights, device=device, dtype=dtype,
            tiny=TINY_AUDIOLDM_UNET,
        )
        self.mark_published("unet", unet, weights)
        if self.unet.config.class_embed_type != "simple_projection":
            raise ValueError(
                f"denoiser.unet: AudioLDM's UNet takes the CLAP embedding as class_embed_type='simple_projection', "
                f"got class_embed_type={self.unet.config.class_embed_type!r}"
            )
        self._setup(layers, prediction_type)

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """AudioLDM's training schedule (betas 0.0015 to 0.0195)."""
        return NoiseSchedule.ddpm(self.prediction_type, **AUDIOLDM_NOISE_SCHEDULE)

    @property
    def text_dim(self) -> int:
        """The CLAP embedding size the UNet expects (512 for AudioLDM)."""
        return self.unet.config.projection_class_embeddings_input_dim

    def forward(self, latents, timestep, text, text_mask=None, timing=None):
        if text.ndim == 3:
            if text.shape[1] != 1:
                raise ValueError(f"text: expected one CLAP embedding per row (batch, 1, dim), got {tuple(text.shape)}")
            text = text[:, 0]
        if text.ndim != 2 or text.shape[-1] != self.text_dim:
            raise ValueError(f"text: expected (batch, 1, {self.text_dim}) CLAP embeddings, got {tuple(text.shape)}")
        labels = text.to(self.unet.dtype)
        return self.unet(latents, timestep, encoder_hidden_states=None, class_labels=labels).sample


@register("text_encoder", "clap")
class ClapTextEncoder(TextEncoder):
    """CLAP's text branch with its projection (``ClapTextModelWithProjection``) and its tokenizer.

    ``text_encoder(texts)`` returns the L2-normalised ``text_embeds`` as
    ``(batch, 1, dim)`` and an all-true ``(batch, 1)`` mask, exactly as
    ``AudioLDMPipeline._encode_prompt`` computes them (prompts padded to the
    tokenizer's maximum length). ``pretrained`` is a hub id or a local folder;
    with ``subfolder`` (``"text_encoder"`` in ``cvssp/audioldm-s-full-v2``)
    the tokenizer is read from ``tokenizer_subfolder`` (default ``"tokenizer"``).
    ``config="tiny"`` builds a tiny random model with a byte tokenizer (offline).
    """

    def __init__(self, pretrained: str | None = None, config: str | dict | None = None,
                 subfolder: str | None = None, tokenizer_subfolder: str | None = None,
                 max_length: int | None = None, weights: bool = True, device: Any = None, dtype: Any = None):
        from transformers import ByT5Tokenizer, ClapTextModelWithProjection

        super().__init__()
        spec = {"pretrained": pretrained, "config": config, "subfolder": subfolder if pretrained else None}
        spec = {k: v for k, v in spec.items() if v is not None}
        self.model = build_model(ClapTextModelWithProjection, spec, "text_encoder", weights=weights,
                                 device=device, dtype=dtype, tiny=TINY_CLAP).requires_grad_(False)
        self.mark_published("model", spec, weights)
        meta = device is not None and torch.device(device).type == "meta"
        if pretrained and weights and not meta:
            from transformers import AutoTokenizer

            where = tokenizer_subfolder if tokenizer_subfolder is not None else ("tokenizer" if subfolder else None)
            kwargs = {"subfolder": where} if where else {}
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
            except (OSError, ValueError) as exc:
                raise OSError(
                    f"text_encoder: could not load the tokenizer from {pretrained!r}"
                    f"{f' (subfolder {where!r})' if where else ''}: {exc}"
                ) from exc
        else:
            self.tokenizer = ByT5Tokenizer()
        if len(self.tokenizer) == 0:
            raise OSError(f"text_encoder: the tokenizer of {pretrained!r} loaded with an empty vocabulary")
        cfg = self.model.config
        # longest input the position embeddings allow (RoBERTa offsets positions by pad_token_id + 1)
        longest = cfg.max_position_embeddings - (cfg.pad_token_id or 0) - 1
        if max_length is None:
            max_length = min(int(self.tokenizer.model_max_length), longest)
        if not 1 <= max_length <= longest:
            raise ValueError(f"max_length: expected 1..{longest} for this model, got {max_length}")
        self.max_length = int(max_length)
        self.tokenizer.model_max_length = self.max_length
        self.dim = cfg.projection_dim

    @torch.no_grad()
    def forward(self, texts):
        texts = check_texts(texts)
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        out = self.model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
        emb = F.normalize(out.text_embeds, dim=-1)[:, None]
        return emb, torch.ones(emb.shape[:2], dtype=torch.bool, device=device)
