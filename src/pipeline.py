"""``MelFusion``: composes the parts; ``generate()`` is the paper's Algorithm 2.

1. encode the image and run the feature source's trajectory over the image timesteps of equal SNR to the
   sampling steps (DDIM inversion with an empty prompt), capturing the image model's decoder self-attention
   keys/values per timestep; align them once to the music layers (the cache is reused by every step,
   guidance branch and sample);
2. encode the text; start the music latent from Gaussian noise;
3. at each step, the installed synapse mixes the image keys/values of that step into the music model's
   cross-attention;
4. classifier-free guidance (the unconditional branch is no text and no image; with ``image_guidance_scale``
   a third, text-only branch), then the codec decodes the latent (and the vocoder, for mel codecs, makes audio).

Persistence lives in :mod:`melfusion.persistence`, the image feature cache in :mod:`melfusion.image_features`
and the sampling loop in :mod:`melfusion.sampling`; this module composes them. Every part is used only
through :mod:`melfusion.interfaces`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones.text import check_texts
from .checks import NonFiniteError, check_size, finite_float, positive_int
from .config import SCHEDULERS, MelFusionConfig
from .files import AUDIO_SUFFIXES, atomic_path, check_output, output_paths
from .image_features import image_features, music_tokens
from .images import load_images
from .interfaces import concat_text
from .persistence import (
    CONFIG_NAME,
    INDEX_NAME,
    PARTS,
    SHIPPED_MODELS,
    is_model_entry,
    load_model,
    read_index,
    save_model,
    shipped_model_path,
)
from .progress import sync_progress_bars
from .sampling import (
    StepCallback,
    cap_timesteps,
    check_callback,
    check_latents,
    denoise,
    image_timesteps,
    make_scheduler,
    music_to_image_timesteps,
    noise_schedule,
)
from .synapse.features import FeatureCache, FeatureStore
from .synapse.injection import injection_points
from .synapse.processors import SynapseHook
from .synapse.wiring import Synapse, pair_layers

__all__ = ["MelFusion", "GenerationOutput", "make_scheduler", "noise_schedule", "image_timesteps", "cap_timesteps",
           "SCHEDULERS", "SHIPPED_MODELS", "shipped_model_path", "read_index", "is_model_entry"]


@dataclass
class GenerationOutput:
    """``waveforms`` float32 ``(num_samples, samples)`` in [-1, 1]; ``mel`` ``(num_samples, frames, mels)``."""

    waveforms: np.ndarray
    sample_rate: int
    mel: np.ndarray
    texts: list[str] = field(default_factory=list)
    #: the ``(start, end)`` seconds of each section of a long piece or storyboard (empty for one clip)
    sections: list[tuple[float, float]] = field(default_factory=list)
    #: how ``mel`` was computed, for plots: ``sample_rate``, ``hop_length``, ``fmin``, ``fmax`` (Hz) and
    #: ``values`` (``"ln_amplitude"``: the natural log of the mel magnitude); see :meth:`MelFusion.mel_params`.
    #: None (a hand-made output): the spectrogram's axes are frames and mel bands
    mel_params: dict[str, Any] | None = None

    def save(self, path: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write WAV (or FLAC/OGG, by suffix) file(s): ``path`` for one sample, ``stem_i.wav`` for several.

        Each file is written beside its target and renamed onto it. An existing file is refused
        (``FileExistsError``) unless ``overwrite``; nothing is written unless every target can be.
        """
        import soundfile as sf

        waves = np.asarray(self.waveforms)
        if waves.ndim == 1:  # one clip given as a plain array
            waves = waves[None]
        if waves.ndim not in (2, 3) or 0 in waves.shape:
            raise ValueError(f"waveforms: expected (num_samples, samples) or (num_samples, channels, samples), "
                             f"got shape {waves.shape}")
        sample_rate = self.sample_rate
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
            raise ValueError(f"sample_rate: expected a positive int, got {sample_rate!r}")
        paths = output_paths(path, len(waves))
        for p in paths:
            check_output(p, "path", overwrite=overwrite, suffixes=AUDIO_SUFFIXES)
        if not np.isfinite(waves).all():
            raise NonFiniteError("waveforms: NaN or infinite samples; nothing was written")
        fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
        for p, wav in zip(paths, waves, strict=True):
            data = wav.T if wav.ndim == 2 else wav  # (channels, samples) -> soundfile's (samples, channels)
            subtype = "VORBIS" if p.suffix.lower() == ".ogg" else "PCM_16"
            try:
                with atomic_path(p, overwrite=overwrite) as tmp:
                    sf.write(str(tmp), data, int(sample_rate), subtype=subtype, format=fmt[p.suffix.lower()])
            except (RuntimeError, sf.LibsndfileError) as exc:  # named by the target, not the temporary file
                raise OSError(f"path: cannot write {str(p)!r} ({' '.join(str(exc).split())[:200]})") from None
        return paths

    def save_spectrogram(self, path: str | Path, index: int = 0, *, overwrite: bool = False) -> Path:
        """Write the mel spectrogram of sample ``index`` as a PNG figure: time (s) left to right, frequency (Hz,
        mel scale) upwards, a dB colour bar, the sample's prompt as the title and, for a storyboard or long
        piece, the section boundaries as faint dashed lines (see :func:`melfusion.plots.spectrogram_png`)."""
        from .plots import spectrogram_png

        check_output(path, "path", overwrite=overwrite, suffixes=(".png",))
        mel = np.asarray(self.mel)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -len(mel) <= index < len(mel):
            raise ValueError(f"index: expected a sample index below {len(mel)}, got {index!r}")
        one = mel[index]
        if one.ndim != 2 or 0 in one.shape:
            raise ValueError(f"mel: expected (frames, mels) per sample, got shape {one.shape}")
        if not np.isfinite(one).all():
            raise NonFiniteError("mel: NaN or infinite values; nothing was written")
        prompt = self.texts[index] if len(self.texts) == len(mel) else None
        return spectrogram_png(one, path, overwrite=overwrite, title=prompt, sections=self.sections,
                               **(self.mel_params or {}))


