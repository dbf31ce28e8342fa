"""Stable Audio Open: its diffusion transformer (a diffusers ``StableAudioDiTModel``) as a music denoiser, and
its Oobleck autoencoder as a waveform codec.

The denoiser runs on ``(batch, 64, frames)`` latents of the Oobleck VAE (one frame per 2048 samples at
44.1 kHz) and is conditioned on T5 token embeddings plus the clip's ``(seconds_start, seconds_total)``,
which ``StableAudioProjectionModel``'s number conditioners turn into two extra cross-attention tokens and a
global token prepended to the music sequence. :meth:`StableAudioDenoiser.forward` feeds the transformer the
tensors ``diffusers.StableAudioPipeline`` feeds it.

The synapse is installed by :class:`StableAudioKVProcessor`, an attention processor that computes what
diffusers' ``StableAudioAttnProcessor2_0`` computes and calls the synapse's hook on the keys and values
right after their projection, while they still have the layer's key/value heads (grouped-query attention:
12 key/value heads for 24 query heads in Stable Audio Open). In self-attention (``attn1``) the hook sees the
keys before the rotary embedding, which is applied to whatever it returns.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderOobleck, StableAudioDiTModel
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
from torch import nn

from ..interfaces import KVHook, LatentCodec, LayerInfo, MusicDenoiser, NoiseSchedule
from ..registry import register
from ..synapse.install import ProcessorSwap
from .loading import build_model, load_diffusers_folder, resolve_config

__all__ = [
    "StableAudioDenoiser",
    "StableAudioKVProcessor",
    "OobleckCodec",
    "TINY_STABLE_AUDIO_DIT",
    "TINY_PROJECTION",
    "TINY_OOBLECK",
]

#: a tiny Oobleck VAE for tests: 8 latent channels (the encoder emits mean and scale: 2 x 8), hop 8
TINY_OOBLECK: dict[str, Any] = {
    "encoder_hidden_size": 16,
    "downsampling_ratios": [2, 4],
    "channel_multiples": [1, 2],
    "decoder_channels": 8,
    "decoder_input_channels": 8,
    "audio_channels": 2,
    "sampling_rate": 44100,
}
#: a tiny projection model for tests: text width 32 (the tiny T5's d_model), conditioning width 32
TINY_PROJECTION: dict[str, Any] = {
    "text_encoder_dim": 32,
    "conditioning_dim": 32,
    "min_value": 0,
    "max_value": 512,
}
#: a tiny DiT for tests, on the tiny Oobleck's latents and the tiny projection's conditioning
TINY_STABLE_AUDIO_DIT: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 8,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "num_key_value_attention_heads": 2,
    "out_channels": 8,
    "cross_attention_dim": 32,
    "time_proj_dim": 16,
    "global_states_input_dim": 64,
    "cross_attention_input_dim": 32,
}

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)(?:\.(attn1|attn2))?$")


# -- the attention processor ---------------------------------------------------------------------------------
class StableAudioKVProcessor:
    """``StableAudioAttnProcessor2_0``'s computation with ``hook(name, key, value)`` between the key/value
    projection and the attention; keys and values reach the hook as ``(batch, kv_heads, tokens, head_dim)``,
    before they are repeated to the query heads. A plain object: it holds no parameters."""

    def __init__(self, name: str, hook: KVHook):
        self.name = name
        self.hook = hook

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_tokens, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)

        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, kv_heads, head_dim).transpose(1, 2)

        key, value = self.hook(self.name, key, value)

        if kv_heads != attn.heads:  # grouped-query attention: each key/value head serves several query heads
            group = attn.heads // kv_heads
            key = torch.repeat_interleave(key, group, dim=1, output_size=key.shape[1] * group)
            value = torch.repeat_interleave(value, group, dim=1, output_size=value.shape[1] * group)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if rotary_emb is not None:  # on the first rot_dim channels of each head, in float32
            q_dtype, k_dtype = query.dtype, key.dtype
            query, key = query.to(torch.float32), key.to(torch.float32)
            query = _rotate(query, rotary_emb)
            if not attn.is_cross_attention:
                key = _rotate(key, rotary_emb)
            query, key = query.to(q_dtype), key.to(k_dtype)

        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _rotate(x: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    n = rotary_emb[0].shape[-1]
    turned = apply_rotary_emb(x[..., :n], rotary_emb, use_real=True, use_real_unbind_dim=-2)
    return torch.cat((turned, x[..., n:]), dim=-1)


# -- the denoiser --------------------------------------------------------------------------------------------
def _projection_spec(transformer: Mapping[str, Any]) -> dict[str, Any]:
    """The projection model that goes with a transformer spec: the ``projection_model`` folder next to a
    pretrained ``transformer`` sub-folder, and a config matching the transformer's."""
    spec: dict[str, Any] = {}
    if transformer.get("pretrained") and transformer.get("subfolder"):
        spec["pretrained"] = transformer["pretrained"]
        spec["subfolder"] = "projection_model"
        if transformer.get("revision"):
            spec["revision"] = transformer["revision"]
    config = transformer.get("config")
    if config == "tiny":
        spec["config"] = "tiny"
    elif config == "stable_audio_dit":
        spec["config"] = "stable_audio_projection"
    elif config:
        width = resolve_config(config, TINY_STABLE_AUDIO_DIT).get("cross_attention_input_dim", 768)
        spec["config"] = {
            "text_encoder_dim": width,
            "conditioning_dim": width,
            "min_value": 0,
            "max_value": 512,
        }
    if not spec:
        raise ValueError(
            "projection: give the projection model's spec (the transformer's 'pretrained' has no "
            "'subfolder', so its 'projection_model' folder cannot be found next to it)"
        )
    return spec


