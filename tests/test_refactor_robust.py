"""Bad input to the new generate arguments, schedulers, devices and training options: one clear error naming
the argument, never a silent wrong result (found by a red-team pass over issue 14's change)."""

import numpy as np
import pytest
import torch

import melfusion as mf
from melfusion.schedules import NoiseSchedule


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mf.MelFusion.from_config("tiny")


@pytest.fixture(scope="module")
def sa():
    torch.manual_seed(0)
    return mf.MelFusion.from_config("tiny_stable_audio")


def _shape(model):
    return (1, *model.latent_shape(model.config.sampling.seconds))


def test_moving_a_model_to_meta_is_refused_and_keeps_its_weights(tiny):
    before = next(iter(tiny.denoiser.parameters())).clone()
    with pytest.raises(ValueError, match="^device: 'meta' holds no weights"):
        tiny.to("meta")
    assert torch.equal(next(iter(tiny.denoiser.parameters())), before)


@pytest.mark.parametrize("make, match", [
    (lambda s: torch.randn(s, dtype=torch.complex64), "latents: expected a floating tensor"),
    (lambda s: torch.ones(s, dtype=torch.int64), "latents: expected a floating tensor"),
    (lambda s: torch.randn(s, device="meta"), "latents: expected a dense tensor with data"),
    (lambda s: torch.randn(s).to_sparse(), "latents: expected a dense tensor with data"),
    (lambda s: torch.full(s, float("nan")), "latents: NaN or infinite"),
    (lambda s: np.zeros(s, np.float32), "latents: expected a tensor of shape"),
])
def test_bad_latents(tiny, make, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(text="x", num_inference_steps=2, latents=make(_shape(tiny)), progress=False)


@pytest.mark.parametrize("generator", [5, "x", np.random.default_rng(0), [1]])
def test_bad_generators(tiny, generator):
    with pytest.raises(ValueError, match="^generator: expected a torch.Generator"):
        tiny.generate(text="x", num_inference_steps=2, generator=generator, progress=False)


@pytest.mark.parametrize("callback, match", [
    (5, "callback_on_step_end: expected a function"),
    (lambda m, i, t, x: [1], "callback_on_step_end: expected None or a dict"),
    (lambda m, i, t, x: {"latent": x["latents"]}, r"callback_on_step_end: unknown keys \['latent'\]"),
    (lambda m, i, t, x: {"stop": "no"}, "callback_on_step_end: 'stop' must be True or False"),
    (lambda m, i, t, x: {"latents": torch.full_like(x["latents"], float("inf")), "stop": True},
     "callback_on_step_end: the latents returned at step 0: NaN or infinite"),
    (lambda m, i, t, x: {"latents": x["latents"].long()}, "the latents returned at step 0: expected a floating"),
    (lambda m, i, t, x: {"latents": x["latents"].numpy()}, "the latents returned at step 0: expected a tensor"),
])
def test_bad_callbacks(tiny, callback, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(text="x", num_inference_steps=2, callback_on_step_end=callback, progress=False)


def test_steps_and_seconds_bounds_on_a_continuous_schedule(sa):
    with pytest.raises(ValueError, match="^num_inference_steps: expected at most 10000"):
        sa.generate(text="x", num_inference_steps=10**9, progress=False)
    with pytest.raises(ValueError, match="^seconds: 1e-06 s is shorter than one sample"):
        sa.generate(text="x", seconds=1e-6, num_inference_steps=2, progress=False)


@pytest.mark.parametrize("scheduler, match", [
    ("RePaintScheduler", "RePaintScheduler is an inpainting sampler"),
    (int, "'int' is not a diffusers scheduler class"),
    (torch.nn.Linear, "'Linear' is not a diffusers scheduler class"),
])
def test_schedulers_that_cannot_sample_plainly(tiny, scheduler, match):
    with pytest.raises(ValueError, match=f"^scheduler: {match}"):
        tiny.generate(text="x", num_inference_steps=2, scheduler=scheduler, progress=False)


def test_consistency_model_sampler_is_not_an_edm_scheduler():
    with pytest.raises(ValueError, match="^scheduler: CMStochasticIterativeScheduler is a consistency-model"):
        NoiseSchedule.edm().make_scheduler("CMStochasticIterativeScheduler")
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="^scheduler: DDIMScheduler samples a ddpm schedule, but this model was "
                                         "trained with an edm noise schedule"):
        NoiseSchedule.edm().make_scheduler(DDIMScheduler)


def test_decoded_infinities_are_caught(tiny):
    with pytest.raises(ValueError, match="the codec decoded NaN or infinite"):
        tiny.decode(torch.full(_shape(tiny), float("inf")), 1.28)


@pytest.mark.parametrize("synapse, match", [
    ({"music_layers": []}, "music_layers"),
    ({"image_layers": ["a", "a"]}, "appear more than once"),
    ({"pairing": "order", "pairs": [["a", "b"]]}, "contradict"),
])
def test_layer_settings_that_cannot_mean_what_they_say(synapse, match):
    with pytest.raises(ValueError, match=match):
        mf.MelFusionConfig.model_validate({"synapse": synapse})


def _toy(tmp_path):
    from melfusion.datasets import write_toy_manifest

    return write_toy_manifest(tmp_path / "toy", n=2, seconds=0.5, sample_rate=44100)


def _train_config(tmp_path, model, **extra):
    from melfusion.training import TrainConfig

    return TrainConfig.model_validate({"model": model, "output": str(tmp_path / "run"), "max_steps": 1,
                                       "batch_size": 2, "data": {"manifest": str(_toy(tmp_path))},
                                       "progress": False, "tensorboard": False, "plot": False, **extra})


def test_min_snr_gamma_is_refused_for_an_edm_denoiser(tmp_path):
    from melfusion.training import Trainer

    with pytest.raises(ValueError, match="^min_snr_gamma: weights the ddpm family"):
        Trainer(_train_config(tmp_path, "tiny_stable_audio", min_snr_gamma=5.0))


def test_a_prediction_type_override_is_saved_with_the_model(tmp_path):
    from melfusion.training import Trainer

    result = Trainer(_train_config(tmp_path, "tiny_stable_audio", prediction_type="epsilon")).train()
    loaded = mf.MelFusion.from_pretrained(result.model_path)
    assert loaded.denoiser.noise_schedule.prediction_type == "epsilon"


def test_nan_weights_in_the_transformer_folder_are_refused(sa, tmp_path):
    from safetensors.torch import load_file, save_file

    path = sa.save_pretrained(tmp_path / "m")
    file = path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(file))
    with pytest.raises(ValueError, match="refused to load"):
        mf.MelFusion.from_pretrained(path)