@dataclass
class _Request:
    """The checked arguments of one ``generate`` call."""

    texts: list[str]
    negatives: list[str]
    steps: int
    samples: int
    g_text: float
    g_image: float | None
    seconds: float
    image_steps: int | None
    use_image: bool

    @property
    def batch(self) -> int:
        return len(self.texts) * self.samples

    @property
    def branches(self) -> int:
        return 3 if self.use_image and self.g_image is not None else 2


class MelFusion:
    """An image-and-text-to-music model composed from registry parts."""

    PARTS = PARTS
    CONFIG_NAME = CONFIG_NAME
    INDEX_NAME = INDEX_NAME

    def __init__(self, config: MelFusionConfig, feature_source, denoiser, text_encoder, codec, vocoder,
                 synapse: Synapse | None):
        self.config = config
        self.feature_source = feature_source
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.codec = codec
        self.vocoder = vocoder
        self.synapse = synapse
        # aligned image features of recent images, reused across calls (see image_features)
        self.feature_cache = FeatureStore(max_items=8)
        # from_config(weights=False) clears it: then save_pretrained keeps every module, even those the config
        # names published weights for (the random ones would otherwise be lost)
        self.built_with_weights = True
        #: where from_pretrained loaded the model (a folder, a shipped name or a hub id); None if built from a config
        self.name_or_path: str | None = None
        self.revision: str | None = None  # the hub revision from_pretrained was given
        #: LoRA settings when adapters were added (melfusion.lora.add_lora), else None
        self.lora: dict[str, Any] | None = None
        #: {"device", "hooks"} while model CPU offload is enabled (enable_model_cpu_offload), else None
        self.offload: dict[str, Any] | None = None
        self.synapse_hook: SynapseHook | None = None
        self.synapse_handle = None
        if synapse is not None:
            self.synapse_hook = SynapseHook(synapse.mixer, synapse.music_layer_names)
            self.synapse_handle = denoiser.install_synapse(self.synapse_hook, synapse.music_layer_names)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MelFusionConfig | str, *, weights: bool = True, device: Any = None,
                    dtype: torch.dtype | None = None) -> MelFusion:
        """Build every part named in ``config`` (a config or a preset name).

        ``weights=False`` builds architectures only (random init); with
        ``device="meta"`` nothing is allocated, which is how the full-size
        ``paper`` preset is checked without its checkpoints.
        """
        if isinstance(config, str):
            config = MelFusionConfig.preset(config)
        elif isinstance(config, dict):
            config = MelFusionConfig.model_validate(config)
        elif not isinstance(config, MelFusionConfig):
            raise ValueError(f"config: expected a MelFusionConfig, a preset name or a dict, got {type(config).__name__}")
        device, dtype = check_device(device), check_dtype(dtype)
        sync_progress_bars()  # melfusion.disable_progress_bars() reaches transformers' and diffusers' bars too
        common = dict(weights=weights, device=device, dtype=dtype)
        feature_source = config.feature_source.build(**common)
        denoiser = config.denoiser.build(**common)
        text_encoder = config.text_encoder.build(**common)
        codec = config.codec.build(**common)
        vocoder = config.vocoder.build(**common)
        synapse = None
        if config.synapse.enabled:
            synapse = cls.build_synapse(config, feature_source, denoiser, codec)
            if device is not None:
                synapse = synapse.to(device)
        model = cls(config, feature_source, denoiser, text_encoder, codec, vocoder, synapse)
        model.built_with_weights = bool(weights)
        return model

    @staticmethod
    def build_synapse(config: MelFusionConfig, feature_source, denoiser, codec) -> Synapse:
        """The synapse for these parts: image and music layers paired (``config.synapse.pairing``), with their
        token counts probed on the meta device (no weights read)."""
        syn = config.synapse
        image_names = list(syn.image_layers or [info.name for info in feature_source.layers])
        music_names = list(syn.music_layers or [info.name for info in denoiser.layers])
        image_names, music_names = injection_points(syn, image_names, music_names)  # kv: as they are
        # the feature source must capture exactly the layers the synapse reads (e.g. encoder taps): before
        # this it kept its default decoder layers and the synapse found none of its own, a silent no-op
        feature_source.select_layers(image_names)
        image_layers = feature_source.probe_layers()
        music_layers = denoiser.probe_layers(music_names, probe_shape(config, codec, denoiser))
        pairs = pair_layers(image_layers, music_layers, syn.pairing, syn.pairs)
        return Synapse([p.image for p in pairs], [p.music for p in pairs], mixer=syn.mixer.name,
                       aligner=syn.aligner.name, mixer_params=syn.mixer.params, aligner_params=syn.aligner.params)

    # -- saving and loading -------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model to folder ``path``.

        Written: the config as JSON; the denoiser's weights in its own
        sub-folder (``MusicDenoiser.save_weights``: for a UNet, ``unet/`` as a
        diffusers folder, loadable by diffusers alone); the synapse (mixer and
        aligners) as ``synapse.safetensors``. Frozen parts loaded from
        published weights (a hub id or folder in the config) are referenced,
        not copied; other frozen modules (random or trained from scratch, as in
        the tiny preset) are saved as ``<part>.<module>.safetensors``.

        The folder is written beside ``path`` and swapped in whole, so at every
        instant ``path`` holds the complete earlier model or the complete new
        one, even if the process is killed (leftovers of a killed save are
        removed by the next one). ``path`` may be new, an empty folder or an
        earlier save; a file, or a folder holding anything else, is refused
        (``ValueError`` naming what is there) and left untouched. Weights
        holding NaN or infinities are refused before anything is written.
        """
        return save_model(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: Any = None, dtype: torch.dtype | None = None,
                        revision: str | None = None) -> MelFusion:
        """Load a model written by :meth:`save_pretrained`: a local folder, the name of a model shipped in the
        package (``"mini"``, the embedded default; a local folder of that name wins), or a hub id when online."""
        sync_progress_bars()
        return load_model(cls, path, device=device, dtype=dtype, revision=revision)

    def add_lora(self, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 target_modules: Sequence[str] | None = None) -> dict[str, Any]:
        """Add LoRA adapters (rank ``rank``, scale ``alpha / rank``) to the music denoiser's attention projections
        (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` by default); ``save_pretrained`` then writes only the
        adapters and the synapse, naming this model as their base (see :mod:`melfusion.lora`)."""
        from .lora import DEFAULT_TARGETS, add_lora

        return add_lora(self, rank, alpha, dropout, DEFAULT_TARGETS if target_modules is None else target_modules)

    def compile(self, **kwargs: Any) -> MelFusion:
        """``torch.compile`` the music denoiser in place (``kwargs`` go to ``torch.compile``: ``mode``,
        ``backend``, ``dynamic``, ...); returns ``self``. The synapse's per-step image features reach the compiled
        graph as tensors, so new steps, pictures and seeds reuse it (one graph, no recompiles: ``tests/test_gpu_ready.py``);
        another batch size, clip length or prompt length is another shape, compiled once more unless
        ``dynamic=True``. The first generation after it pays the compilation."""
        self.denoiser.compile(**kwargs)
        return self

    @contextlib.contextmanager
    def image_strength(self, strength: float) -> Iterator[MelFusion]:
        """Within the block, the picture's strength is ``strength``: 1 as trained, 0 text only, between them
        every synapse weight scaled by it (each layer's mixed keys and values move that fraction of the way
        from the text-only ones: the same as scaling every alpha for the linear mixers, and a blend of the
        mixer's output with the text-only one for any other). ``with model.image_strength(0.5): model.generate(...)``;
        the gradio app's "image strength" slider. Values above 1 would extrapolate past the trained mix and are
        refused."""
        strength = finite_float(strength, "strength")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength: expected a number in [0, 1] (1 as trained, 0 text only), got {strength:g}")
        if self.synapse_hook is None:
            if strength != 1.0:
                raise ValueError("strength: this model has no synapse (synapse.enabled is false): the picture is "
                                 "not used, so its strength cannot change")
            yield self
            return
        state = self.synapse_hook.state
        previous, state.strength = state.strength, strength
        try:
            yield self
        finally:
            state.strength = previous

    #: the order in which generation runs the parts (model CPU offload chains them in it)
    OFFLOAD_ORDER = ("text_encoder", "feature_source", "denoiser", "codec", "vocoder")

    def enable_model_cpu_offload(self, device: Any = "cuda") -> MelFusion:
        """Keep every part on the CPU and move each weight module to ``device`` only while it runs (accelerate's
        ``cpu_offload_with_hook``, chained in :attr:`OFFLOAD_ORDER`: a module's first forward offloads the one
        before it). Peak accelerator memory is then about the largest part (Tango's UNet in the paper preset)
        plus activations, for about one transfer of each part per generation. The synapse (small) stays on
        ``device``. Returns ``self``; :meth:`to` undoes it."""
        from accelerate import cpu_offload_with_hook

        device = torch.device(device)
        self.to("cpu")  # removes any earlier offload hooks too
        hooks, previous = [], None
        for name in self.OFFLOAD_ORDER:
            for module in getattr(self, name).stored_modules().values():
                if next(module.parameters(), None) is None:
                    continue
                _, previous = cpu_offload_with_hook(module, execution_device=device, prev_module_hook=previous)
                hooks.append(previous)
        if self.synapse is not None:
            self.synapse.to(device)
        self.offload = {"device": device, "hooks": hooks}
        return self

    def disable_model_cpu_offload(self) -> None:
        """Remove the offload hooks (the weights stay where they are: call :meth:`to` to place them)."""
        for hook in (self.offload or {}).get("hooks", []):
            hook.remove()
        self.offload = None

    def _offload_all(self) -> None:
        """Back to the CPU with every offloaded module (a generation starts with none on the accelerator)."""
        for hook in (self.offload or {}).get("hooks", []):
            hook.offload()

    # -- devices ------------------------------------------------------------------------
    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> MelFusion:
        """Move every part (and the synapse) to ``device`` and, for the parts, ``dtype``; returns ``self``.

        The synapse's weights stay float32 (they are few, and mixing is computed in the music model's dtype).
        Cached image features are dropped.
        """
        device, dtype = check_device(device), check_dtype(dtype)
        if device is not None:
            self.disable_model_cpu_offload()
        if device is not None and torch.device(device).type == "meta":
            raise ValueError("device: 'meta' holds no weights: moving a model there would discard them; build "
                             "architectures on it with MelFusion.from_config(config, weights=False, device='meta')")
        for name in PARTS:
            getattr(self, name).to(device=device, dtype=dtype)
        if self.synapse is not None and device is not None:
            self.synapse.to(device)
        self.feature_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        """Where generation computes: the denoiser's device, or the offload device while offload is enabled."""
        if self.offload is not None:
            return self.offload["device"]
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    def mel_front_end(self) -> Any:
        """The :class:`~melfusion.datasets.mel.MelFrontEnd` whose log-mel :attr:`GenerationOutput.mel` holds: the
        config's (rate, hop, bands) for a mel codec, whose decoded latent is that log-mel; for a waveform codec
        the one that measures the output audio (its rate, the same hop in seconds)."""
        from .datasets.mel import MelFrontEnd

        c = self.config
        if self.codec.output == "mel":
            return MelFrontEnd(sample_rate=c.sample_rate, hop_length=c.hop_length, n_mels=c.n_mels)
        rate = self.sample_rate
        hop = max(1, int(round(c.hop_length * rate / c.sample_rate)))
        return MelFrontEnd(sample_rate=rate, hop_length=hop, n_mels=c.n_mels)

    def mel_params(self) -> dict[str, Any]:
        """How :attr:`GenerationOutput.mel` is computed, as :func:`melfusion.plots.spectrogram_png` takes it:
        ``sample_rate``, ``hop_length``, ``fmin``, ``fmax`` (Hz) and ``values`` (the natural log of the mel
        magnitude, floored at the front end's ``log_floor``)."""
        fe = self.mel_front_end()
        return {"sample_rate": fe.sample_rate, "hop_length": fe.hop_length, "fmin": fe.fmin, "fmax": fe.fmax,
                "values": "ln_amplitude"}

    # -- shapes -----------------------------------------------------------------------
    def probe_shape(self) -> tuple[int, ...]:
        """The music latent ``(C, *axes)`` at the config's clip length, where the synapse's layers were probed."""
        return probe_shape(self.config, self.codec, self.denoiser)

    def latent_shape(self, seconds: float, *, round_up: bool = True) -> tuple[int, ...]:
        """``(C, *axes)`` of the music latent for ``seconds``: enough frames to cover the clip (``round_up``) or
        at most the clip, in a length the denoiser can process. A ``ValueError`` naming ``seconds`` when none."""
        c = self.config
        shape = self.codec.latent_shape(seconds, c.sample_rate, c.hop_length, c.n_mels)
        return tuple(self.denoiser.latent_shape(shape, round_up=round_up))

    def latent_hw(self, seconds: float, name: str = "seconds", *, round_up: bool = False) -> tuple[int, ...]:
        """The latent's axes (without channels) for ``seconds`` (see :meth:`latent_shape`); ``name`` is the argument
        an error names."""
        try:
            return self.latent_shape(seconds, round_up=round_up)[1:]
        except ValueError as exc:
            raise ValueError(f"{name}: {seconds} s is too short for this model") from exc

    def music_tokens(self, text_tokens: int, latent_hw: Sequence[int] | None = None
                     ) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Key count and token grid of each paired music layer for a latent with axes ``latent_hw``."""
        return music_tokens(self, text_tokens, latent_hw)

    def image_features(self, images: torch.Tensor, timesteps: torch.Tensor | Sequence[int], text_tokens: int,
                       mode: str | None = None, latent_hw: Sequence[int] | None = None) -> FeatureCache:
        """Image features for image ``timesteps``, aligned to the music layers (``text_tokens`` keys where they
        attend text).

        Each timestep's captured keys/values are aligned as soon as they are
        captured, so only the aligned tensors are kept (for the paper's
        configuration, kilobytes per step instead of about 60 MB). The result
        is remembered in ``self.feature_cache`` under the image content and
        every setting that shapes it, so a repeated image skips the image UNet.
        """
        return image_features(self, images, timesteps, text_tokens, mode, latent_hw)

    def check_memory(self, seconds: float, batch: int, branches: int, latent_shape: Sequence[int]) -> None:
        """Refuse, before anything is allocated, a generation whose estimated memory exceeds the device's.

        The denoiser's batch is ``batch`` clips times ``branches`` guidance branches; the estimate is the
        denoiser's lower bound (``MusicDenoiser.activation_bytes``) plus the audio (about 128 bytes per output
        sample for the decoder's intermediates), so what it refuses would not have fitted.
        """
        shape = tuple(latent_shape)
        if len(shape) == 2:  # the earlier (frames, bins) form
            shape = (self.denoiser.in_channels, *shape)
        activations = self.denoiser.activation_bytes(shape, batch * branches)
        audio = batch * int(seconds * self.sample_rate) * 128
        dev = self.device
        limit = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
        check_size(activations + audio, "seconds" if batch == 1 else "num_samples",
                   f"{batch} clip(s) of {seconds:g} s ({branches} guidance branches each)", limit=limit,
                   hint="generate fewer samples or a shorter clip")

    # -- Algorithm 2, step by step --------------------------------------------------------
    def check_inputs(self, image: Any, text: Any, num_inference_steps=None, guidance_scale=None,
                     image_guidance_scale=None, seconds=None, num_samples=None, image_steps=None,
                     negative_text: str | Sequence[str] = "") -> _Request:
        """Every argument of :meth:`generate` checked (a ``ValueError`` naming the first bad one)."""
        s = self.config.sampling
        texts = check_texts(text, "text")
        negatives = ([negative_text] * len(texts) if isinstance(negative_text, str)
                     else check_texts(negative_text, "negative_text"))
        if len(negatives) != len(texts):
            raise ValueError(f"negative_text: expected a string or one per text ({len(texts)}), "
                             f"got {negative_text!r}")
        steps = positive_int(num_inference_steps if num_inference_steps is not None else s.num_inference_steps,
                             "num_inference_steps")
        samples = positive_int(num_samples if num_samples is not None else s.num_samples, "num_samples")
        g_text = _guidance(guidance_scale if guidance_scale is not None else s.guidance_scale, "guidance_scale")
        g_image = image_guidance_scale if image_guidance_scale is not None else s.image_guidance_scale
        if g_image is not None:
            g_image = _guidance(g_image, "image_guidance_scale")
        seconds = finite_float(seconds if seconds is not None else s.seconds, "seconds", low=0, low_open=True,
                               high=MAX_SECONDS)
        if image_steps is not None:
            image_steps = positive_int(image_steps, "image_steps")
        if image is not None and self.synapse is None:
            raise ValueError("image: this model has no synapse (config.synapse.enabled is false)")
        return _Request(texts, negatives, steps, samples, g_text, g_image, seconds,
                        image_steps if image_steps is not None else s.image_steps,
                        image is not None and self.synapse is not None)

    def make_scheduler(self, scheduler: str | type | None = None):
        """A diffusers scheduler for the denoiser's noise schedule: a short name (``ddim``, ``dpm_solver++``,
        ``cosine_dpm_solver``...), a class or a class name of the family; None: the config's, else the
        denoiser's default."""
        return self.denoiser.noise_schedule.make_scheduler(scheduler if scheduler is not None
                                                           else self.config.sampling.scheduler)

    def encode_prompt(self, texts: Sequence[str], negatives: Sequence[str], samples: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cond_emb, cond_mask, null_emb, null_mask)``: each text repeated ``samples`` times, then the
        unconditional rows (the negative texts, or the text encoder's "no text")."""
        prompts = [t for t in texts for _ in range(samples)]
        nulls = [n for n in negatives for _ in range(samples)]
        batch = len(prompts)
        enc = self.text_encoder
        if all(n == "" for n in nulls) and enc.null_text is None:
            emb, mask = concat_text([enc(prompts), enc.unconditional(batch)])
        else:  # one padded batch, as the empty prompt always was
            emb, mask = enc(prompts + nulls)
        emb = emb.to(self.device, self.dtype)
        mask = mask.to(self.device)
        return emb[:batch], mask[:batch], emb[batch:], mask[batch:]

    def prepare_image_features(self, image: Any, scheduler: Any, request: _Request, text_tokens: int,
                               latent_shape: Sequence[int]) -> tuple[FeatureCache, list[int], int]:
        """The aligned image features for every step: ``(cache, image timestep of each step, images)``."""
        # each image resized on its own to the feature source's input size: a row never depends on its batch
        images = load_images(image, "image", size=getattr(self.feature_source, "resolution", None)).to(self.device)
        if images.shape[0] not in (1, len(request.texts)):
            raise ValueError(f"image: got {images.shape[0]} images for {len(request.texts)} texts; "
                             f"give 1 or one per text")
        per_step = music_to_image_timesteps(self.denoiser.noise_schedule, scheduler,
                                            self.feature_source.noise_schedule)
        grid = cap_timesteps(image_timesteps(sorted(set(per_step), reverse=True), request.image_steps),
                             self.config.synapse.image_timestep_max)
        cache = self.image_features(images, grid, text_tokens=text_tokens, latent_hw=tuple(latent_shape[1:]))
        per_row = request.batch // images.shape[0]
        if images.shape[0] > 1 and per_row > 1:  # one image per text, each repeated per sample
            cache = cache.map(lambda _, k, v: (k.repeat_interleave(per_row, 0), v.repeat_interleave(per_row, 0)))
        # a single image is tiled over the batch by the synapse itself, without copies here
        return cache, per_step, images.shape[0]

    def prepare_latents(self, shape: Sequence[int], scheduler: Any, generator: Any = None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """The starting latent ``(batch, *shape)``: ``latents`` if given, else Gaussian noise from ``generator``
        (one ``torch.Generator``, or one per row), scaled by the scheduler's initial sigma."""
        shape = tuple(int(n) for n in shape)
        if latents is not None:
            noise = check_latents(latents, shape).detach().to(torch.float32)
        elif isinstance(check_generator(generator), (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"generator: got {len(generator)} generators for a batch of {shape[0]}")
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32, device=g.device)
                               .cpu() for g in generator])
        else:
            dev = generator.device if generator is not None else "cpu"
            noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=dev).cpu()
        return noise.to(self.device) * getattr(scheduler, "init_noise_sigma", 1.0)

    def decode(self, latents: torch.Tensor, seconds: float, peak_normalize: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
        """Latents -> ``(waveforms, mel)`` cut to exactly ``seconds`` (the latent covered at least that)."""
        decoded = self.codec.decode(latents.to(self.dtype)).float()
        if not bool(torch.isfinite(decoded).all()):
            raise NonFiniteError("model: the codec decoded NaN or infinite values; nothing was written")
        waves_t = self.vocoder(decoded).float()
        waves = waves_t.cpu().numpy()
        if not np.isfinite(waves).all():
            raise NonFiniteError("model: the decoder returned NaN or infinite audio; nothing was written")
        waves = waves[..., : int(round(seconds * self.sample_rate))]
        c = self.config
        if self.codec.output == "mel":
            mel = decoded[..., : -(-int(round(seconds * c.sample_rate)) // c.hop_length), :]
            mel_np = mel[:, 0].cpu().numpy() if mel.ndim == 4 else mel.cpu().numpy()
        else:  # a waveform codec: the mel of the mix, for plots
            mel_np = _display_mel(waves, self.mel_front_end())
        if peak_normalize:
            peak = np.abs(waves).max(axis=tuple(range(1, waves.ndim)), keepdims=True)
            waves = np.where(peak > 0.99, waves * (0.99 / np.maximum(peak, 1e-12)), waves)
        return waves.astype(np.float32), mel_np

    @torch.no_grad()
    def generate(
        self,
        image: Any = None,
        text: str | Sequence[str] = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        seed: int | None = 0,
        seconds: float | None = None,
        num_samples: int | None = None,
        scheduler: str | type | None = None,
        image_steps: int | None = None,
        negative_text: str | Sequence[str] = "",
        progress: bool = True,
        peak_normalize: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: StepCallback | None = None,
        *,
        images: Sequence[Any] | None = None,
        texts: Sequence[str] | None = None,
        durations: Sequence[float] | None = None,
        crossfade: float | None = None,
        audio: Any = None,
        continue_seconds: float | None = None,
        regenerate: tuple[float, float] | None = None,
        seam: float | None = None,
        window_seconds: float | None = None,
        window_overlap: float | None = None,
        window_batch: int | None = None,
    ) -> GenerationOutput:
        """Music for ``image`` and ``text``; see DESIGN.md and the module docstring.

        ``image_steps`` (default: the config's ``sampling.image_steps``, None:
        every step) runs the image UNet on that many timesteps spread over
        the sampling grid; each step then uses the nearest one's features.
        ``peak_normalize`` scales a waveform whose peak exceeds 0.99 down to
        0.99 (off: the decoder's output as is, e.g. for parity checks).
        ``generator`` (a ``torch.Generator`` or one per clip) replaces ``seed``; ``latents`` gives the
        starting noise itself, ``(num_texts * num_samples, *latent shape)``. ``negative_text`` is one text for
        all or one per text. ``callback_on_step_end(model, step, timestep, {"latents": ...})`` runs after
        every step; returning ``{"latents": x}`` replaces the latents, ``{"stop": True}`` ends sampling early.
        ``scheduler``: a name, class or class name of the denoiser's scheduler family.

        **Beyond one clip** (:mod:`melfusion.longform`, docs/long-form.md): ``seconds`` longer than the window
        (``window_seconds``, default the model's clip ``config.sampling.seconds``) is denoised in overlapping
        windows (``window_overlap`` seconds, default the config's ``sampling.window_overlap``, else half a
        window; ``window_batch`` windows per denoiser call, default 8) blended at every step. A storyboard: ``images=[...]`` (one picture per section) with
        ``texts=[...]`` or ``text``, and ``durations=[...]`` or ``seconds``; sections crossfade over
        ``crossfade`` seconds (default a fifth of the window, at most 1 s). ``audio`` (a path, an array at
        the model's rate or ``(array, rate)``) with ``continue_seconds=S`` continues it, with
        ``regenerate=(t0, t1)`` repaints that span; the given audio is returned unchanged outside the new
        music, crossfaded over ``seam`` seconds (default 0.05) at each seam.
        """
        self._offload_all()  # with model CPU offload, start with no part on the accelerator
        long_args = (images, texts, durations, crossfade, audio, continue_seconds, regenerate, seam, window_overlap,
                     window_batch)
        if any(a is not None for a in long_args) or self._beyond_window(seconds, window_seconds):
            return self._generate_long(image, text, num_inference_steps, guidance_scale, image_guidance_scale, seed,
                                       seconds, num_samples, scheduler, image_steps, negative_text, progress,
                                       peak_normalize, generator, latents, callback_on_step_end, images, texts,
                                       durations, crossfade, audio, continue_seconds, regenerate, seam,
                                       window_seconds, window_overlap, window_batch)
        req = self.check_inputs(image, text, num_inference_steps, guidance_scale, image_guidance_scale, seconds,
                                num_samples, image_steps, negative_text)
        callback_on_step_end = check_callback(callback_on_step_end)
        check_generator(generator)  # before any work
        seed = check_seed(seed)
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        sched = self.make_scheduler(scheduler)
        schedule = self.denoiser.noise_schedule
        if schedule.family == "ddpm":
            most = sched.config.num_train_timesteps - int(sched.config.get("steps_offset", 0) or 0)
            if req.steps > most:
                raise ValueError(f"num_inference_steps: expected at most {most} for this scheduler and the model's "
                                 f"{sched.config.num_train_timesteps} training timesteps, got {req.steps}")
        elif req.steps > MAX_STEPS:
            raise ValueError(f"num_inference_steps: expected at most {MAX_STEPS}, got {req.steps}")
        if int(round(req.seconds * self.sample_rate)) < 1:
            raise ValueError(f"seconds: {req.seconds:g} s is shorter than one sample at {self.sample_rate} Hz")
        shape = (req.batch, *self.latent_shape(req.seconds, round_up=True))
        self.check_memory(req.seconds, req.batch, req.branches, shape[1:])
        sched.set_timesteps(req.steps, device=self.device)

        cond_emb, cond_mask, null_emb, null_mask = self.encode_prompt(req.texts, req.negatives, req.samples)
        cache, per_step = None, None
        if req.use_image:
            cache, per_step, _ = self.prepare_image_features(image, sched, req, cond_emb.shape[1], shape[1:])

        # branches, concatenated on the batch axis: [no text, text (+image)] or [no text, text, text+image]
        three = req.branches == 3
        n = req.branches
        emb_all = torch.cat([null_emb, cond_emb] + ([cond_emb] if three else []))
        mask_all = torch.cat([null_mask, cond_mask] + ([cond_mask] if three else []))
        rows = torch.zeros(n * req.batch, dtype=torch.bool, device=self.device)
        rows[-req.batch:] = req.use_image
        timing = torch.tensor([[0.0, req.seconds]], device=self.device).expand(n * req.batch, 2)
        start = self.prepare_latents(shape, sched, generator, latents)
        hook, g_text, g_image = self.synapse_hook, req.g_text, req.g_image

        def predict(x: torch.Tensor, t: Any, i: int) -> torch.Tensor:
            x = torch.cat([x] * n).to(self.dtype)
            if hook is not None:
                t_img = torch.tensor(per_step[i], device=self.device) if per_step is not None else t
                hook.set_features(cache.at(per_step[i]) if cache is not None else None, timestep=t_img,
                                  image_rows=rows)
            try:
                out = self.denoiser(x, t, emb_all, mask_all, timing).float().chunk(n)
            finally:
                if hook is not None:
                    hook.set_features(None)
            if three:
                return out[0] + g_text * (out[1] - out[0]) + g_image * (out[2] - out[1])
            return out[0] + g_text * (out[1] - out[0])

        def nonfinite(i: int, t: Any) -> Exception:
            return NonFiniteError(
                f"guidance_scale: the music latent became NaN or infinite at timestep {float(t):g} (step {i}; guidance "
                f"{g_text:g}{f', image guidance {g_image:g}' if three else ''}); use smaller guidance scales "
                f"(or check the starting latents and the model's weights)")

        final = denoise(self, start, sched, predict, generator=generator, callback=callback_on_step_end,
                        progress=progress, on_nonfinite=nonfinite, model_timesteps=schedule.model_timesteps(sched))
        waves, mel = self.decode(final, req.seconds, peak_normalize)
        prompts = [t for t in req.texts for _ in range(req.samples)]
        return GenerationOutput(waveforms=waves, sample_rate=self.sample_rate, mel=mel, texts=prompts,
                                mel_params=self.mel_params())


    def _beyond_window(self, seconds: Any, window_seconds: Any) -> bool:
        """Whether ``seconds`` (when a valid number) is longer than one window of the denoiser."""
        if seconds is None or isinstance(seconds, bool) or not isinstance(seconds, (int, float, np.number)):
            return window_seconds is not None
        window = self.config.sampling.seconds if window_seconds is None else window_seconds
        try:
            return np.isfinite(seconds) and float(seconds) > float(window) + 1e-9
        except (TypeError, ValueError):
            return True  # a bad window_seconds: the long-form checks name it

    def _generate_long(self, image, text, num_inference_steps, guidance_scale, image_guidance_scale, seed, seconds,
                       num_samples, scheduler, image_steps, negative_text, progress, peak_normalize, generator,
                       latents, callback, images, texts, durations, crossfade, audio, continue_seconds, regenerate,
                       seam, window_seconds, window_overlap, window_batch) -> GenerationOutput:
        from .longform import check_long_request, generate_long

        if not isinstance(negative_text, str):
            raise ValueError("negative_text: a long piece or storyboard takes one negative text for all sections")
        req = self.check_inputs(image if images is None else images, text if texts is None else "",
                                num_inference_steps, guidance_scale, image_guidance_scale,
                                seconds if continue_seconds is None and regenerate is None else None, num_samples,
                                image_steps, negative_text)
        lreq = check_long_request(self, image, text, seconds, images, texts, durations, crossfade, window_seconds,
                                  window_overlap, window_batch, audio, continue_seconds, regenerate, seam)
        callback = check_callback(callback)
        check_generator(generator)
        seed = check_seed(seed)
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        sched = self.make_scheduler(scheduler)
        if self.denoiser.noise_schedule.family == "ddpm":
            most = sched.config.num_train_timesteps - int(sched.config.get("steps_offset", 0) or 0)
            if req.steps > most:
                raise ValueError(f"num_inference_steps: expected at most {most} for this scheduler, got {req.steps}")
        elif req.steps > MAX_STEPS:
            raise ValueError(f"num_inference_steps: expected at most {MAX_STEPS}, got {req.steps}")
        return generate_long(self, req, lreq, sched, generator, latents, callback, progress, peak_normalize)


def probe_shape(config: MelFusionConfig, codec: Any, denoiser: Any) -> tuple[int, ...]:
    """The music latent ``(C, *axes)`` at the config's clip length (where the synapse's layers are probed)."""
    shape = codec.latent_shape(config.sampling.seconds, config.sample_rate, config.hop_length, config.n_mels)
    return tuple(denoiser.latent_shape(shape, round_up=True))


def _display_mel(waves: np.ndarray, front_end: Any) -> np.ndarray:
    """Log-mel ``(batch, frames, mels)`` of each clip's channel mix by ``front_end``, for spectrogram plots."""
    mono = waves.mean(axis=1) if waves.ndim == 3 else waves
    return front_end.batch(torch.from_numpy(np.ascontiguousarray(mono))).cpu().numpy()


def check_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a floating torch dtype (``torch.bfloat16`` or its name ``"bfloat16"``), or a ValueError."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype (float32, float16, bfloat16), got {dtype!r}")
    return dtype


def check_device(device: Any) -> Any:
    """``device`` if torch can use it here; a ``ValueError`` naming ``device`` otherwise (e.g. cuda without CUDA)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"device: {device!r}: there is one CPU device, 'cpu'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but torch sees no CUDA device on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device: {device!r} was asked for, but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps", "meta", "xpu"):
        raise ValueError(f"device: {device!r} is not supported (cpu, cuda, mps)")
    return device


_positive_int = positive_int  # the shared check (melfusion.checks), under the name this module's callers use


def check_generator(generator: Any) -> Any:
    """``generator`` if it is a ``torch.Generator``, a list or tuple of them, or None; a ``ValueError`` naming
    ``generator`` otherwise."""
    for g in generator if isinstance(generator, (list, tuple)) else [generator]:
        if g is not None and not isinstance(g, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or a list of them (one per clip), got "
                             f"{type(g).__name__}")
    return generator


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """``seed`` as an int torch's generator takes (``[-2**63, 2**64)``), or None."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name}: expected an int, got {seed!r}")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"{name}: expected an int in [-2**63, 2**64), got {seed}")
    return int(seed)


#: the largest guidance scale generate takes: beyond it a float32 prediction is noise or overflows
MAX_GUIDANCE = 1000.0
#: the most sampling steps generate takes for a continuous (edm, flow) schedule; ddpm: its training timesteps
MAX_STEPS = 10_000
#: the longest clip generate is asked for (a day); memory is checked separately, before anything is allocated
MAX_SECONDS = 86_400.0


def _guidance(value: Any, name: str) -> float:
    return finite_float(value, name, low=0, high=MAX_GUIDANCE)

