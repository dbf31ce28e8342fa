"""The abstract parts a MelFusion model is composed of: the contract between the parts and everything above them.

Every concrete part subclasses one of these and registers itself in the registry of its kind
(``melfusion.registry``). The pipeline, the trainer, the CLI and the metrics use a part only through the
members declared here, so a part written against this module alone plugs in (``examples/custom_denoiser.py``
is such a part, in plain torch). Every part is a ``torch.nn.Module``: ``.to()``, ``.parameters()``,
``state_dict()`` and freezing work the same way for all of them.

Tensor shapes are written in the docstrings; attention tensors are always ``(batch, heads, tokens,
head_dim)``. A music latent is ``(batch, channels, *axes)``: ``(batch, C, frames, bins)`` for a mel-image
UNet, ``(batch, C, frames)`` for a waveform codec's sequence (Stable Audio).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .schedules import NoiseSchedule

if TYPE_CHECKING:
    from .synapse.features import FeatureCache

__all__ = ["LayerInfo", "Part", "FeatureSource", "SynapseMixer", "MusicDenoiser", "LatentCodec", "Vocoder",
           "TextEncoder", "KVHook", "NoiseSchedule", "Removable"]


@dataclass(frozen=True)
class LayerInfo:
    """What the synapse needs to know about one attention layer.

    ``heads``/``head_dim`` are those of the keys and values the synapse sees (for grouped-query attention,
    the key/value heads). ``tokens`` is the key/value token count the layer sees (``None`` where it depends
    on the input, as for cross-attention over text); ``grid`` the ``(height, width)`` token grid for spatial
    self-attention, else ``None``. ``depth`` is the layer's relative position in its network's forward
    order, in [0, 1] (None when unknown); the synapse pairs layers of unequal counts by it.
    """

    name: str
    heads: int
    head_dim: int
    tokens: int | None = None
    grid: tuple[int, int] | None = None
    depth: float | None = None

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


class KVHook(Protocol):
    """What an attention layer calls between projecting its keys/values and attending.

    ``hook(layer_name, key, value) -> (key, value)``, all ``(batch, heads, tokens, head_dim)``; it returns
    its inputs unchanged when no image features are set, so an installed synapse without an image is an
    exact no-op.
    """

    def __call__(self, layer: str, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Removable(Protocol):
    """A handle whose ``remove()`` undoes what installed it."""

    def remove(self) -> None:
        ...


class Part(nn.Module):
    """What every part shares: it is a module, it knows its device and dtype, and it names its weights.

    ``stored_modules()`` are the modules whose weights ``save_pretrained`` writes when the part was not
    loaded from published weights; ``published_modules()`` names those that were (a hub id or a folder in
    the config, or weights that ship with a Python package), which a saved model references instead of
    copying.
    """

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float32

    def stored_modules(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the modules holding this part's weights (default: its children with state)."""
        return {name: child for name, child in self.named_children() if child.state_dict()}

    def published_modules(self) -> set[str]:
        """Names (keys of :meth:`stored_modules`) loaded from published weights (see :meth:`mark_published`)."""
        return set(self.__dict__.get("_published_names", ()))

    def mark_published(self, name: str, spec: Any = None, weights: bool = True) -> None:
        """Record that module ``name`` was loaded from published weights: when ``weights`` and ``spec`` (a model
        spec mapping, or True) names a ``pretrained`` source. Parts call it while they build."""
        published = bool(spec.get("pretrained")) if isinstance(spec, Mapping) else bool(spec)
        if weights and published:
            names = set(self.__dict__.get("_published_names", ()))
            names.add(name)
            self.__dict__["_published_names"] = frozenset(names)


