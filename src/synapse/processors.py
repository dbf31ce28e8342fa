"""Attention processors that expose an attention layer's keys and values.

:class:`KVProcessor` computes attention the way diffusers' default
``AttnProcessor2_0`` does (same projections, norms, masks and scaled
dot-product attention) but calls :meth:`KVProcessor.transform` on the keys and
values, shaped ``(batch, heads, tokens, head_dim)``, between their projection
and the attention itself. Two more hooks serve the released code's injection
point (:mod:`melfusion.synapse.injection`): :meth:`KVProcessor.transform_context`
on the text context before ``norm_cross`` and the key/value projections, and
:meth:`KVProcessor.transform_output` on the attention's output. Two subclasses
use them:

- :class:`CaptureProcessor` records them (the image side): keys/values, or with
  ``view="output"`` the output (``view="context"``: the text context);
- :class:`InjectProcessor` mixes image features into them (the music side): into
  the keys/values, or with ``view="context"`` into the text context.

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

    def transform_context(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text context ``(batch, tokens, dim)`` -> the inputs of ``to_k`` and ``to_v`` (before ``norm_cross``;
        default: the context itself for both)."""
        return context, context

    def transform_output(self, attn, out: torch.Tensor) -> torch.Tensor:
        """The attention's output ``(batch, tokens, channels)`` after ``to_out`` (before any residual)."""
        return out

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
            key_in = value_in = hidden_states
        else:
            key_in, value_in = self.transform_context(attn, encoder_hidden_states)
            if attn.norm_cross:
                normed = attn.norm_encoder_hidden_states(key_in)
                value_in = normed if value_in is key_in else attn.norm_encoder_hidden_states(value_in)
                key_in = normed

        heads = attn.heads
        query = rearrange(attn.to_q(hidden_states), "b n (h d) -> b h n d", h=heads)
        key = rearrange(attn.to_k(key_in), "b n (h d) -> b h n d", h=heads)
        value = rearrange(attn.to_v(value_in), "b n (h d) -> b h n d", h=heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        key, value = self.transform(attn, key, value)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = rearrange(out, "b h n d -> b n (h d)").to(query.dtype)
        out = self.transform_output(attn, attn.to_out[1](attn.to_out[0](out)))
        if spatial:
            out = rearrange(out, "b (h w) c -> b c h w", h=height, w=width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CaptureStore(dict):
    """``layer name -> (keys, values)``, filled by :class:`CaptureProcessor` on each forward pass."""


def _check_view(view: str | None, allowed: tuple[str | None, ...]) -> str | None:
    if view not in allowed:
        raise ValueError(f"view: expected one of {allowed}, got {view!r}")
    return view


def _one_head(x: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens, channels) -> (batch, 1, tokens, channels)``: a tensor seen as one attention head."""
    return rearrange(x, "b n c -> b 1 n c")


class CaptureProcessor(KVProcessor):
    """Records the layer's keys and values, ``(batch, heads, tokens, head_dim)``, into a shared store.

    ``view="output"`` records the attention's output instead, ``view="context"`` its text context, each as one
    head ``(batch, 1, tokens, channels)`` and stored as the ``(keys, values)`` pair ``(x, x)`` (the same tensor),
    so captures of any view flow through the same feature cache and aligners.
    """

    def __init__(self, name: str, store: CaptureStore, original: Any = None, detach: bool = True,
                 view: str | None = None):
        super().__init__(name, original)
        self._store = _Ref(store)
        self.detach = detach
        self.view = _check_view(view, (None, "output", "context"))

    def _record(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self._store.obj[self.name] = (key.detach(), value.detach()) if self.detach else (key, value)

    def _record_one(self, x: torch.Tensor) -> None:
        one = _one_head(x.detach() if self.detach else x)
        self._store.obj[self.name] = (one, one)

    def transform(self, attn, key, value):
        if self.view is None:
            self._record(key, value)
        return key, value

    def transform_context(self, attn, context):
        if self.view == "context":
            self._record_one(context)
        return context, context

    def transform_output(self, attn, out):
        if self.view == "output":
            self._record_one(out)
        return out


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
    #: the image's strength: each mixed ``K'`` becomes ``lerp(K, K', strength)`` (for the linear mixers the same
    #: as every alpha scaled by it); 1 as trained, 0 text only
    strength: float = 1.0


class SynapseHook:
    """The synapse as a :class:`melfusion.interfaces.KVHook`: ``hook(layer, K, V) -> (K', V')``.

    ``K' = mixer(i, K, image_K)`` (and the same for V) for the ``i``-th installed layer, on the rows
    ``state.image_rows`` selects; with no features set for ``layer`` it returns ``K, V`` themselves, so an
    installed synapse without an image is an exact no-op. Any denoiser calls it from its attention layers
    (diffusers models through :class:`InjectProcessor`; a plain-torch model directly).

    At a ``:context`` injection point (:mod:`melfusion.synapse.injection`) ``K`` and ``V`` are both the text
    context as one head, ``(batch, 1, tokens, width)``, the very same tensor; when the image pair is one tensor
    too, the mix is computed once and returned for both.
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
        shared = value is key and image_v is image_k  # a context injection point: one mix serves both
        image_k = self._prepare(layer, image_k, key)
        image_v = image_k if shared else self._prepare(layer, image_v, value)
        if state.strength == 0.0:  # text only: exactly the keys and values without the picture
            return key, value
        mixed_k = self.mixer(index, key, image_k, state.timestep)
        mixed_v = mixed_k if shared else self.mixer(index, value, image_v, state.timestep)
        if state.strength != 1.0:
            from .mixers import mix

            weight = torch.tensor(state.strength, dtype=torch.float32, device=key.device)
            mixed_k = mix(key, mixed_k, weight)
            mixed_v = mixed_k if shared else mix(value, mixed_v, weight)
        rows = state.image_rows
        if rows is not None:
            rows = rows.to(device=key.device, dtype=torch.bool).view(-1, 1, 1, 1)
            mixed_k = torch.where(rows, mixed_k, key)
            mixed_v = mixed_k if shared else torch.where(rows, mixed_v, value)
        return mixed_k, mixed_v


class InjectProcessor(KVProcessor):
    """Calls the synapse hook on this diffusers attention layer's keys/values: ``K <- mixer(layer, K, K_img)``.

    ``view="context"`` (the released code's injection point) calls it on the text context instead, before
    ``norm_cross`` and the key/value projections, seen as one head: ``c <- mixer(layer, c, e)``, then
    ``K = to_k(c)``, ``V = to_v(c)``.

    With no features in the state (or none for this layer) it runs the
    original processor unchanged, so an installed synapse without an image is
    an exact no-op.
    """

    def __init__(self, name: str, hook: SynapseHook, original: Any = None, view: str | None = None):
        super().__init__(name, original)
        self._hook = _Ref(hook)
        self.view = _check_view(view, (None, "context"))

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
        if self.view == "context" and encoder_hidden_states is None and not idle:
            raise ValueError(f"synapse layer {self.name!r}: a ':context' injection point needs a cross-attention "
                             "layer given a text context; this one attends over its own tokens")
        return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)

    def transform(self, attn, key, value):
        if self.view is not None:
            return key, value
        return self.hook(self.name, key, value)

    def transform_context(self, attn, context):
        if self.view != "context":
            return context, context
        one = _one_head(context)
        mixed_k, mixed_v = self.hook(self.name, one, one)
        key_in = mixed_k[:, 0]
        return key_in, key_in if mixed_v is mixed_k else mixed_v[:, 0]
