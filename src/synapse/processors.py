"""Attention processors that expose an attention layer's keys and values.

:class:`KVProcessor` computes attention the way diffusers' default
``AttnProcessor2_0`` does (same projections, norms, masks and scaled
dot-product attention) but calls :meth:`KVProcessor.transform` on the keys and
values, shaped ``(batch, heads, tokens, head_dim)``, between their projection
and the attention itself. Two subclasses use that hook:

- :class:`CaptureProcessor` records them (the image side);
- :class:`InjectProcessor` mixes image keys/values into them (the music side).

Both are ``nn.Module`` so ``unet.to(...)`` moves them, but they register no
parameters inside the UNet: the mixer and the aligners live in one place (the
synapse), so ``unet.state_dict()`` is the same with or without them and the
music UNet still saves and loads as a stock diffusers model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

__all__ = ["KVProcessor", "CaptureProcessor", "InjectProcessor", "SynapseState", "SynapseHook", "CaptureStore"]


class _Ref:
    """Holds an object without registering it as a submodule."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj


class KVProcessor(nn.Module):
    """``AttnProcessor2_0``-equivalent attention with a hook on the keys and values."""

    def __init__(self, name: str, original: Any = None):
        super().__init__()
        self.name = name
        self._original = _Ref(original)

    @property
    def original(self) -> Any:
        """The processor this one replaced (restored by the install handle's ``remove()``)."""
        return self._original.obj

    def transform(self, attn, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return key, value

    def forward(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            _, _, height, width = hidden_states.shape
            hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
        batch = hidden_states.shape[0]

        context_len = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        heads = attn.heads
        query = rearrange(attn.to_q(hidden_states), "b n (h d) -> b h n d", h=heads)
        key = rearrange(attn.to_k(context), "b n (h d) -> b h n d", h=heads)
        value = rearrange(attn.to_v(context), "b n (h d) -> b h n d", h=heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        key, value = self.transform(attn, key, value)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = rearrange(out, "b h n d -> b n (h d)").to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = rearrange(out, "b (h w) c -> b c h w", h=height, w=width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CaptureStore(dict):
    """``layer name -> (keys, values)``, filled by :class:`CaptureProcessor` on each forward pass."""


class CaptureProcessor(KVProcessor):
    """Records the layer's keys and values, ``(batch, heads, tokens, head_dim)``, into a shared store."""

    def __init__(self, name: str, store: CaptureStore, original: Any = None, detach: bool = True):
        super().__init__(name, original)
        self._store = _Ref(store)
        self.detach = detach

    def transform(self, attn, key, value):
        record = (key.detach(), value.detach()) if self.detach else (key, value)
        self._store.obj[self.name] = record
        return key, value


@dataclass
class SynapseState:
    """What the synapse hook reads on a forward pass; set through the install handle.

    ``features`` maps a music layer name to the image ``(keys, values)``, each
    ``(batch_img, heads, tokens, head_dim)``; the music batch must be a whole
    multiple of ``batch_img`` (the image batch is tiled, as for guidance
    branches concatenated along the batch). ``image_rows``, a ``(batch,)``
    bool tensor, says which music rows receive the image (others, e.g. the
    unconditional guidance branch, keep their own keys and values).
    ``grids`` gives a music layer's token grid where aligners need one.
    """

    features: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    timestep: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)


class SynapseHook:
    """The synapse as a :class:`melfusion.interfaces.KVHook`: ``hook(layer, K, V) -> (K', V')``.

    ``K' = mixer(i, K, image_K)`` (and the same for V) for the ``i``-th installed layer, on the rows
    ``state.image_rows`` selects; with no features set for ``layer`` it returns ``K, V`` themselves, so an
    installed synapse without an image is an exact no-op. Any denoiser calls it from its attention layers
    (diffusers models through :class:`InjectProcessor`; a plain-torch model directly).
    """

    def __init__(self, mixer: nn.Module, layers: list[str], aligners: list[nn.Module | None] | None = None,
                 state: SynapseState | None = None):
        self.mixer = mixer
        self.layers = list(layers)
        self.index = {name: i for i, name in enumerate(self.layers)}
        self.aligners = list(aligners) if aligners is not None else [None] * len(self.layers)
        self.state = state if state is not None else SynapseState()

    def active(self, layer: str) -> bool:
        features = self.state.features
        return bool(features) and layer in features

    def set_features(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                     timestep: torch.Tensor | None = None, image_rows: torch.Tensor | None = None) -> None:
        """Image ``(keys, values)`` per layer name for the next forward passes (None: no image)."""
        if features is not None:
            unknown = sorted(set(features) - set(self.layers))
            if unknown:
                raise ValueError(f"features: no synapse is installed on {unknown}; installed layers: {self.layers}")
        self.state.features = features
        self.state.timestep = timestep
        self.state.image_rows = image_rows

    def _prepare(self, layer: str, image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        from .aligners import apply_aligner

        aligner = self.aligners[self.index[layer]]
        if aligner is not None:
            image = apply_aligner(aligner, image, like.shape[2], self.state.grids.get(layer))
        if image.shape[1:] != like.shape[1:]:
            raise ValueError(
                f"synapse layer {layer!r}: image features {tuple(image.shape)} do not match the music "
                f"keys {tuple(like.shape)} (batch, heads, tokens, head_dim); configure an aligner"
            )
        batch_img, batch = image.shape[0], like.shape[0]
        if batch_img != batch:
            if batch % batch_img:
                raise ValueError(
                    f"synapse layer {layer!r}: music batch {batch} is not a multiple of image batch {batch_img}"
                )
            image = image.repeat(batch // batch_img, 1, 1, 1)
        return image.to(device=like.device, dtype=like.dtype)

    def __call__(self, layer: str, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if not self.active(layer) or layer not in self.index:
            return key, value
        index = self.index[layer]
        image_k, image_v = state.features[layer]
        image_k, image_v = self._prepare(layer, image_k, key), self._prepare(layer, image_v, value)
        mixed_k = self.mixer(index, key, image_k, state.timestep)
        mixed_v = self.mixer(index, value, image_v, state.timestep)
        rows = state.image_rows
        if rows is not None:
            rows = rows.to(device=key.device, dtype=torch.bool).view(-1, 1, 1, 1)
            mixed_k = torch.where(rows, mixed_k, key)
            mixed_v = torch.where(rows, mixed_v, value)
        return mixed_k, mixed_v


class InjectProcessor(KVProcessor):
    """Calls the synapse hook on this diffusers attention layer's keys/values: ``K <- mixer(layer, K, K_img)``.

    With no features in the state (or none for this layer) it runs the
    original processor unchanged, so an installed synapse without an image is
    an exact no-op.
    """

    def __init__(self, name: str, hook: SynapseHook, original: Any = None):
        super().__init__(name, original)
        self._hook = _Ref(hook)

    @property
    def hook(self) -> SynapseHook:
        return self._hook.obj

    @property
    def index(self) -> int:
        return self.hook.index[self.name]  # (a SynapseHook's layer index)

    @property
    def mixer(self) -> nn.Module:
        return self.hook.mixer

    @property
    def aligner(self) -> nn.Module | None:
        return self.hook.aligners[self.index]

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        hook = self.hook
        idle = isinstance(hook, SynapseHook) and not hook.active(self.name)
        if idle and self.original is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)

    def transform(self, attn, key, value):
        return self.hook(self.name, key, value)
