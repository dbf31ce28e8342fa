"""Configs: presets, JSON/YAML round trips, and validation errors that name the field."""

import importlib.util
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import melfusion as mf
from melfusion.config import MelFusionConfig
from melfusion.registry import REGISTRIES, Registry, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "paper", "reference"])
def test_presets_round_trip(name, tmp_path):
    cfg = MelFusionConfig.preset(name)
    assert MelFusionConfig.from_json(cfg.to_json()) == cfg
    assert MelFusionConfig.from_yaml(cfg.to_yaml()) == cfg
    assert MelFusionConfig.load(cfg.save(tmp_path / "c.yaml")) == cfg
    assert MelFusionConfig.load(cfg.save(tmp_path / "c.json")) == cfg


def test_reference_preset_uses_released_choices():
    cfg = MelFusionConfig.preset("reference")
    assert cfg.synapse.mixer.name == "bounded" and cfg.synapse.mixer.params == {"rho": 5.0}
    assert cfg.synapse.image_trajectory == "noise"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"synapse": {"mixr": {}}}, "synapse.mixr"),
        ({"sampling": {"num_inference_steps": -3}}, "sampling.num_inference_steps"),
        ({"sampling": {"num_inference_steps": 0}}, "sampling.num_inference_steps"),
        ({"sampling": {"guidance_scale": -1}}, "sampling.guidance_scale"),
        ({"sampling": {"scheduler": "not_a_scheduler"}}, "sampling.scheduler"),
        ({"synapse": {"mixer": {"name": "convx"}}}, "synapse.mixer"),
        ({"synapse": {"aligner": {"name": "nope"}}}, "synapse.aligner"),
        ({"synapse": {"mixer": {"name": "convex", "params": {"rho": 2}}}}, "synapse.mixer"),
        ({"synapse": {"mixer": {"name": "convex", "params": {"num_layers": 2}}}}, "synapse.mixer"),
        ({"denoiser": {"name": "tango", "colour": 1}}, "denoiser.colour"),
        ({"vocoder": {"name": "wavenet"}}, "vocoder"),
        ({"synapse": {"image_layers": ["a"], "music_layers": ["a", "b"], "pairing": "order"}}, "synapse"),
        ({"sample_rate": 0}, "sample_rate"),
    ],
)
def test_bad_values_fail_naming_the_field(data, field):
    with pytest.raises(ValidationError) as info:
        MelFusionConfig.model_validate(data)
    assert field in str(info.value)


def test_unknown_registry_name_lists_known_names():
    with pytest.raises(ValidationError, match="known mixer names: .*convex.*Did you mean 'convex'"):
        MelFusionConfig.model_validate({"synapse": {"mixer": {"name": "convx"}}})
    with pytest.raises(UnknownNameError, match="known denoiser names"):
        REGISTRIES["denoiser"].get("audiogen")


def test_unknown_preset_and_missing_file():
    with pytest.raises(ValueError, match="preset: unknown preset 'huge'"):
        MelFusionConfig.preset("huge")
    with pytest.raises(FileNotFoundError, match="config"):
        MelFusionConfig.load("/nonexistent/config.yaml")


def test_registry_register_build_and_duplicates():
    reg = Registry("mixer")
    reg.register("a", dict)
    assert reg.names() == ["a"] and reg.build("a", x=1) == {"x": 1}
    with pytest.raises(ValueError, match="already taken"):
        reg.register("a", list)
    reg.register("a", list, override=True)
    assert reg.get("a") is list
    assert set(REGISTRIES) >= {"feature_source", "mixer", "denoiser", "codec", "vocoder", "text_encoder"}
    assert {"convex", "per_head", "gated", "bounded"} <= set(REGISTRIES["mixer"].names())


def test_entry_point_plugins_are_loaded(monkeypatch):
    from importlib import metadata

    class FakeEntryPoint:
        name = "plugin_mixer"
        value = "somewhere:Mixer"

        def load(self):
            return mf.synapse.ConvexMixer

    def fake_entry_points(group):
        return [FakeEntryPoint()] if group == "melfusion.mixers" else []

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    reg = Registry("mixer", "melfusion.mixers")
    assert "plugin_mixer" in reg.names()
    assert isinstance(reg.build("plugin_mixer", num_layers=2), mf.synapse.ConvexMixer)


def _load_example():
    spec = importlib.util.spec_from_file_location("user_custom_mixer", ROOT / "examples" / "custom_mixer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_custom_mixer"] = module
    spec.loader.exec_module(module)
    return module


def test_docs_example_matches_example_file():
    doc = (ROOT / "docs" / "extending.md").read_text()
    code = (ROOT / "examples" / "custom_mixer.py").read_text()
    assert code.strip() in doc, "docs/extending.md must show examples/custom_mixer.py verbatim"


def test_user_mixer_from_outside_module_is_used_by_tiny_preset():
    module = _load_example()
    try:
        cfg = MelFusionConfig.preset("tiny")
        cfg.synapse.mixer = {"name": "temperature_convex", "params": {"temperature": 2.0}}
        model = mf.MelFusion.from_config(cfg)
        assert isinstance(model.synapse.mixer, module.TemperatureConvexMixer)
        assert model.synapse.mixer.temperature == 2.0
        out = model.generate(image=str(ROOT / "examples/images/sunset.png"), text="piano", num_inference_steps=2,
                             progress=False)
        assert out.waveforms.shape[0] == 1 and (abs(out.waveforms) <= 1).all()
        with pytest.raises(ValidationError, match="temperature_convex' takes no \\['tau'\\]"):
            cfg.synapse.mixer = {"name": "temperature_convex", "params": {"tau": 2.0}}
    finally:
        REGISTRIES["mixer"].unregister("temperature_convex")