class FeatureSource(Part, abc.ABC):
    """A frozen image LDM that supplies per-timestep attention keys and values."""

    #: the square image side ``encode`` resizes to (None: any size is used as is)
    resolution: int | None = None

    @property
    @abc.abstractmethod
    def layers(self) -> list[LayerInfo]:
        """The tapped layers, in order: names, heads, head size (tokens and grid: see :meth:`probe_layers`)."""

    @abc.abstractmethod
    def select_layers(self, names: Sequence[str]) -> None:
        """Tap ``names`` from now on (the synapse's image layers); a ``ValueError`` naming ``layers`` if unknown."""

    @abc.abstractmethod
    def probe_layers(self) -> list[LayerInfo]:
        """:attr:`layers` with their key token counts and grids for this source's latent size (no weights read)."""

    def available_layers(self) -> list[str]:
        """Every layer name :meth:`select_layers` accepts, in forward order (by default the tapped ones)."""
        return [layer.name for layer in self.layers]

    @property
    @abc.abstractmethod
    def noise_schedule(self) -> NoiseSchedule:
        """The image model's training schedule (ddpm family: the image timesteps the SNR map lands on)."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` images in [0, 1] -> ``(batch, C, h, w)`` latents."""

    @abc.abstractmethod
    def trajectory(self, latents: torch.Tensor, timesteps: torch.Tensor | Sequence[int], mode: str = "reverse",
                   transform: Callable[[int, dict], dict] | None = None) -> FeatureCache:
        """Features of ``latents`` at each of ``timesteps`` (image timesteps), captured per layer.

        ``mode`` names an image trajectory (registry kind ``trajectory``: ``reverse``, ``inversion``,
        ``noise``). ``transform(t, {layer: (keys, values)}) -> features`` is applied to each timestep's
        capture as soon as it is made (the pipeline aligns there, so only aligned tensors are kept).
        """

    @abc.abstractmethod
    def features_at(self, latents: torch.Tensor, timesteps: torch.Tensor) -> dict[str, tuple[torch.Tensor,
                                                                                             torch.Tensor]]:
        """One pass on noisy ``latents`` at per-sample ``timesteps``: ``{layer: (keys, values)}`` (training)."""

    @abc.abstractmethod
    def add_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean ``latents`` to per-sample image ``timesteps`` ``(batch,)``."""

    @abc.abstractmethod
    def inversion_latents(self, latents: torch.Tensor, timesteps: torch.Tensor | Sequence[int]
                          ) -> dict[int, torch.Tensor]:
        """The inversion trajectory of clean ``latents``: ``{t: noisy latent at t}`` for each of ``timesteps``."""

    def evaluations(self, steps: int, mode: str = "reverse") -> int:
        """Image-model evaluations :meth:`trajectory` makes for ``steps`` timesteps (for progress and cost)."""
        return 2 * steps if mode == "reverse" else steps

    def cache_key(self) -> tuple:
        """What, besides the image and the timesteps, shapes this source's features (for feature caches)."""
        return (id(self), self.resolution, str(self.dtype), str(self.device))


