"""The contract suite: every name in every registry honours ``melfusion.interfaces``, built tiny.

In the spirit of diffusers' ``PipelineTesterMixin``: one table, :data:`TINY`, says how to build each registered
part small (and, for a denoiser, a latent and a text that fit it); every test is parametrized over the names the
registries hold at collection time, so a new part is held to the contract as soon as it registers. A registered
name without a table entry fails, asking for its tiny spec. The plain-torch denoiser of
``examples/custom_denoiser.py`` is loaded from its path and checked with the built-in parts.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import SchedulerMixin
from safetensors.torch import load_model, save_model
from torch import nn

import melfusion as mf
from melfusion.backbones.audioldm import TINY_AUDIOLDM_HIFIGAN, TINY_AUDIOLDM_VAE
from melfusion.interfaces import (
    FeatureSource,
    LatentCodec,
    LayerInfo,
    MusicDenoiser,
    Part,
    SynapseMixer,
    TextEncoder,
    Vocoder,
)
from melfusion.registry import KINDS, REGISTRIES
from melfusion.schedules import NoiseSchedule
from melfusion.synapse.features import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_denoiser.py"
EXAMPLE_NAME = "plain_torch_flow"
IMAGE = ROOT / "examples" / "images" / "blue-bright.png"


# -- the example denoiser, registered for this module -------------------------------------------------------
def _load_example() -> tuple[type, bool]:
    """The example's denoiser class, and whether this module registered it (then it is unregistered again right
    after the names are collected, and re-registered only while this module's tests run, so that
    ``tests/test_custom_denoiser.py`` can still register its own import of the file)."""
    reg = REGISTRIES["denoiser"]
    if EXAMPLE_NAME in reg:
        return reg.get(EXAMPLE_NAME), False
    found = importlib.util.spec_from_file_location("melfusion_contract_custom_denoiser", EXAMPLE)
    module = importlib.util.module_from_spec(found)
    sys.modules[found.name] = module
    found.loader.exec_module(module)
    return module.PlainTorchFlowDenoiser, True


EXAMPLE_CLASS, _REGISTERED_HERE = _load_example()
#: every registered name of every kind, at collection time
NAMES: dict[str, list[str]] = {kind: REGISTRIES[kind].names() for kind in KINDS}
if _REGISTERED_HERE:
    REGISTRIES["denoiser"].unregister(EXAMPLE_NAME)


@pytest.fixture(scope="module", autouse=True)
def _example_registered():
    reg = REGISTRIES["denoiser"]
    ours = EXAMPLE_NAME not in reg
    if ours:
        reg.register(EXAMPLE_NAME, EXAMPLE_CLASS)
    yield
    if ours and EXAMPLE_NAME in reg and reg.get(EXAMPLE_NAME) is EXAMPLE_CLASS:
        reg.unregister(EXAMPLE_NAME)


# -- the tiny specs -----------------------------------------------------------------------------------------
_TINY_PRESET = mf.MelFusionConfig.preset("tiny")

# tiny AudioLDM parts (as in tests/test_audioldm.py): 32 mel bins, a /2 VAE with 8 latent channels, a HiFi-GAN
# upsampling 4 * 4 = 16 samples per frame at 16 kHz
N_MELS, HOP, SAMPLE_RATE, SECONDS = 32, 16, 16_000, 0.064
TINY_VAE, TINY_HIFIGAN = TINY_AUDIOLDM_VAE, TINY_AUDIOLDM_HIFIGAN
#: the tiny Oobleck's hop (2 * 4 samples a latent frame) and a clip of 32 frames
OOBLECK_HOP, OOBLECK_SAMPLES = 8, 256

#: ``TINY[kind][name]``: ``params`` to build it with, plus what its kind's tests need:
#: denoiser ``latent`` ``(C, *axes)`` and ``text`` ``(tokens, dim)``; codec ``settings`` ``(seconds,
#: sample_rate, hop_length, n_mels)`` and ``input`` (the audio ``encode`` takes); vocoder ``input`` and the
#: ``output`` shape; aligner ``grid`` (the target grid passed at call time, or None)
TINY: dict[str, dict[str, dict[str, Any]]] = {
    "feature_source": {
        "stable_diffusion": {"params": dict(_TINY_PRESET.feature_source.params)},
    },
    "denoiser": {
        "tango": {"params": dict(_TINY_PRESET.denoiser.params), "latent": (1, 16, 16), "text": (5, 32)},
        "audioldm": {"params": {"unet": {"config": "tiny"}}, "latent": (8, 16, 16), "text": (1, 32)},
        "stable_audio_dit": {"params": {"transformer": {"config": "tiny"}, "projection": {"config": "tiny"}},
                             "latent": (8, 16), "text": (6, 32)},
        EXAMPLE_NAME: {"params": {"width": 32, "heads": 4, "depth": 2}, "latent": (1, 8, 64), "text": (5, 32)},
    },
    "codec": {
        "identity": {"params": {"shift": -6.0, "scale": 2.0}, "settings": (SECONDS, SAMPLE_RATE, HOP, N_MELS),
                     "input": (2, 1, 64, N_MELS)},
        "audioldm_vae": {"params": {"config": TINY_VAE}, "settings": (SECONDS, SAMPLE_RATE, HOP, N_MELS),
                         "input": (2, 1, 64, N_MELS)},
        "oobleck": {"params": {"config": "tiny"}, "settings": (OOBLECK_SAMPLES / 44_100, 44_100, 512, 64),
                    "input": (2, 2, OOBLECK_SAMPLES)},
    },
    "vocoder": {
        "griffin_lim": {"params": {"n_iter": 2}, "input": (2, 8, 64), "output": (2, 8 * 160)},
        "hifigan": {"params": {"config": TINY_HIFIGAN}, "input": (2, 8, N_MELS), "output": (2, 8 * 16)},
        "none": {"params": {"sample_rate": 44_100}, "input": (2, 2, 100), "output": (2, 2, 100)},
    },
    "text_encoder": {
        "t5": {"params": {"config": "tiny"}},
        "clap": {"params": {"config": "tiny"}},
        # the packaged MiniLM's architecture and tokenizer with random weights (nothing published)
        "minilm": {"params": {"weights": False}},
    },
    "mixer": {
        "convex": {"params": {"init": 0.5}},
        "per_head": {"params": {"init": 0.5}},
        "gated": {"params": {"init": 0.5}},
        "bounded": {"params": {}},
    },
    "aligner": {
        "pool": {"params": {}, "grid": None},
        "interpolate": {"params": {}, "grid": (2, 2)},
        "linear": {"params": {}, "grid": (2, 2)},
    },
    "trajectory": {
        "reverse": {"params": {}},
        "inversion": {"params": {}},
        "noise": {"params": {"seed": 0}},
    },
}

INTERFACES = {"feature_source": FeatureSource, "denoiser": MusicDenoiser, "codec": LatentCodec,
              "vocoder": Vocoder, "text_encoder": TextEncoder}
PART_KINDS = tuple(INTERFACES)

#: the synapse's view of a mixer and an aligner (see melfusion.synapse.wiring.Synapse)
MIXER_ARGS = dict(num_layers=2, num_heads=[2, 2], head_dim=4)
ALIGNER_ARGS = dict(in_heads=2, in_head_dim=4, out_heads=2, out_head_dim=4, in_grid=(4, 4))
TEXTS = ["a calm flute", "drums"]


def spec(kind: str, name: str) -> dict[str, Any]:
    if name not in TINY.get(kind, {}):
        pytest.fail(f"add a tiny spec for {kind} {name} in tests/test_contract.py", pytrace=False)
    return TINY[kind][name]


def _params(kind: str) -> list:
    return [pytest.param(name, id=name) for name in NAMES[kind]]


ALL = [pytest.param(kind, name, id=f"{kind}-{name}") for kind in KINDS for name in NAMES[kind]]
PARTS = [pytest.param(kind, name, id=f"{kind}-{name}") for kind in PART_KINDS for name in NAMES[kind]]


def fresh(kind: str, name: str, seed: int = 0) -> Any:
    """A new tiny build of ``name`` under torch seed ``seed`` (the global RNG is left as it was)."""
    params = spec(kind, name)["params"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        part = REGISTRIES[kind].build(name, **params)
    return part.eval() if isinstance(part, nn.Module) else part


@functools.cache
def built(kind: str, name: str) -> Any:
    """The shared seed-0 build (tests must leave it as they found it)."""
    return fresh(kind, name, 0)


# -- inputs and outputs -------------------------------------------------------------------------------------
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def timestep_for(denoiser: MusicDenoiser) -> torch.Tensor:
    """A timestep valid for the denoiser's noise-schedule family."""
    schedule = denoiser.noise_schedule
    if schedule.family == "ddpm":
        return torch.tensor(500)
    if schedule.family == "edm":
        scheduler = schedule.make_scheduler()
        scheduler.set_timesteps(4)
        return scheduler.timesteps[0]
    return torch.tensor(500.0)


