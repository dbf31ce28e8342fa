"""Installing the synapse's processors on a stock diffusers UNet, and taking them off.

Layer names are module paths inside the UNet. A name may point at an
``Attention`` module (``up_blocks.1.attentions.0.transformer_blocks.0.attn2``)
or at a ``Transformer2DModel`` with one transformer block
(``up_blocks.1.attentions.0``), in which case its ``attn2`` (cross-attention,
the music side) or ``attn1`` (self-attention, the image side) is used.

A name may carry a view (:mod:`melfusion.synapse.injection`):
``up_blocks.1.attentions.0.attn2:output`` taps that attention's output and
``up_blocks.1.attentions.0.attn2:context`` its text context (the released
code's injection point), each seen as one head; the view names its attention
itself, whatever ``which`` says.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..interfaces import LayerInfo
from ..registry import registry
from .injection import split_view
from .processors import CaptureProcessor, CaptureStore, InjectProcessor, SynapseHook, SynapseState

__all__ = [
    "decoder_layers",
    "resolve_attention",
    "layer_info",
    "install",
    "install_hook",
    "HookHandle",
    "ProcessorSwap",
    "capture",
    "SynapseHandle",
    "CaptureHandle",
]

_DECODER = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)$")


def decoder_layers(unet: nn.Module) -> list[str]:
    """Names of the decoder transformer layers (``up_blocks.i.attentions.j``), in forward order."""
    names = [name for name, _ in unet.named_modules() if _DECODER.match(name)]
    return sorted(names, key=lambda n: tuple(int(g) for g in _DECODER.match(n).groups()))


_TRANSFORMER = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.attentions\.(\d+)$")
_STAGE = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def transformer_layers(unet: nn.Module) -> list[str]:
    """Names of every transformer layer of a diffusers UNet (encoder ``down_blocks.i.attentions.j``, middle
    ``mid_block.attentions.j``, decoder ``up_blocks.i.attentions.j``), in forward order."""
    def key(name: str) -> tuple[int, int, int]:
        stage, block, index = _TRANSFORMER.match(name).groups()
        return _STAGE[stage], int(block or 0), int(index)

    return sorted((name for name, _ in unet.named_modules() if _TRANSFORMER.match(name)), key=key)


def resolve_attention(unet: nn.Module, name: str, which: str = "attn2") -> tuple[str, nn.Module]:
    """The ``(full name, Attention module)`` that ``name`` designates (see the module doc)."""
    if which not in ("attn1", "attn2"):
        raise ValueError(f"which: expected 'attn1' (self-attention) or 'attn2' (cross-attention), got {which!r}")
    base, view = split_view(name)
    if view is not None:
        return _resolve_view(unet, base, name)
    modules = dict(unet.named_modules())
    if name not in modules:
        known = decoder_layers(unet)
        raise ValueError(
            f"layers: {name!r} is not a module of this UNet; its decoder attention layers are {known}"
        )
    module = modules[name]
    if hasattr(module, "set_processor") and hasattr(module, "to_k"):
        return name, module
    blocks = getattr(module, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"layers: {name!r} is a {type(module).__name__}, not an attention or transformer layer")
    if len(blocks) != 1:
        options = [f"{name}.transformer_blocks.{i}.{which}" for i in range(len(blocks))]
        raise ValueError(f"layers: {name!r} has {len(blocks)} transformer blocks; name one of {options}")
    attn = getattr(blocks[0], which, None)
    if attn is None:
        raise ValueError(f"layers: {name!r} has no {which}")
    return f"{name}.transformer_blocks.0.{which}", attn


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "to_k")


def _resolve_view(unet: nn.Module, base: str, name: str) -> tuple[str, nn.Module]:
    """The attention a view name ``<base>:<view>`` designates: ``base`` is an attention module, or
    ``<layer>.<attn1|attn2>`` with ``<layer>`` resolved as a plain name."""
    module = dict(unet.named_modules()).get(base)
    if module is not None and _is_attention(module):
        return base, module
    layer, _, which = base.rpartition(".")
    if which not in ("attn1", "attn2") or not layer:
        raise ValueError(f"layers: {name!r}: expected '<layer>.<attn1|attn2>:<view>' or '<attention path>:<view>'")
    return resolve_attention(unet, layer, which)


def layer_info(unet: nn.Module, name: str, which: str = "attn2") -> LayerInfo:
    """Heads and head size of a layer (tokens and grid are filled in by :func:`probe_layers`).

    A view is one head: ``:output`` as wide as the attention's output, ``:context`` as its text context
    (``to_k``'s input width, the cross-attention width).
    """
    _, attn = resolve_attention(unet, name, which)
    if getattr(attn, "add_k_proj", None) is not None:
        raise NotImplementedError(f"layers: {name!r} uses added key/value projections, not supported")
    view = split_view(name)[1]
    if view == "output":
        return LayerInfo(name=name, heads=1, head_dim=attn.to_out[0].out_features)
    if view == "context":
        return LayerInfo(name=name, heads=1, head_dim=attn.to_k.in_features)
    inner = attn.to_k.out_features
    return LayerInfo(name=name, heads=attn.heads, head_dim=inner // attn.heads)


class ProcessorSwap:
    """Processors set on attention modules, with the originals to put back on :meth:`remove` (which refuses
    when another processor replaced one of ours in between). Diffusers-based denoisers use it for
    ``install_synapse``."""

    def __init__(self):
        self._entries: list[tuple[nn.Module, Any, Any]] = []  # (attention, original, ours)
        self.removed = False

    def set(self, attn: nn.Module, processor: Any) -> None:
        self._entries.append((attn, attn.processor, processor))
        attn.set_processor(processor)

    def remove(self) -> None:
        if self.removed:
            return
        for attn, original, ours in reversed(self._entries):
            if attn.processor is not ours:
                raise RuntimeError(
                    "remove(): another processor was set on this layer after install; remove that one first"
                )
            attn.set_processor(original)
        self.removed = True

    def __enter__(self) -> ProcessorSwap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_Installed = ProcessorSwap


class SynapseHandle:
    """Returned by :func:`install`; ``remove()`` puts back the original processors (the same objects)."""

    def __init__(self, layers: list[str], processors: list[Any], state: SynapseState,
                 installed: Any, hook: SynapseHook):
        self.layers = layers
        self.processors = processors
        self.state = state
        self.hook = hook
        self._installed = installed

    def set_features(
        self,
        features: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
        timestep: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
    ) -> None:
        """Image ``(keys, values)`` per layer name for the next forward passes (None: no image)."""
        self.hook.set_features(features, timestep, image_rows)

    @contextlib.contextmanager
    def context(self, features, timestep=None, image_rows=None) -> Iterator[SynapseHandle]:
        """``with handle.context(features, t): unet(...)``: features set only inside the block."""
        previous = (self.state.features, self.state.timestep, self.state.image_rows)
        self.set_features(features, timestep, image_rows)
        try:
            yield self
        finally:
            self.state.features, self.state.timestep, self.state.image_rows = previous

    def remove(self) -> None:
        self._installed.remove()

    @property
    def removed(self) -> bool:
        return self._installed.removed

    def __enter__(self) -> SynapseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _build_aligners(aligners, unet, layers: list[str], which: str) -> list[nn.Module | None]:
    if aligners is None:
        return [None] * len(layers)
    if isinstance(aligners, str):
        out = []
        for name in layers:
            info = layer_info(unet, name, which)
            out.append(registry("aligner").build(aligners, in_heads=info.heads, in_head_dim=info.head_dim))
        return out
    aligners = list(aligners)
    if len(aligners) != len(layers):
        raise ValueError(f"aligners: expected one per layer ({len(layers)}), got {len(aligners)}")
    return aligners


def install(
    unet: nn.Module,
    mixer: nn.Module,
    layers: Sequence[str] | None = None,
    aligners: str | Sequence[nn.Module | None] | None = None,
    which: str = "attn2",
) -> SynapseHandle:
    """Install the synapse on ``layers`` of ``unet`` (default: all decoder transformer layers).

    ``mixer`` is called as ``mixer(i, music, image, timestep)`` with ``i`` the
    position of the layer in ``layers``. ``aligners`` is None (image features
    arrive already aligned), an aligner registry name (built per layer with
    that layer's width), or one aligner module (or None) per layer. The
    parameters of the mixer and the aligners stay outside the UNet.
    """
    layers = list(decoder_layers(unet) if layers is None else layers)
    if not layers:
        raise ValueError("layers: no layers to install the synapse on")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: duplicate names in {layers}")
    num_layers = getattr(mixer, "num_layers", None)
    if num_layers is not None and num_layers != len(layers):
        raise ValueError(f"mixer: built for {num_layers} layers, installed on {len(layers)}")
    built = _build_aligners(aligners, unet, layers, which)
    hook = SynapseHook(mixer, layers, built)
    handle = install_hook(unet, hook, layers, which)
    return SynapseHandle(layers, handle.processors, hook.state, handle, hook)


class HookHandle:
    """What :func:`install_hook` returns: the processors it set; ``remove()`` puts the originals back."""

    def __init__(self, processors: list[InjectProcessor], installed: _Installed):
        self.processors = processors
        self._installed = installed

    def remove(self) -> None:
        self._installed.remove()

    @property
    def removed(self) -> bool:
        return self._installed.removed


def install_hook(model: nn.Module, hook: Any, layers: Sequence[str], which: str = "attn2") -> HookHandle:
    """Make the diffusers attention layers ``layers`` of ``model`` call ``hook(name, key, value)``.

    This is how a diffusers-based denoiser implements ``MusicDenoiser.install_synapse``; ``hook`` is any
    :class:`melfusion.interfaces.KVHook`.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers: no layers to install the synapse on")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: duplicate names in {layers}")
    installed = _Installed()
    processors = []
    try:
        for name in layers:
            _, attn = resolve_attention(model, name, which)
            layer_info(model, name, which)  # validates the attention type
            view = split_view(name)[1]
            if view == "output":
                raise ValueError(f"layers: {name!r} is an image tap (':output'); the synapse mixes into keys/values "
                                 "or into a ':context' injection point")
            proc = InjectProcessor(name, hook, original=attn.processor, view=view)
            installed.set(attn, proc)
            processors.append(proc)
    except Exception:
        installed.remove()
        raise
    return HookHandle(processors, installed)


class CaptureHandle:
    """Returned by :func:`capture`: ``records`` maps layer name to the last ``(keys, values)`` seen."""

    def __init__(self, layers: list[str], store: CaptureStore, installed: _Installed):
        self.layers = layers
        self.records = store
        self._installed = installed

    def clear(self) -> None:
        self.records.clear()

    def remove(self) -> None:
        self._installed.remove()

    def __enter__(self) -> CaptureHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def capture(unet: nn.Module, layers: Sequence[str] | None = None, which: str = "attn1",
            detach: bool = True) -> CaptureHandle:
    """Record the keys and values of ``layers`` (default: decoder self-attention) on each forward pass.

    A layer named with a view records that view instead (``:output``: the attention's output, ``:context``: its
    text context), as the pair ``(x, x)`` of one head ``(batch, 1, tokens, channels)``.
    """
    layers = list(decoder_layers(unet) if layers is None else layers)
    store = CaptureStore()
    installed = _Installed()
    try:
        for name in layers:
            _, attn = resolve_attention(unet, name, which)
            layer_info(unet, name, which)
            installed.set(attn, CaptureProcessor(name, store, original=attn.processor, detach=detach,
                                                 view=split_view(name)[1]))
    except Exception:
        installed.remove()
        raise
    return CaptureHandle(layers, store, installed)
