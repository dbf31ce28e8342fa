"""Injection points: where the image features enter a music attention layer (``SynapseConfig.injection``).

- ``kv`` (the paper, the default): the image LDM's decoder self-attention keys/values ``K_I, V_I`` are mixed
  into the music layer's cross-attention keys/values after their projections, ``K <- K_M + a (K_I - K_M)``
  (and the same for V).
- ``context`` (the authors' released code): the *output* of an image attention layer, ``e``, aligned onto the
  text context's tokens and width, is mixed into the music layer's text context *before* its key/value
  projections, ``c <- c + f (e - c) = (1 - f) c + f e``, then ``K = to_k(c)``, ``V = to_v(c)``; the released
  code's ``f`` is ``(2 sigmoid(a) - 1) / 5`` (the ``bounded`` mixer).

Both run through the same hook (:class:`~melfusion.synapse.processors.SynapseHook`), mixers, aligners, feature
cache, training and saving; what differs is what the layer names designate. A *view* suffix on a layer name
selects a tensor of the attention other than its keys and values, shaped as one head::

    <layer>.<attn1|attn2>:output    the attention's output, (batch, 1, query tokens, channels): an image tap
    <layer>.<attn1|attn2>:context   the attention's text context, before norm_cross and to_k/to_v,
                                    (batch, 1, text tokens, context width): a music injection point

``<layer>`` is a transformer layer with one transformer block (``up_blocks.1.attentions.0``) or the block
itself; ``<attention path>:<view>`` (``up_blocks.1.attentions.0.transformer_blocks.0.attn2:output``) works too.
:func:`injection_points` turns the default layer names into these views for ``injection: context``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["INJECTIONS", "VIEWS", "split_view", "with_view", "injection_points", "check_points"]

#: the injection points ``SynapseConfig.injection`` takes
INJECTIONS = ("kv", "context")
#: the view suffixes a layer name may carry: what is tapped (image side) or mixed (music side)
VIEWS = ("output", "context")
_ATTENTIONS = ("attn1", "attn2")
#: the view each side of a context injection uses
_CONTEXT_VIEWS = {"image_layers": "output", "music_layers": "context"}


def split_view(name: str) -> tuple[str, str | None]:
    """``"<base>:<view>" -> (base, view)``; a name without a view -> ``(name, None)``."""
    base, sep, view = str(name).rpartition(":")
    if not sep:
        return str(name), None
    if view not in VIEWS or not base:
        raise ValueError(f"layers: {name!r}: expected '<layer>.<attn1|attn2>:<view>' with a view in "
                         f"{', '.join(VIEWS)}")
    return base, view


def with_view(name: str, attention: str, view: str) -> str:
    """``name`` with ``view``: ``<layer>.<attention>:<view>``, or ``<attention path>:<view>`` for a name that
    already ends in an attention (``...attn2``). A name that has a view keeps it."""
    if attention not in _ATTENTIONS:
        raise ValueError(f"attention: expected 'attn1' or 'attn2', got {attention!r}")
    if split_view(name)[1] is not None:
        return name
    if name.rpartition(".")[2] in _ATTENTIONS:
        return f"{name}:{view}"
    return f"{name}.{attention}:{view}"


def check_points(injection: str, image_layers: Sequence[str] | None, music_layers: Sequence[str] | None) -> None:
    """A ``ValueError`` naming the field when explicit layer names carry a view that ``injection`` does not use."""
    if injection not in INJECTIONS:
        raise ValueError(f"injection: expected one of {', '.join(INJECTIONS)}, got {injection!r}")
    for field, names in (("image_layers", image_layers), ("music_layers", music_layers)):
        for name in names or ():
            view = split_view(name)[1]
            if view is None:
                continue
            wanted = _CONTEXT_VIEWS[field] if injection == "context" else None
            if view != wanted:
                expected = f"':{wanted}' or no view" if wanted else "no view (kv injection mixes keys/values)"
                raise ValueError(f"{field}: {name!r} has the view ':{view}'; injection {injection!r} takes "
                                 f"{expected}")


def injection_points(synapse: Any, image_names: Sequence[str], music_names: Sequence[str]
                     ) -> tuple[list[str], list[str]]:
    """The image taps and music layers a synapse config (``SynapseConfig``) installs on, from the layer names.

    ``kv``: the names as given. ``context``: each image name's ``image_attention`` output view and each music
    name's ``music_attention`` context view (:func:`with_view`); names that already carry the view keep it.
    """
    injection = getattr(synapse, "injection", "kv")
    image_names, music_names = list(image_names), list(music_names)
    check_points(injection, image_names, music_names)
    if injection == "kv":
        return image_names, music_names
    return ([with_view(n, synapse.image_attention, "output") for n in image_names],
            [with_view(n, synapse.music_attention, "context") for n in music_names])