def denoiser_inputs(denoiser: MusicDenoiser, s: dict, batch: int = 2, dtype=torch.float32) -> tuple:
    g = _gen(0)
    latents = torch.randn(batch, *s["latent"], generator=g).to(dtype)
    text = torch.randn(batch, *s["text"], generator=g).to(dtype)
    mask = torch.ones(batch, s["text"][0], dtype=torch.bool)
    timing = torch.tensor([[0.0, 1.0]] * batch)
    return latents, timestep_for(denoiser), text, mask, timing


@torch.no_grad()
def run(kind: str, name: str, part: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic output of ``part`` that depends on all of its stored weights (inputs in ``dtype``)."""
    s = spec(kind, name)
    if kind == "feature_source":
        images = torch.rand(1, 3, 32, 32, generator=_gen(0)).to(dtype)
        latents = part.encode(images)
        out = part.evaluate(latents, 500)
        return torch.cat([latents.flatten(), out.flatten()])
    if kind == "denoiser":
        return part(*denoiser_inputs(part, s, dtype=dtype))
    if kind == "codec":
        audio = torch.randn(*s["input"], generator=_gen(0)).to(dtype)
        return part.decode(part.encode(audio))
    if kind == "vocoder":
        return part(torch.randn(*s["input"], generator=_gen(0)).to(dtype) - 4.0)
    if kind == "text_encoder":
        return part(TEXTS)[0]
    raise AssertionError(kind)


def _has_parameters(part: nn.Module) -> bool:
    return any(True for _ in part.parameters())


def _is_submodule(module: nn.Module, part: nn.Module) -> bool:
    return any(module is m for m in part.modules())


# -- every name has a spec -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, name", ALL)
def test_every_registered_name_has_a_tiny_spec_that_builds(kind, name):
    s = spec(kind, name)
    assert isinstance(s.get("params"), dict), f"TINY[{kind!r}][{name!r}] needs a 'params' dict"
    if kind in ("mixer", "aligner"):
        return  # built with the synapse's arguments in their own tests
    part = built(kind, name)
    assert isinstance(part, REGISTRIES[kind].get(name))
    if kind in INTERFACES:
        assert isinstance(part, INTERFACES[kind]) and isinstance(part, Part)


def test_the_example_denoiser_is_in_the_registry():
    assert EXAMPLE_NAME in NAMES["denoiser"]
    cls = REGISTRIES["denoiser"].get(EXAMPLE_NAME)  # ours, or tests/test_custom_denoiser.py's import of the file
    assert issubclass(cls, MusicDenoiser) and Path(inspect.getfile(cls)).resolve() == EXAMPLE.resolve()


def test_a_name_without_a_spec_fails_with_the_message():
    with pytest.raises(pytest.fail.Exception, match="add a tiny spec for denoiser nameless in tests/test_contract"):
        spec("denoiser", "nameless")


# -- every Part -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, name", PARTS)
def test_part_is_a_module_of_its_interface_with_device_and_dtype(kind, name):
    part = built(kind, name)
    assert isinstance(part, INTERFACES[kind]) and isinstance(part, Part) and isinstance(part, nn.Module)
    assert isinstance(part.device, torch.device) and part.device.type == "cpu"
    assert isinstance(part.dtype, torch.dtype) and part.dtype == torch.float32


@pytest.mark.parametrize("kind, name", PARTS)
def test_to_float64_and_back(kind, name):
    part = fresh(kind, name)
    before = run(kind, name, part)
    assert part.to(torch.float64) is part
    if not _has_parameters(part):
        assert part.dtype == torch.float32  # nothing to convert: the default
        return
    assert part.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in part.parameters() if p.is_floating_point())
    out = run(kind, name, part, torch.float64)  # it runs in float64
    assert out.is_floating_point() and torch.isfinite(out).all()
    if kind in ("denoiser", "codec", "text_encoder"):
        assert out.dtype == torch.float64
    part.to(torch.float32)
    assert part.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in part.parameters() if p.is_floating_point())
    torch.testing.assert_close(run(kind, name, part), before, rtol=0, atol=0)  # float32 -> 64 -> 32 is exact


@pytest.mark.parametrize("kind, name", PARTS)
def test_requires_grad_false_freezes_every_parameter(kind, name):
    part = fresh(kind, name)
    part.requires_grad_(True)
    n = sum(1 for _ in part.parameters())
    assert sum(p.requires_grad for p in part.parameters()) == n
    assert part.requires_grad_(False) is part
    assert not any(p.requires_grad for p in part.parameters())


@pytest.mark.parametrize("kind, name", PARTS)
def test_stored_modules_hold_every_parameter_and_nothing_is_published(kind, name):
    part = built(kind, name)
    stored = part.stored_modules()
    assert isinstance(stored, dict)
    params = {id(p) for p in part.parameters()}
    covered: set[int] = set()
    for key, module in stored.items():
        assert isinstance(key, str) and key
        assert isinstance(module, nn.Module) and _is_submodule(module, part), key
        own = {id(p) for p in module.parameters()}
        assert own <= params, f"stored module {key!r} holds parameters that are not the part's"
        covered |= own
    assert covered == params, "stored_modules() leaves some of the part's parameters unsaved"
    published = part.published_modules()
    assert isinstance(published, set) and published <= set(stored)
    assert published == set(), "a tiny random build has no published weights"


@pytest.mark.parametrize("kind, name", PARTS)
def test_safetensors_round_trip_of_stored_modules(kind, name, tmp_path):
    source = built(kind, name)
    target = fresh(kind, name, seed=1)
    expected = run(kind, name, source)
    if _has_parameters(source):
        assert not torch.equal(run(kind, name, target), expected), "another seed should give other weights"
    stored = source.stored_modules()
    assert set(target.stored_modules()) == set(stored)
    for key, module in stored.items():
        file = tmp_path / f"{key}.safetensors"
        save_model(module, str(file))
        load_model(target.stored_modules()[key], str(file))
    torch.testing.assert_close(run(kind, name, target), expected, rtol=0, atol=0)


# -- feature sources -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("feature_source"))
def test_feature_source_layers_encode_and_features(name):
    fs = built("feature_source", name)
    layers = fs.layers
    assert layers and all(isinstance(info, LayerInfo) and info.inner_dim > 0 for info in layers)
    probed = fs.probe_layers()
    assert [p.name for p in probed] == [info.name for info in layers]
    assert all(p.tokens is not None and p.tokens > 0 for p in probed)
    assert all(p.grid is None or p.grid[0] * p.grid[1] == p.tokens for p in probed)
    assert isinstance(fs.noise_schedule, NoiseSchedule)
    with pytest.raises(ValueError, match="layers"):
        fs.select_layers(["no.such.layer"])
    assert [info.name for info in fs.layers] == [info.name for info in layers]  # unchanged by the refusal
    latents = fs.encode(torch.rand(2, 3, 32, 32, generator=_gen(0)))
    assert latents.ndim == 4 and latents.shape[0] == 2
    if fs.resolution is not None:
        assert latents.shape[-1] == latents.shape[-2]
    features = fs.features_at(latents, torch.tensor([10, 500]))
    assert set(features) == {info.name for info in layers}
    for info in probed:
        keys, values = features[info.name]
        assert keys.shape == values.shape == (2, info.heads, info.tokens, info.head_dim)


# -- denoisers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("denoiser"))
def test_denoiser_layers_and_probe(name):
    part, s = built("denoiser", name), spec("denoiser", name)
    layers = part.layers
    assert isinstance(layers, list) and layers
    for info in layers:
        assert isinstance(info, LayerInfo)
        assert info.heads > 0 and info.head_dim > 0 and info.heads * info.head_dim > 0
        assert info.depth is not None and 0.0 <= info.depth <= 1.0
    names = [info.name for info in layers]
    assert len(set(names)) == len(names)
    probed = part.probe_layers(names, s["latent"])
    assert [p.name for p in probed] == names
    for p, info in zip(probed, layers, strict=True):
        assert isinstance(p, LayerInfo) and (p.heads, p.head_dim) == (info.heads, info.head_dim)
        assert p.tokens is None or p.tokens > 0
        assert p.grid is None or (p.tokens is not None and p.grid[0] * p.grid[1] == p.tokens)
    assert len(part.probe_layers(names[:1], s["latent"])) == 1


@pytest.mark.parametrize("name", _params("denoiser"))
def test_denoiser_latent_shape(name):
    part, s = built("denoiser", name), spec("denoiser", name)
    latent = tuple(s["latent"])
    assert part.in_channels == latent[0]
    assert tuple(part.latent_shape(latent)) == latent, "the spec's latent should already fit the denoiser"
    channels, frames, *rest = latent
    odd = (channels, frames - 1, *rest)
    up = tuple(part.latent_shape(odd, round_up=True))
    assert len(up) == len(odd) and up[0] == channels and up[1] >= frames - 1 and tuple(up[2:]) == tuple(rest)
    down = tuple(part.latent_shape(odd, round_up=False))
    assert down[0] == channels and 0 < down[1] <= frames - 1


@pytest.mark.parametrize("name", _params("denoiser"))
def test_denoiser_noise_schedule_makes_a_diffusers_scheduler(name):
    schedule = built("denoiser", name).noise_schedule
    assert isinstance(schedule, NoiseSchedule)
    scheduler = schedule.make_scheduler()
    assert isinstance(scheduler, SchedulerMixin)
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) == 4


@pytest.mark.parametrize("name", _params("denoiser"))
def test_denoiser_forward_keeps_the_latent_shape(name):
    part, s = built("denoiser", name), spec("denoiser", name)
    latents, t, text, mask, timing = denoiser_inputs(part, s)
    with torch.no_grad():
        out = part(latents, t, text, mask, timing)
    assert out.shape == latents.shape and out.dtype == latents.dtype
    assert torch.isfinite(out).all()
    with torch.no_grad():  # each row alone gives its row of the batch (diffusers' batch consistency)
        for i in range(latents.shape[0]):
            row = part(latents[i:i + 1], t, text[i:i + 1], mask[i:i + 1], timing[i:i + 1])
            torch.testing.assert_close(row, out[i:i + 1], rtol=1e-4, atol=1e-5)
        # a row whose mask is all false is the unconditional (guidance) row: it runs, and is finite
        unconditional = mask.clone()
        unconditional[1] = False
        guided = part(latents, t, text, unconditional, timing)
    assert guided.shape == latents.shape and torch.isfinite(guided).all()


class Recorder:
    """A KV hook that records each call and returns the keys and ``scale`` times the values."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def __call__(self, layer, key, value):
        self.calls.append((layer, tuple(key.shape), tuple(value.shape)))
        return key, (value if self.scale == 1.0 else value * self.scale)


@pytest.mark.parametrize("name", _params("denoiser"))
def test_denoiser_install_synapse(name):
    part, s = built("denoiser", name), spec("denoiser", name)
    inputs = denoiser_inputs(part, s)
    infos = {info.name: info for info in part.layers}
    names = list(infos)
    probed = {p.name: p for p in part.probe_layers(names, s["latent"])}
    with torch.no_grad():
        base = part(*inputs)
        identity = Recorder()
        handle = part.install_synapse(identity, names)
        try:
            hooked = part(*inputs)
        finally:
            handle.remove()
        assert sorted(layer for layer, _, _ in identity.calls) == sorted(names), "once per layer per forward"
        for layer, key, value in identity.calls:
            info = infos[layer]
            assert len(key) == 4 and key == value
            assert key[0] == inputs[0].shape[0] and (key[1], key[3]) == (info.heads, info.head_dim)
            tokens = probed[layer].tokens
            expected = tokens if tokens is not None else part.context_tokens(s["text"][0])
            assert key[2] == expected, f"{layer}: {key[2]} keys, probed {tokens}"
        torch.testing.assert_close(hooked, base, rtol=0, atol=0)  # an identity hook is an exact no-op

        scaling = Recorder(scale=2.0)
        handle = part.install_synapse(scaling, names)
        try:
            scaled = part(*inputs)
        finally:
            handle.remove()
        assert len(scaling.calls) == len(names)
        assert not torch.allclose(scaled, base), "doubling the values should change the output"

        calls = len(identity.calls)
        after = part(*inputs)
        assert len(identity.calls) == calls and len(scaling.calls) == len(names), "called after remove()"
        torch.testing.assert_close(after, base, rtol=0, atol=0)


@pytest.mark.parametrize("name", _params("denoiser"))
def test_denoiser_save_and_load_weights(name, tmp_path):
    source, s = built("denoiser", name), spec("denoiser", name)
    folder = source.save_weights(tmp_path)
    assert isinstance(folder, str) and folder and (tmp_path / folder).is_dir()
    target = fresh("denoiser", name, seed=1)
    inputs = denoiser_inputs(source, s)
    with torch.no_grad():
        expected = source(*inputs)
        assert not torch.equal(target(*inputs), expected)
        target.load_weights(tmp_path)
        torch.testing.assert_close(target(*inputs), expected, rtol=0, atol=0)
    # missing or corrupt weights: an OSError (the contract of load_weights)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError) as missing:
        target.load_weights(empty)
    assert str(empty) in str(missing.value), "the error should name the missing file"
    files = sorted(tmp_path.glob(f"{folder}/**/*.safetensors"))
    assert files, "save_weights should write safetensors"
    files[0].write_bytes(b"not a safetensors file")
    with pytest.raises(OSError) as corrupt:
        target.load_weights(tmp_path)
    assert files[0].name in str(corrupt.value), "the error should name the corrupt file"


@pytest.mark.parametrize("name", _params("denoiser"))
def test_denoiser_trainable_modules_and_context_tokens(name):
    part = built("denoiser", name)
    trainable = part.trainable_modules()
    assert isinstance(trainable, dict) and trainable
    for key, module in trainable.items():
        assert isinstance(key, str) and isinstance(module, nn.Module) and _is_submodule(module, part), key
    for n in (1, 5, 77):
        tokens = part.context_tokens(n)
        assert isinstance(tokens, int) and tokens >= n
    memory = part.activation_bytes(spec("denoiser", name)["latent"], 2)
    assert isinstance(memory, int) and memory > 0


# -- text encoders -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("text_encoder"))
def test_text_encoder_forward_and_unconditional(name):
    encoder = built("text_encoder", name)
    assert isinstance(encoder.dim, int) and encoder.dim > 0
    emb, mask = encoder(TEXTS)
    assert emb.ndim == 3 and emb.shape[0] == 2 and emb.shape[2] == encoder.dim and emb.is_floating_point()
    assert mask.dtype == torch.bool and mask.shape == emb.shape[:2]
    assert torch.isfinite(emb).all() and mask.any(dim=1).all()
    null, null_mask = encoder.unconditional(2)
    assert null.ndim == 3 and null.shape[0] == 2 and null.shape[2] == encoder.dim and null.is_floating_point()
    assert null_mask.dtype == torch.bool and null_mask.shape == null.shape[:2]
    assert encoder.null_text in ("", None)


# -- codecs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("codec"))
def test_codec_latent_shape_encode_decode(name):
    codec, s = built("codec", name), spec("codec", name)
    assert codec.output in ("mel", "waveform")
    assert isinstance(codec.latent_channels, int) and codec.latent_channels > 0
    assert isinstance(codec.downsample, int) and codec.downsample > 0
    latent = tuple(codec.latent_shape(*s["settings"]))
    assert latent[0] == codec.latent_channels and all(isinstance(n, int) and n > 0 for n in latent)
    audio = torch.randn(*s["input"], generator=_gen(0))
    if codec.output == "mel":
        assert audio.ndim == 4 and audio.shape[1] == 1
        assert len(latent) == 3
    else:
        assert audio.ndim == 3
        assert len(latent) == 2
    encoded = codec.encode(audio)
    assert tuple(encoded.shape) == (audio.shape[0], *latent)
    decoded = codec.decode(encoded)
    assert decoded.shape == audio.shape and torch.isfinite(decoded).all()


# -- vocoders ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("vocoder"))
def test_vocoder_forward_and_sample_rate(name):
    vocoder, s = built("vocoder", name), spec("vocoder", name)
    rate = vocoder.sample_rate
    assert isinstance(rate, int) and not isinstance(rate, bool) and rate > 0
    out = run("vocoder", name, vocoder)
    assert out.ndim in (2, 3) and tuple(out.shape) == tuple(s["output"])
    assert out.is_floating_point() and torch.isfinite(out).all()


# -- mixers ------------------------------------------------------------------------------------------------
def _mixer(name: str) -> SynapseMixer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return REGISTRIES["mixer"].build(name, **MIXER_ARGS, **spec("mixer", name)["params"])


def _kv(seed: int, shape=(2, 2, 6, 4)) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


@pytest.mark.parametrize("name", _params("mixer"))
def test_mixer_shapes_and_alphas(name):
    mixer = _mixer(name)
    assert isinstance(mixer, SynapseMixer) and isinstance(mixer, nn.Module)
    music, image = _kv(0), _kv(1)
    for layer in range(MIXER_ARGS["num_layers"]):
        out = mixer(layer, music, image, torch.tensor(500))
        assert out.shape == music.shape and out.dtype == music.dtype and torch.isfinite(out).all()
    alphas = mixer.alphas()
    assert isinstance(alphas, torch.Tensor) and alphas.shape[0] == MIXER_ARGS["num_layers"]
    assert not alphas.requires_grad


@pytest.mark.parametrize("name", _params("mixer"))
def test_mixer_at_alpha_zero_returns_the_music(name):
    mixer = _mixer(name)
    fill = getattr(mixer, "fill_", None)
    if fill is None:
        pytest.skip(f"mixer {name} offers no way to set its weights")
    music, image = _kv(0), _kv(1)
    try:
        fill(0.1)
    except NotImplementedError:
        pytest.skip(f"mixer {name} does not support setting its weights")
    for layer in range(MIXER_ARGS["num_layers"]):
        assert not torch.equal(mixer(layer, music, image, torch.tensor(500)), music)
    fill(0.0)
    alphas = mixer.alphas()
    assert torch.all((alphas == 0) | alphas.isnan())
    for layer in range(MIXER_ARGS["num_layers"]):
        torch.testing.assert_close(mixer(layer, music, image, torch.tensor(500)), music, rtol=0, atol=0)
        torch.testing.assert_close(mixer(layer, music, image), music, rtol=0, atol=0)


# -- aligners ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("aligner"))
def test_aligner_maps_tokens(name):
    s = spec("aligner", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        aligner = REGISTRIES["aligner"].build(name, **ALIGNER_ARGS, **s["params"])
    assert isinstance(aligner, nn.Module)
    x = torch.randn(1, 2, 16, 4, generator=_gen(0))
    out = aligner(x, 4, s["grid"])
    assert out.shape == (1, 2, 4, 4) and torch.isfinite(out).all()
    same = aligner(x, 16, (4, 4) if s["grid"] is not None else None)
    assert same.shape == x.shape
    torch.testing.assert_close(same, x, rtol=0, atol=0)  # at the identity init, the target shape is a no-op


# -- trajectories ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _tiny_feature_source() -> FeatureSource:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return mf.MelFusionConfig.preset("tiny").feature_source.build().eval()


@pytest.mark.parametrize("name", _params("trajectory"))
def test_trajectory_captures_every_layer_at_every_timestep(name):
    s = spec("trajectory", name)
    walk = REGISTRIES["trajectory"].build(name, **s["params"])
    for steps in (1, 2, 10):
        n = walk.evaluations(steps)
        assert isinstance(n, int) and not isinstance(n, bool) and n >= steps > 0
    fs = _tiny_feature_source()
    assert fs.evaluations(2, mode=name) == walk.evaluations(2)
    latents = fs.encode(torch.rand(1, 3, 64, 64, generator=_gen(0)))
    cache = fs.trajectory(latents, [10, 500], mode=name)
    assert isinstance(cache, FeatureCache) and cache.timesteps == [10, 500]
    probed = {info.name: info for info in fs.probe_layers()}
    for t in (10, 500):
        features = cache.at(t)
        assert set(features) == set(probed)
        for layer, (keys, values) in features.items():
            info = probed[layer]
            assert keys.shape == values.shape == (1, info.heads, info.tokens, info.head_dim)
            assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    assert not torch.equal(cache.at(10)[layer][0], cache.at(500)[layer][0])


# -- the parts as a whole --------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny_stable_audio"])
def test_preset_generates_in_float64(preset):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = mf.MelFusion.from_config(preset)
    assert model.to(dtype=torch.float64) is model
    assert model.dtype == torch.float64
    for part in ("feature_source", "denoiser", "text_encoder", "codec"):
        module = getattr(model, part)
        if _has_parameters(module):
            assert module.dtype == torch.float64, part
    out = model.generate(image=IMAGE, text="a calm flute", num_inference_steps=2, seed=0, progress=False)
    wave = np.asarray(out.waveforms)
    assert wave.shape[0] == 1 and wave.size > 0 and np.isfinite(wave).all()
    assert math.isfinite(float(np.abs(out.mel).max()))
