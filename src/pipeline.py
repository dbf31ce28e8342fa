"""``MelFusion``: composes the parts; ``generate()`` is the paper's Algorithm 2.

1. encode the image and run the feature source's trajectory over the sampling
   timesteps (DDIM inversion with an empty prompt), capturing the image UNet's
   decoder self-attention keys/values per timestep; align them once to the
   music layers (the cache is reused by every step, guidance branch and sample);
2. encode the text; start the music latent from Gaussian noise;
3. at each step, the installed synapse mixes the image keys/values of that
   timestep into the music UNet's decoder cross-attention;
4. classifier-free guidance (the unconditional branch is empty text and no
   image; with ``image_guidance_scale`` a third, text-only branch), then the
   codec decodes the latent to a mel spectrogram and the vocoder makes audio.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.loading import _is_hub_id
from .backbones.text import check_texts
from .checks import NonFiniteError, check_size, finite_float, positive_int
from .config import SCHEDULERS, MelFusionConfig
from .files import atomic_path, check_output
from .images import load_images
from .synapse.features import FeatureCache, FeatureStore, tensor_digest
from .synapse.install import SynapseHandle, install
from .synapse.wiring import Synapse, probe_layers

__all__ = ["MelFusion", "GenerationOutput", "make_scheduler", "noise_schedule", "image_timesteps", "cap_timesteps", "SCHEDULERS"]


def make_scheduler(name: str, prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear",
                   beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000):
    """A diffusers scheduler by name (``ddim``, ``ddpm``, ``dpm_solver++``) for a model's training schedule.

    The defaults are Stable Diffusion's (and Tango's) schedule; a denoiser
    gives its own through its ``noise_schedule`` (AudioLDM: 0.0015 to 0.0195).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                  beta_schedule=beta_schedule, prediction_type=prediction_type)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    if name == "dpm_solver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    raise ValueError(f"scheduler: unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")


@dataclass
class GenerationOutput:
    """``waveforms`` float32 ``(num_samples, samples)`` in [-1, 1]; ``mel`` ``(num_samples, frames, mels)``."""

    waveforms: np.ndarray
    sample_rate: int
    mel: np.ndarray
    texts: list[str] = field(default_factory=list)

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
        """Write the mel spectrogram of sample ``index`` as a PNG (time left to right, low pitch at the bottom)."""
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
        return spectrogram_png(one, path, overwrite=overwrite)