class SynapseMixer(nn.Module, abc.ABC):
    """Mixes image keys/values into music keys/values, one learned weight set per layer."""

    @abc.abstractmethod
    def forward(
        self,
        layer: int,
        music: torch.Tensor,
        image: torch.Tensor,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Both inputs ``(batch, heads, tokens, head_dim)``; returns the same shape."""

    @abc.abstractmethod
    def alphas(self) -> torch.Tensor:
        """The current mixing weights (detached), one row per layer."""


class MusicDenoiser(Part, abc.ABC):
    """A text-conditioned music LDM: a diffusers UNet or DiT, or any module that honours this contract."""

    @property
    @abc.abstractmethod
    def layers(self) -> list[LayerInfo]:
        """The attention layers the synapse may be installed on (default selection), in forward order."""

    @abc.abstractmethod
    def probe_layers(self, names: Sequence[str], latent_shape: Sequence[int]) -> list[LayerInfo]:
        """Infos of layers ``names`` for a latent of ``latent_shape`` ``(C, *axes)``: a layer whose keys come
        from the music tokens gets their count and grid; one that cross-attends to text gets ``tokens=None``."""

    @abc.abstractmethod
    def install_synapse(self, hook: KVHook, layers: Sequence[str]) -> Removable:
        """Make each of ``layers`` call ``hook(name, key, value)`` on its keys/values; returns the handle."""

    @property
    @abc.abstractmethod
    def noise_schedule(self) -> NoiseSchedule:
        """The training noise schedule: family, prediction type, parameters and default scheduler."""

    @property
    @abc.abstractmethod
    def in_channels(self) -> int:
        """Latent channels the denoiser takes."""

    @abc.abstractmethod
    def latent_shape(self, codec_shape: Sequence[int], round_up: bool = True) -> tuple[int, ...]:
        """The latent ``(C, *axes)`` the denoiser runs on for a codec latent of ``codec_shape``: the time axis
        raised (``round_up``) or cut to a length the denoiser can process. A ``ValueError`` if none exists."""

    @abc.abstractmethod
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        timing: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model output (noise, v or velocity, per :attr:`noise_schedule`) for ``latents`` at ``timestep``.

        ``text`` ``(batch, tokens, dim)`` and ``text_mask`` ``(batch, tokens)`` come from the text encoder; a
        row whose mask is all false is the unconditional (guidance) row. ``timing`` ``(batch, 2)`` holds each
        clip's ``(seconds_start, seconds_total)``; denoisers without timing conditioning ignore it.
        """

    @abc.abstractmethod
    def save_weights(self, folder) -> str:
        """Write the denoiser's weights into a new sub-folder of ``folder``; returns the sub-folder's name."""

    @abc.abstractmethod
    def load_weights(self, folder) -> None:
        """Load weights written by :meth:`save_weights` from ``folder`` (that sub-folder); ``OSError`` naming the
        file when they are missing, corrupt or do not fit."""

    def context_tokens(self, text_tokens: int) -> int:
        """Keys a text cross-attention layer sees for ``text_tokens`` text tokens (default: the same; Stable
        Audio adds its two timing tokens)."""
        return int(text_tokens)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules trained in ``synapse+unet`` mode (default: all of :meth:`stored_modules`)."""
        return self.stored_modules()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (less memory, about a third more
        time), on every trainable module that supports it (default: diffusers' ``enable_gradient_checkpointing``).
        A ``ValueError`` names a part none of whose modules can."""
        supported = [m for m in self.trainable_modules().values() if hasattr(m, "enable_gradient_checkpointing")]
        if not supported:
            raise ValueError(f"gradient_checkpointing: {type(self).__name__} has no module that supports it")
        for module in supported:
            module.enable_gradient_checkpointing()

    def activation_bytes(self, latent_shape: Sequence[int], rows: int) -> int:
        """A lower bound of the activation memory of one forward pass on ``rows`` latents (default: 16 float32
        copies of the latent at 64 channels)."""
        axes = 1
        for n in latent_shape[1:]:
            axes *= int(n)
        return rows * axes * 64 * 4 * 16


class LatentCodec(Part, abc.ABC):
    """Maps the audio representation (mel spectrogram or waveform) to diffusion latents and back."""

    latent_channels: int = 1
    #: what :meth:`decode` returns: ``"mel"`` (a vocoder makes audio) or ``"waveform"`` (vocoder ``none``)
    output: str = "mel"
    #: latent frames per mel frame (mel codecs) or per audio sample (waveform codecs), inverted: the factor
    downsample: int = 1

    @abc.abstractmethod
    def latent_shape(self, seconds: float, sample_rate: int, hop_length: int, n_mels: int) -> tuple[int, ...]:
        """``(C, *axes)`` of the latent covering ``seconds`` (rounded up) under the model's audio settings."""

    @abc.abstractmethod
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, frames, mels)`` mel or ``(batch, channels, samples)`` waveform -> latents."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`."""


class Vocoder(Part, abc.ABC):
    """Mel spectrogram -> waveform (``none``: the codec already decodes to a waveform)."""

    sample_rate: int

    @abc.abstractmethod
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``(batch, frames, mels)`` log-mel -> ``(batch, samples)`` (or ``(batch, channels, samples)``) waveform."""


class TextEncoder(Part, abc.ABC):
    """Texts -> token embeddings for cross-attention."""

    dim: int
    #: the prompt whose embedding is "no text" for guidance ("": the empty prompt, encoded in one batch with
    #: the prompts); None: :meth:`unconditional` gives it (Stable Audio's zeros)
    null_text: str | None = ""

    @abc.abstractmethod
    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ``(embeddings (batch, tokens, dim), mask (batch, tokens) bool)``."""

    def unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding of "no text" for classifier-free guidance (default: the empty prompt's)."""
        return self([""] * batch)


def pad_tokens(emb: torch.Tensor, mask: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(batch, n, dim)`` embeddings and their mask to ``tokens`` along the token axis."""
    n = emb.shape[1]
    if n >= tokens:
        return emb, mask
    emb = torch.cat([emb, emb.new_zeros(emb.shape[0], tokens - n, emb.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], tokens - n)], dim=1)
    return emb, mask


def concat_text(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(emb, mask)`` batches along the batch axis, padding their token axes to the longest."""
    tokens = max(e.shape[1] for e, _ in parts)
    padded = [pad_tokens(e, m, tokens) for e, m in parts]
    return torch.cat([e for e, _ in padded]), torch.cat([m for _, m in padded])