@register("denoiser", "stable_audio_dit")
class StableAudioDenoiser(MusicDenoiser):
    """Stable Audio Open's DiT and its conditioning projection; ``latents`` are ``(batch, C, frames)``.

    ``transformer`` and ``projection`` are model specs (see :mod:`melfusion.backbones.loading`); for Stable
    Audio Open: ``{"pretrained": "stabilityai/stable-audio-open-1.0", "subfolder": "transformer"}`` (the
    projection then defaults to the ``projection_model`` folder of the same repo), or ``{"config":
    "stable_audio_dit"}`` for the architecture alone. The synapse goes on ``layers`` (default: every block's
    ``attention``, ``attn2`` being the cross-attention on text and timing). Trained with an EDM
    (v-prediction) schedule, sampled with the cosine DPM-Solver, as the diffusers pipeline does.
    """

    #: the sub-folders :meth:`save_weights` writes
    weight_folders = ("transformer", "projection_model")

    def __init__(
        self,
        transformer: Mapping[str, Any],
        projection: Mapping[str, Any] | None = None,
        layers: Sequence[str] | None = None,
        attention: str = "attn2",
        prediction_type: str = "v_prediction",
        sigma_min: float = 0.3,
        sigma_max: float = 500.0,
        sigma_data: float = 1.0,
        default_scheduler: str = "cosine_dpm_solver",
        noise_conditioning: str = "atan",
        weights: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if attention not in ("attn1", "attn2"):
            raise ValueError(
                f"attention: expected 'attn1' (self-attention) or 'attn2' (cross-attention), "
                f"got {attention!r}"
            )
        if not isinstance(transformer, Mapping):
            raise ValueError(
                f"transformer: expected a model spec (a mapping), got {type(transformer).__name__}"
            )
        projection = _projection_spec(transformer) if projection is None else projection
        self._schedule = NoiseSchedule.edm(
            prediction_type, sigma_min, sigma_max, sigma_data, "exponential", default_scheduler, noise_conditioning
        )
        self.prediction_type = prediction_type
        meta = device is not None and torch.device(device).type == "meta"
        kwargs = dict(weights=weights, device=device, dtype=dtype)
        self.transformer: StableAudioDiTModel = build_model(
            StableAudioDiTModel, transformer, "denoiser.transformer", tiny=TINY_STABLE_AUDIO_DIT, **kwargs
        )
        self.projection: StableAudioProjectionModel = build_model(
            StableAudioProjectionModel, projection, "denoiser.projection", tiny=TINY_PROJECTION, **kwargs
        ).requires_grad_(False)
        self.mark_published("transformer", transformer, weights and not meta)
        self.mark_published("projection", projection, weights and not meta)
        t, p = self.transformer.config, self.projection.config
        if (
            p.conditioning_dim != t.cross_attention_input_dim
            or 2 * p.conditioning_dim != t.global_states_input_dim
        ):
            raise ValueError(
                f"projection: its conditioning_dim {p.conditioning_dim} does not fit the transformer "
                f"(cross_attention_input_dim {t.cross_attention_input_dim}, global_states_input_dim "
                f"{t.global_states_input_dim} = 2 x conditioning_dim)"
            )
        self.attention = attention
        blocks = len(self.transformer.transformer_blocks)
        names = [f"transformer_blocks.{i}.{attention}" for i in range(blocks)] if layers is None else layers
        self.layer_names = [self._full_name(n) for n in names]
        if len(set(self.layer_names)) != len(self.layer_names):
            raise ValueError(f"layers: duplicate names in {list(names)}")
        self._rotary: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- layers ------------------------------------------------------------------------------
    def _full_name(self, name: str) -> str:
        m = _BLOCK.match(str(name))
        blocks = len(self.transformer.transformer_blocks)
        if m is None or int(m.group(1)) >= blocks:
            raise ValueError(
                f"layers: {name!r} is not an attention layer of this DiT; its layers are "
                f"transformer_blocks.<i>.attn1 / .attn2 for i in 0..{blocks - 1}"
            )
        return name if m.group(2) else f"{name}.{self.attention}"

    def _attention(self, name: str) -> tuple[int, nn.Module]:
        full = self._full_name(name)
        index, which = _BLOCK.match(full).groups()
        return int(index), getattr(self.transformer.transformer_blocks[int(index)], which)

    def _info(self, name: str) -> LayerInfo:
        index, attn = self._attention(name)
        head_dim = attn.to_q.out_features // attn.heads
        blocks = len(self.transformer.transformer_blocks)
        return LayerInfo(
            name=self._full_name(name),
            heads=attn.to_k.out_features // head_dim,
            head_dim=head_dim,
            depth=index / (blocks - 1) if blocks > 1 else 0.0,
        )

    @property
    def layers(self) -> list[LayerInfo]:
        return [self._info(name) for name in self.layer_names]

    def probe_layers(self, names: Sequence[str], latent_shape: Sequence[int]) -> list[LayerInfo]:
        frames = int(latent_shape[-1])
        out = []
        for name in names:
            info = self._info(name)
            _, attn = self._attention(name)
            tokens = None if attn.is_cross_attention else frames + 1  # + the prepended global token
            out.append(LayerInfo(info.name, info.heads, info.head_dim, tokens, None, info.depth))
        return out

    def install_synapse(self, hook: KVHook, layers: Sequence[str]) -> ProcessorSwap:
        names = [self._full_name(n) for n in layers]
        if not names:
            raise ValueError("layers: no layers to install the synapse on")
        if len(set(names)) != len(names):
            raise ValueError(f"layers: duplicate names in {list(layers)}")
        swapped = ProcessorSwap()
        try:
            for name in names:
                swapped.set(self._attention(name)[1], StableAudioKVProcessor(name, hook))
        except Exception:
            swapped.remove()
            raise
        return swapped

    # -- schedule and shapes -----------------------------------------------------------------
    @property
    def noise_schedule(self) -> NoiseSchedule:
        return self._schedule

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def latent_shape(self, codec_shape: Sequence[int], round_up: bool = True) -> tuple[int, ...]:
        shape = tuple(int(n) for n in codec_shape)
        if len(shape) != 2 or shape[0] != self.in_channels:
            raise ValueError(
                f"codec: its latent {shape} is not ({self.in_channels}, frames), the shape this DiT "
                "takes; pair it with a codec of as many latent channels"
            )
        if shape[1] < 1:
            raise ValueError(f"seconds: the clip is too short for one latent frame (got {shape[1]} frames)")
        return shape  # the DiT takes any length

    def activation_bytes(self, latent_shape: Sequence[int], rows: int) -> int:
        return int(rows) * (int(latent_shape[-1]) + 1) * int(self.transformer.inner_dim) * 4 * 8

    # -- forward -------------------------------------------------------------------------------
    def _rotary_embedding(self, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (frames, str(device))
        if key not in self._rotary:
            dim = self.transformer.config.attention_head_dim // 2
            cos, sin = get_1d_rotary_pos_embed(dim, frames + 1, use_real=True, repeat_interleave_real=False)
            if len(self._rotary) > 8:
                self._rotary.clear()
            self._rotary[key] = (cos.to(device), sin.to(device))
        return self._rotary[key]

    def condition(
        self, text: torch.Tensor, text_mask: torch.Tensor | None, timing: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, global_hidden_states)`` the transformer gets for this conditioning."""
        batch = text.shape[0]
        proj = self.projection
        text_states = proj(text_hidden_states=text.to(proj.dtype)).text_hidden_states
        if text_mask is not None:
            if text_mask.shape != text.shape[:2]:
                raise ValueError(
                    f"text_mask: expected {tuple(text.shape[:2])} (batch, tokens), "
                    f"got {tuple(text_mask.shape)}"
                )
            text_mask = text_mask.to(text_states.device)
            text_states = text_states * text_mask.unsqueeze(-1).to(text_states.dtype)
        timing = torch.as_tensor(timing).to(device=text_states.device, dtype=torch.float32)
        if timing.ndim == 1:
            timing = timing.unsqueeze(0)
        if timing.ndim != 2 or timing.shape[1] != 2 or timing.shape[0] not in (1, batch):
            raise ValueError(
                f"timing: expected ({batch}, 2) (seconds_start, seconds_total), got {tuple(timing.shape)}"
            )
        timing = timing.expand(batch, 2)
        out = proj(start_seconds=timing[:, 0], end_seconds=timing[:, 1])
        start, end = out.seconds_start_hidden_states, out.seconds_end_hidden_states
        encoder = torch.cat([text_states.to(start.dtype), start, end], dim=1)
        global_states = torch.cat([start, end], dim=2)
        if text_mask is not None:  # the guidance rows: no text and no timing in the cross-attention
            unconditional = ~text_mask.bool().any(dim=1)
            if bool(unconditional.any()):
                encoder = torch.where(unconditional[:, None, None], torch.zeros_like(encoder), encoder)
        return encoder, global_states

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        timing: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if timing is None:
            raise ValueError(
                "timing: Stable Audio is conditioned on each clip's (seconds_start, seconds_total); "
                "pass timing (batch, 2)"
            )
        if latents.ndim != 3:
            raise ValueError(f"latents: expected (batch, channels, frames), got {tuple(latents.shape)}")
        batch, _, frames = latents.shape
        if text.shape[0] != batch:
            raise ValueError(f"text: {text.shape[0]} rows for {batch} latents")
        dtype = self.transformer.dtype
        encoder, global_states = self.condition(text, text_mask, timing)
        t = torch.as_tensor(timestep, device=latents.device)
        if t.ndim == 0:
            t = t.unsqueeze(0)  # as the pipeline passes it
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"timestep: expected a scalar or ({batch},), got {tuple(t.shape)}")
        out = self.transformer(
            latents.to(dtype),
            t,
            encoder_hidden_states=encoder.to(dtype),
            global_hidden_states=global_states.to(dtype),
            rotary_embedding=self._rotary_embedding(frames, latents.device),
            return_dict=False,
        )[0]
        return out.to(latents.dtype)

    # -- weights -------------------------------------------------------------------------------
    def context_tokens(self, text_tokens: int) -> int:
        """The text tokens plus the two timing tokens (seconds_start, seconds_total) of the cross-attention."""
        return int(text_tokens) + 2

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer}

    def stored_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer, "projection": self.projection}

    def save_weights(self, folder) -> str:
        folder = Path(folder)
        self.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        self.projection.save_pretrained(folder / "projection_model", safe_serialization=True)
        return "transformer"

    def load_weights(self, folder) -> None:
        folder = Path(folder)
        for module, sub in ((self.transformer, "transformer"), (self.projection, "projection_model")):
            load_diffusers_folder(module, folder / sub, f"denoiser.{sub}")


# -- the codec -----------------------------------------------------------------------------------------------
@register("codec", "oobleck")
class OobleckCodec(LatentCodec):
    """Stable Audio's ``AutoencoderOobleck`` (``vae/`` of ``stabilityai/stable-audio-open-1.0``), frozen:
    stereo 44.1 kHz waveforms <-> ``(batch, 64, samples / 2048)`` latents (no scaling factor)."""

    output = "waveform"

    def __init__(
        self,
        vae: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        config: str | Mapping[str, Any] | None = None,
        subfolder: str | None = "vae",
        weights: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if vae is not None and (pretrained is not None or config is not None):
            raise ValueError("codec: give either a 'vae' spec or 'pretrained'/'config', not both")
        if vae is None:
            spec = {
                "pretrained": pretrained,
                "config": config,
                "subfolder": subfolder if pretrained else None,
            }
            vae = {k: v for k, v in spec.items() if v is not None}
        meta = device is not None and torch.device(device).type == "meta"
        with warnings.catch_warnings():  # diffusers' Oobleck still uses torch's deprecated weight_norm
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            self.vae: AutoencoderOobleck = build_model(
                AutoencoderOobleck, vae, "codec", weights=weights, device=device, dtype=dtype, tiny=TINY_OOBLECK
            ).requires_grad_(False)
        self.mark_published("vae", vae, weights and not meta)
        self.latent_channels = int(self.vae.config.decoder_input_channels)
        self.downsample = int(self.vae.hop_length)
        self.sample_rate = int(self.vae.config.sampling_rate)
        self.audio_channels = int(self.vae.config.audio_channels)

    def latent_shape(
        self,
        seconds: float,
        sample_rate: int | None = None,
        hop_length: int | None = None,
        n_mels: int | None = None,
    ) -> tuple[int, ...]:
        """``(latent_channels, frames)`` covering ``seconds`` at the codec's own sampling rate (the mel
        settings do not apply to a waveform codec)."""
        if not seconds > 0:
            raise ValueError(f"seconds: expected a positive duration, got {seconds!r}")
        frames = math.ceil(seconds * self.sample_rate / self.downsample - 1e-6)
        return (self.latent_channels, max(1, frames))

    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        audio = torch.as_tensor(audio)
        if audio.ndim == 2:  # (batch, samples): mono
            audio = audio.unsqueeze(1)
        if audio.ndim != 3 or audio.shape[1] not in (1, self.audio_channels):
            raise ValueError(
                f"audio: expected (batch, {self.audio_channels} or 1, samples), got {tuple(audio.shape)}"
            )
        if audio.shape[1] != self.audio_channels:
            audio = audio.repeat(1, self.audio_channels, 1)
        pad = -audio.shape[-1] % self.downsample  # a partial last frame is completed with silence
        if pad:
            audio = F.pad(audio, (0, pad))
        return audio.to(device=self.vae.device, dtype=self.vae.dtype)

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, samples)`` waveform (mono is repeated to the codec's channels) -> the
        posterior's mode ``(batch, latent_channels, ceil(samples / downsample))``."""
        return self.vae.encode(self._audio(audio)).latent_dist.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(batch, latent_channels, frames)`` -> ``(batch, audio_channels, frames * downsample)``."""
        return self.vae.decode(latents.to(device=self.vae.device, dtype=self.vae.dtype)).sample