#: the audio formats GenerationOutput.save writes, by suffix
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def output_paths(path: str | Path, count: int) -> list[Path]:
    """The files :meth:`GenerationOutput.save` writes for ``count`` samples: ``path``, or ``stem_i.suffix``."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.wav'}") for i in range(count)]


class MelFusion:
    """An image-and-text-to-music model composed from registry parts."""

    def __init__(self, config: MelFusionConfig, feature_source, denoiser, text_encoder, codec, vocoder,
                 synapse: Synapse | None):
        self.config = config
        self.feature_source = feature_source
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.codec = codec
        self.vocoder = vocoder
        self.synapse = synapse
        self._built_with_weights = True  # from_config(weights=False) clears it: then save_pretrained keeps everything
        # aligned image features of recent images, reused across calls (see image_features)
        self.feature_cache = FeatureStore(max_items=8)
        self._handle: SynapseHandle | None = None
        if synapse is not None:
            self._handle = install(denoiser.unet, synapse.mixer, layers=synapse.music_layer_names,
                                   which=config.synapse.music_attention)

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
        model._built_with_weights = bool(weights)
        return model

    @staticmethod
    def build_synapse(config: MelFusionConfig, feature_source, denoiser, codec) -> Synapse:
        syn = config.synapse
        fs_unet, music_unet = feature_source.unet, denoiser.unet
        image_names = list(syn.image_layers or feature_source.layer_names)
        music_names = syn.music_layers or denoiser.layer_names
        # the feature source must capture exactly the layers the synapse reads (e.g. encoder taps): before
        # this it kept its default decoder layers and the synapse found none of its own, a silent no-op
        feature_source.layer_names = image_names
        latent = feature_source.latent_size
        image_layers = probe_layers(fs_unet, image_names, syn.image_attention,
                                    (fs_unet.config.in_channels, latent, latent))
        height, width = music_latent_hw(config, codec)
        music_layers = probe_layers(music_unet, music_names, syn.music_attention,
                                    (music_unet.config.in_channels, height, width))
        return Synapse(image_layers, music_layers, mixer=syn.mixer.name, aligner=syn.aligner.name,
                       mixer_params=syn.mixer.params, aligner_params=syn.aligner.params)

    # -- saving and loading -------------------------------------------------------------
    PARTS = ("feature_source", "denoiser", "text_encoder", "codec", "vocoder")
    CONFIG_NAME = "melfusion_config.json"
    INDEX_NAME = "melfusion_weights.json"

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model to folder ``path``.

        Written: the config as JSON; the music UNet as a diffusers folder
        (``unet/``: ``config.json`` + safetensors, loadable by diffusers
        alone); the synapse (mixer and aligners) as ``synapse.safetensors``.
        Frozen parts are referenced by the hub id or folder in the config
        (``pretrained``) and not copied; a frozen model that has no such
        reference (random or trained from scratch, as in the tiny preset) is
        saved as ``<part>.<module>.safetensors``.

        The folder is written beside ``path`` and swapped in whole, so at every
        instant ``path`` holds the complete earlier model or the complete new
        one, even if the process is killed (leftovers of a killed save are
        removed by the next one). ``path`` may be new, an empty folder or an
        earlier save; a file, or a folder holding anything else, is refused
        (``ValueError`` naming what is there) and left untouched. Weights
        holding NaN or infinities are refused before anything is written.
        """
        import json

        from safetensors.torch import save_model

        from .checks import check_finite_tensors
        from .files import replace_folder

        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise ValueError(f"path: expected a folder path, got {path!r}")
        path = Path(path)
        frozen = self._frozen_to_store()
        check_finite_tensors(self.denoiser.unet.state_dict(), "model: the music UNet")
        for (part_name, attr), module in frozen.items():
            check_finite_tensors(module.state_dict(), f"model: {part_name}.{attr}")
        if self.synapse is not None:
            check_finite_tensors(self.synapse.state_dict(), "model: the synapse")
        with replace_folder(path, "path", owned=is_model_entry) as tmp:
            self.config.save(tmp / self.CONFIG_NAME)
            self.denoiser.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            stored: dict[str, list[str]] = {}
            for (part_name, attr), module in frozen.items():
                save_model(module, str(tmp / f"{part_name}.{attr}.safetensors"))
                stored.setdefault(part_name, []).append(attr)
            if self.synapse is not None:
                save_model(self.synapse, str(tmp / "synapse.safetensors"))
            index = {"format": "melfusion", "version": 1, "unet": "unet", "stored_frozen_modules": stored,
                     "synapse": "synapse.safetensors" if self.synapse is not None else None}
            (tmp / self.INDEX_NAME).write_text(json.dumps(index, indent=2))
        return path

    def _frozen_to_store(self) -> dict[tuple[str, str], torch.nn.Module]:
        """The frozen modules that save_pretrained copies (those without a published-weights reference)."""
        out = {}
        for part_name in self.PARTS:
            if part_name == "denoiser":
                continue
            part = getattr(self, part_name)
            for attr, module in _frozen_modules(part).items():
                if self._built_with_weights and _has_weights_reference(self.config, part_name, attr, part):
                    continue
                out[(part_name, attr)] = module
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: Any = None, dtype: torch.dtype | None = None,
                        revision: str | None = None) -> MelFusion:
        """Load a model written by :meth:`save_pretrained`: a local folder, the name of a model shipped in the
        package (``"mini"``, the embedded default; a local folder of that name wins), or a hub id when online."""
        import copy

        from .checks import check_finite_tensors

        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise ValueError(f"path: expected a model folder or a shipped model name, got {path!r}")
        device, dtype = check_device(device), check_dtype(dtype)
        folder = _resolve_model_folder(path, revision)
        index = read_index(folder)
        if index is None:
            raise OSError(f"model: {str(folder)!r} has no {cls.INDEX_NAME}; was it written by save_pretrained?")
        config = MelFusionConfig.load(folder / cls.CONFIG_NAME, name="model config")
        stored = index.get("stored_frozen_modules", {})
        common = dict(device=device, dtype=dtype)
        parts = {}
        for part_name in cls.PARTS:
            part_cfg = getattr(config, part_name)
            if part_name == "denoiser":
                params = copy.deepcopy(part_cfg.params)
                spec = dict(params.get("unet") or {})
                spec.update({"pretrained": str(folder), "subfolder": index.get("unet", "unet")})
                params["unet"] = spec
                parts[part_name] = _loading(folder / index.get("unet", "unet"),
                                            part_cfg.model_copy(update={"params": params}), common)
                check_finite_tensors(parts[part_name].unet.state_dict(),
                                     f"model: {str(folder / index.get('unet', 'unet'))!r}", "refused to load")
                continue
            saved = stored.get(part_name, [])
            part = part_cfg.build(weights=not saved, **common)
            for attr in saved:
                module = _frozen_modules(part).get(attr)
                file = folder / f"{part_name}.{attr}.safetensors"
                if module is None:
                    raise OSError(f"model: {str(folder / cls.INDEX_NAME)!r} lists {part_name}.{attr}, which the "
                                  f"config's {part_name} does not have")
                if not file.is_file():
                    raise OSError(f"model: missing weights file {str(file)!r}")
                _load_safetensors(module, file, device)
                if dtype is not None:
                    module.to(dtype=dtype)
            parts[part_name] = part
        synapse = None
        if config.synapse.enabled:
            try:
                synapse = cls.build_synapse(config, parts["feature_source"], parts["denoiser"], parts["codec"])
            except ValueError as exc:
                raise OSError(f"model: the parts saved in {str(folder)!r} do not fit together ({exc})") from None
            file = folder / (index.get("synapse") or "synapse.safetensors")
            if not file.is_file():
                raise OSError(f"model: missing weights file {str(file)!r}")
            _load_safetensors(synapse, file, None)
            if device is not None:  # as from_config: the synapse stays float32, on the model's device
                synapse = synapse.to(device)
        return cls(config, **parts, synapse=synapse)

    # -- helpers --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.unet.parameters()).device

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    def image_features(self, images: torch.Tensor, timesteps: torch.Tensor | Sequence[int], text_tokens: int,
                       mode: str | None = None, latent_hw: tuple[int, int] | None = None) -> FeatureCache:
        """Image features for ``timesteps``, aligned to the music layers (``text_tokens`` keys where they attend text).

        Each timestep's captured keys/values are aligned as soon as they are
        captured, so only the aligned tensors are kept (for the paper's
        configuration, kilobytes per step instead of about 60 MB). The result
        is remembered in ``self.feature_cache`` under the image content and
        every setting that shapes it, so a repeated image skips the image UNet.
        """
        mode = mode or self.config.synapse.image_trajectory
        ts = tuple(sorted({int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()}))
        tokens, grids = self.music_tokens(int(text_tokens), latent_hw)
        key = self._feature_key(images, ts, (tuple(tokens), tuple(grids)), mode)
        cached = self.feature_cache.get(key)
        if cached is not None:
            return cached

        def align(t: int, records: dict) -> dict:
            step = FeatureCache()
            step.add(t, records)
            return self.synapse.align(step, tokens, grids).at(t)

        with torch.no_grad():
            latents = self.feature_source.encode(images)
            cache = self.feature_source.trajectory(latents, ts, mode=mode, transform=align)
        self.feature_cache.put(key, cache)
        return cache

    def music_tokens(self, text_tokens: int, latent_hw: tuple[int, int] | None = None
                     ) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Key count and token grid of each paired music layer for a music latent of ``latent_hw``.

        Layers that cross-attend to text have ``text_tokens`` keys; layers that
        attend over the music tokens (AudioLDM) have a grid that scales with
        the latent, probed at the config's clip length and rescaled here.
        """
        probe_hw = music_latent_hw(self.config, self.codec)  # where build_synapse probed the grids
        latent_hw = latent_hw or probe_hw
        tokens: list[int] = []
        grids: list[tuple[int, int] | None] = []
        for pair in self.synapse.pairs:
            grid = pair.music.grid
            if pair.music.tokens is None or grid is None:
                tokens.append(text_tokens)
                grids.append(None)
                continue
            factor = (max(1, round(probe_hw[0] / grid[0])), max(1, round(probe_hw[1] / grid[1])))
            hw = (-(-latent_hw[0] // factor[0]), -(-latent_hw[1] // factor[1]))
            tokens.append(hw[0] * hw[1])
            grids.append(hw)
        return tokens, grids

    def latent_hw(self, seconds: float, name: str = "seconds", *, round_up: bool = False) -> tuple[int, int]:
        """``(frames, bins)`` of the music latent for ``seconds``, frames cut (or, with ``round_up``, raised) to a
        multiple the UNet can halve.

        A ``ValueError`` naming ``name`` when the clip is too short for one.
        """
        height, width = music_latent_hw(self.config, self.codec, seconds, exact=round_up)
        multiple = 2 ** (len(self.denoiser.unet.config.block_out_channels) - 1)  # the UNet's downsampling
        height = -(-height // multiple) * multiple if round_up else height - height % multiple
        if height <= 0:
            raise ValueError(f"{name}: {seconds} s is too short for this model")
        return height, width

    def check_memory(self, seconds: float, batch: int, branches: int, latent_hw: tuple[int, int]) -> None:
        """Refuse, before anything is allocated, a generation whose estimated memory exceeds the device's.

        The denoiser's batch is ``batch`` clips times ``branches`` guidance branches. The estimate counts the widest
        UNet level's activations (about 16 tensors of the latent grid at the first level's width, alive at
        once) and the audio (about 128 bytes per output sample for the vocoder's intermediates): a lower
        bound of the real peak, so what it refuses would not have fitted.
        """
        height, width = latent_hw
        rows = batch * branches
        width0 = int(self.denoiser.unet.config.block_out_channels[0])
        activations = rows * height * width * width0 * 4 * 16
        audio = batch * int(seconds * self.sample_rate) * 128
        limit = None
        dev = self.device
        if dev.type == "cuda":
            limit = torch.cuda.get_device_properties(dev).total_memory
        check_size(activations + audio, "seconds" if batch == 1 else "num_samples",
                   f"{batch} clip(s) of {seconds:g} s ({branches} guidance branches each)", limit=limit,
                   hint="generate fewer samples or a shorter clip")

    def _feature_key(self, images: torch.Tensor, timesteps: tuple[int, ...], tokens: tuple, mode: str) -> tuple:
        fs = self.feature_source
        # learned aligners change in place while training: their parameter versions are part of the key
        versions = tuple(p._version for p in self.synapse.aligners.parameters())
        return (tensor_digest(images), timesteps, tokens, mode, id(fs), getattr(fs, "resolution", None),
                str(getattr(fs, "dtype", "")), str(getattr(fs, "device", "")), id(self.synapse), versions)

    # -- Algorithm 2 --------------------------------------------------------------------
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
        scheduler: str | None = None,
        image_steps: int | None = None,
        negative_text: str = "",
        progress: bool = True,
        peak_normalize: bool = True,
    ) -> GenerationOutput:
        """Music for ``image`` and ``text``; see DESIGN.md and the module docstring.

        ``image_steps`` (default: the config's ``sampling.image_steps``, None:
        every step) runs the image UNet on that many timesteps spread over
        the sampling grid; each step then uses the nearest one's features.
        ``peak_normalize`` scales a waveform whose peak exceeds 0.99 down to
        0.99 (off: the vocoder's output as is, e.g. for parity checks).
        """
        s = self.config.sampling
        texts = check_texts(text, "text")
        if not isinstance(negative_text, str):
            raise ValueError(f"negative_text: expected a string, got {type(negative_text).__name__}")
        steps = _positive_int(num_inference_steps if num_inference_steps is not None else s.num_inference_steps,
                              "num_inference_steps")
        samples = _positive_int(num_samples if num_samples is not None else s.num_samples, "num_samples")
        g_text = _guidance(guidance_scale if guidance_scale is not None else s.guidance_scale, "guidance_scale")
        g_image = image_guidance_scale if image_guidance_scale is not None else s.image_guidance_scale
        if g_image is not None:
            g_image = _guidance(g_image, "image_guidance_scale")
        seconds = finite_float(seconds if seconds is not None else s.seconds, "seconds", low=0, low_open=True,
                               high=MAX_SECONDS)
        seed = check_seed(seed)
        if image_steps is not None:
            image_steps = _positive_int(image_steps, "image_steps")
        device = self.device
        use_image = image is not None and self.synapse is not None
        if image is not None and self.synapse is None:
            raise ValueError("image: this model has no synapse (config.synapse.enabled is false)")

        sched = make_scheduler(scheduler or s.scheduler, **noise_schedule(self.denoiser))
        most = sched.config.num_train_timesteps - int(sched.config.get("steps_offset", 0) or 0)
        if steps > most:
            raise ValueError(f"num_inference_steps: expected at most {most} for this scheduler and the model's "
                             f"{sched.config.num_train_timesteps} training timesteps, got {steps}")
        batch = len(texts) * samples
        three = use_image and g_image is not None
        height, width = self.latent_hw(seconds, round_up=True)
        self.check_memory(seconds, batch, 3 if three else 2, (height, width))
        sched.set_timesteps(steps, device=device)

        # text: conditional prompts, repeated per sample, then the empty prompt; one padded batch
        prompts = [t for t in texts for _ in range(samples)]
        emb, mask = self.text_encoder(prompts + [negative_text] * batch)
        emb = emb.to(device, self.denoiser.unet.dtype)
        cond_emb, cond_mask, null_emb, null_mask = emb[:batch], mask[:batch], emb[batch:], mask[batch:]

        shape = (batch, self.denoiser.in_channels, height, width)
        cache = None
        if use_image:
            images = load_images(image, "image").to(device)
            if images.shape[0] not in (1, len(texts)):
                raise ValueError(f"image: got {images.shape[0]} images for {len(texts)} texts; give 1 or one per text")
            k_img = image_steps if image_steps is not None else s.image_steps
            grid = cap_timesteps(image_timesteps(sched.timesteps, k_img), self.config.synapse.image_timestep_max)
            cache = self.image_features(images, grid, text_tokens=emb.shape[1], latent_hw=(shape[2], shape[3]))
            per_row = batch // images.shape[0]
            if images.shape[0] > 1 and per_row > 1:  # one image per text, each repeated per sample
                cache = cache.map(lambda _, k, v: (k.repeat_interleave(per_row, 0), v.repeat_interleave(per_row, 0)))
            # a single image is tiled over the batch by the synapse itself, without copies here

        # branches, concatenated on the batch axis: [empty, text (+image)] or [empty, text, text+image]
        branch_emb = [null_emb, cond_emb] + ([cond_emb] if three else [])
        branch_mask = [null_mask, cond_mask] + ([cond_mask] if three else [])
        rows = torch.zeros(len(branch_emb) * batch, dtype=torch.bool, device=device)
        rows[-batch:] = use_image
        emb_all, mask_all = torch.cat(branch_emb), torch.cat(branch_mask)

        gen = torch.Generator(device="cpu").manual_seed(int(seed)) if seed is not None else None
        latents = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
        latents = latents * sched.init_noise_sigma

        for t in tqdm(sched.timesteps, desc="melfusion", disable=not progress, leave=False):
            x = sched.scale_model_input(latents, t)
            x = torch.cat([x] * len(branch_emb)).to(self.denoiser.unet.dtype)
            features = cache.at(t) if cache is not None else None
            if self._handle is not None:
                self._handle.set_features(features, timestep=t, image_rows=rows)
            try:
                out = self.denoiser(x, t, emb_all, mask_all).float().chunk(len(branch_emb))
            finally:
                if self._handle is not None:
                    self._handle.set_features(None)
            if three:
                pred = out[0] + g_text * (out[1] - out[0]) + g_image * (out[2] - out[1])
            else:
                pred = out[0] + g_text * (out[1] - out[0])
            latents = sched.step(pred, t, latents).prev_sample
            if not bool(torch.isfinite(latents).all()):
                raise NonFiniteError(
                    f"guidance_scale: the music latent became NaN or infinite at timestep {int(t)} (guidance "
                    f"{g_text:g}{f', image guidance {g_image:g}' if three else ''}); use smaller guidance scales")

        mel = self.codec.decode(latents.to(self.denoiser.unet.dtype)).float()
        waves = self.vocoder(mel).float().cpu().numpy()
        if not np.isfinite(waves).all():
            raise NonFiniteError("model: the vocoder returned NaN or infinite audio; nothing was written")
        # the latent was rounded up to a length the UNet can halve: cut the clip to exactly `seconds`
        waves = waves[..., : int(round(seconds * self.sample_rate))]
        mel = mel[..., : -(-int(round(seconds * self.config.sample_rate)) // self.config.hop_length), :]
        if peak_normalize:
            peak = np.abs(waves).max(axis=-1, keepdims=True)
            waves = np.where(peak > 0.99, waves * (0.99 / np.maximum(peak, 1e-12)), waves)
        waves = waves.astype(np.float32)
        mel_np = mel[:, 0].cpu().numpy() if mel.ndim == 4 else mel.cpu().numpy()
        return GenerationOutput(waveforms=waves, sample_rate=self.sample_rate, mel=mel_np, texts=prompts)


def music_latent_hw(config: MelFusionConfig, codec: Any, seconds: float | None = None, *,
                    exact: bool = False) -> tuple[int, int]:
    """``(frames, mel bins)`` of the music latent for ``seconds`` (default: the config's clip length).

    ``exact``: enough latent frames to cover ``seconds`` (rounded up), for generation that cuts the audio
    to the asked length afterwards.
    """
    seconds = config.sampling.seconds if seconds is None else seconds
    down = getattr(codec, "downsample", 1)
    if exact:
        mel_frames = -(-int(round(seconds * config.sample_rate)) // config.hop_length)
        return -(-mel_frames // down), config.n_mels // down
    frames = int(round(seconds * config.sample_rate / config.hop_length))
    return frames // down, config.n_mels // down


def _frozen_modules(part: Any) -> dict[str, torch.nn.Module]:
    """The torch modules a part holds, by attribute name (``unet``, ``vae``, ``model``...)."""
    if part is None:
        return {}
    found = {}
    for attr, value in vars(part).items():
        if attr.startswith("_") or not isinstance(value, torch.nn.Module) or not value.state_dict():
            continue
        found[attr] = value
    if isinstance(part, torch.nn.Module) and not found and part.state_dict():
        found["module"] = part
    return found


def _has_weights_reference(config: MelFusionConfig, part_name: str, attr: str, part: Any) -> bool:
    """Whether module ``attr`` of a part is loaded from published weights (so save_pretrained need not copy it)."""
    if getattr(part, "ships_weights", False):  # e.g. MiniLM: the weights come with a Python package
        return True
    params = getattr(config, part_name).params
    spec = params.get(attr)
    if isinstance(spec, dict):
        return bool(spec.get("pretrained"))
    return bool(params.get("pretrained"))


#: models that ship inside the package, by name: ``MelFusion.from_pretrained("mini")``
SHIPPED_MODELS = {"mini": "weights/mini"}


def shipped_model_path(name: str = "mini") -> Path:
    """The folder of a model that ships inside the package (see :data:`SHIPPED_MODELS`)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"name: unknown shipped model {name!r}; shipped: {', '.join(sorted(SHIPPED_MODELS))}")
    folder = Path(__file__).resolve().parent / SHIPPED_MODELS[name]
    if not (folder / MelFusion.INDEX_NAME).is_file():
        raise OSError(f"model: the shipped {name!r} weights are missing from this install ({str(folder)!r}); "
                      f"train them with `python scripts/train_mini.py --install`")
    return folder


def _resolve_model_folder(path: str | Path, revision: str | None) -> Path:
    folder = Path(path)
    if folder.is_symlink() and not folder.exists():
        raise OSError(f"model: {str(path)!r} is a broken or looping symbolic link")
    if not folder.exists():
        from .files import clean_leftovers

        clean_leftovers(folder)  # a save killed mid-swap where no atomic exchange exists: put the model back
    if folder.is_dir():
        return folder
    if str(path) in SHIPPED_MODELS and not folder.exists():
        return shipped_model_path(str(path))
    shipped = f"shipped models: {', '.join(sorted(SHIPPED_MODELS))}"
    if folder.exists():
        raise OSError(f"model: {str(path)!r} is a file, not a folder written by save_pretrained ({shipped})")
    if not _is_hub_id(str(path)) or _looks_local(str(path)):
        raise OSError(f"model: no such folder {str(path)!r} ({shipped})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), revision=revision))
    except Exception as exc:  # offline, unknown repo, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"model: no such folder {str(path)!r}, and it could not be fetched as a hub id "
                      f"({first}); {shipped}") from None


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def read_index(folder: Path) -> dict[str, Any] | None:
    """The weights index of a folder written by save_pretrained, checked field by field; None if there is none.

    An ``OSError`` naming the file when it is not one save_pretrained writes (wrong types, paths that leave
    the folder).
    """
    import json

    path = folder / MelFusion.INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise OSError(f"model: {str(path)!r} is not valid JSON ({exc})") from None
    bad = f"model: {str(path)!r} is not a melfusion weights index"
    if not isinstance(index, dict) or index.get("format", "melfusion") != "melfusion":
        raise OSError(bad)
    stored = index.get("stored_frozen_modules", {})
    if not isinstance(stored, dict) or not all(
            k in MelFusion.PARTS and isinstance(v, list) and all(_plain_name(a) for a in v) for k, v in stored.items()):
        raise OSError(f"{bad} (stored_frozen_modules: expected part names mapped to lists of module names)")
    for key in ("unet", "synapse"):
        value = index.get(key, "unet" if key == "unet" else None)
        if value is not None and not _plain_name(value):
            raise OSError(f"{bad} ({key}: expected a file name inside the folder, got {value!r})")
    return index


def _plain_name(value: Any) -> bool:
    """A file or folder name inside the model folder (no path separators, no ``..``)."""
    return isinstance(value, str) and bool(value) and "/" not in value and "\\" not in value \
        and value not in (".", "..")


def is_model_entry(entry: Path) -> bool:
    """Whether ``entry`` (a path inside a folder) was written by save_pretrained, so a new save may replace it.

    Only a folder holding a valid weights index owns anything: its config and index, the UNet folder and
    weight files the index names (a folder of diffusers' config and safetensors only), the synapse file.
    A file of any other name, or any file in a folder without an index, is the user's.
    """
    try:
        index = read_index(entry.parent)
    except OSError:
        return False
    if index is None or entry.is_symlink():
        return False
    if entry.name in (MelFusion.CONFIG_NAME, MelFusion.INDEX_NAME):
        return entry.is_file()
    if entry.name == index.get("synapse") and entry.is_file():
        return True
    stored = index.get("stored_frozen_modules", {})
    if entry.is_file() and any(entry.name == f"{part}.{attr}.safetensors"
                               for part, attrs in stored.items() for attr in attrs):
        return True
    if entry.name == index.get("unet", "unet") and entry.is_dir():  # diffusers' save_pretrained, safetensors only
        return all(f.is_file() and not f.is_symlink() and (
            f.name == "config.json" or re.fullmatch(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors"
                                                     r"(\.index\.json)?", f.name) is not None)
            for f in entry.iterdir())
    return False


def _load_safetensors(module: torch.nn.Module, file: Path, device: Any) -> None:
    """``safetensors.load_model`` with every failure as one ``OSError`` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not file.is_file():
        raise OSError(f"model: missing weights file {str(file)!r}")
    try:
        load_model(module, str(file), device=str(device or "cpu"))
    except (SafetensorError, RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"model: cannot load {str(file)!r}: it is corrupt or does not fit the model its config "
                      f"describes ({first[:200]})") from None
    from .checks import check_finite_tensors

    check_finite_tensors(module.state_dict(), f"model: {str(file)!r}", "refused to load")


def _loading(where: Path, part_cfg: Any, common: dict[str, Any]) -> Any:
    """Build a part from saved weights; a corrupt or mismatched weights file is one ``OSError`` naming ``where``."""
    from safetensors import SafetensorError

    try:
        return part_cfg.build(weights=True, **common)
    except (SafetensorError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"model: cannot load {str(where)!r}: it is corrupt or does not fit the model its config "
                      f"describes ({first[:200]})") from None


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


def image_timesteps(timesteps: torch.Tensor | Sequence[int], image_steps: int | None) -> list[int]:
    """``image_steps`` of the sampling ``timesteps``, evenly spread and including both ends (None: all)."""
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if image_steps is None or image_steps >= len(ts):
        return ts
    image_steps = _positive_int(image_steps, "image_steps")
    index = np.unique(np.round(np.linspace(0, len(ts) - 1, image_steps)).astype(int))
    return [ts[i] for i in index]


def cap_timesteps(timesteps: Sequence[int], cap: int | None) -> list[int]:
    """The image timesteps at or below ``cap`` (None: all); the smallest one if none is.

    The feature cache answers each music timestep with its nearest image timestep, so music steps above
    the cap get the features at the largest timestep kept.
    """
    ts = [int(t) for t in timesteps]
    if cap is None or not ts:
        return ts
    kept = [t for t in ts if t <= cap]
    return kept or [min(ts)]


def noise_schedule(denoiser: Any) -> dict[str, Any]:
    """The training noise schedule of ``denoiser``: its ``noise_schedule`` dict, else SD's with its prediction type."""
    schedule = dict(getattr(denoiser, "noise_schedule", None) or {})
    schedule.setdefault("prediction_type", getattr(denoiser, "prediction_type", "epsilon"))
    schedule.setdefault("beta_schedule", getattr(denoiser, "beta_schedule", "scaled_linear"))
    return schedule


_positive_int = positive_int  # the shared check (melfusion.checks), under the name this module's callers use


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
#: the longest clip generate is asked for (a day); memory is checked separately, before anything is allocated
MAX_SECONDS = 86_400.0


def _guidance(value: Any, name: str) -> float:
    return finite_float(value, name, low=0, high=MAX_GUIDANCE)
