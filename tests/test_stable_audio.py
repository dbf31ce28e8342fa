"""Stable Audio Open as the music backbone: parity with diffusers' StableAudioPipeline, the synapse on a DiT,
saving and loading, training, and the full-size preset on the meta device."""

import numpy as np
import pytest
import torch

import melfusion as mf
from melfusion.cli import main

IMAGE = "examples/images/blue-bright.png"
OTHER = "examples/images/red-dark.png"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mf.MelFusion.from_config("tiny_stable_audio")


def _pipeline(model, scheduler):
    from diffusers import StableAudioPipeline

    tokenizer = model.text_encoder.tokenizer
    tokenizer.model_max_length = model.text_encoder.max_length  # what the diffusers pipeline pads to
    return StableAudioPipeline(vae=model.codec.vae, text_encoder=model.text_encoder.model,
                               projection_model=model.denoiser.projection, tokenizer=tokenizer,
                               transformer=model.denoiser.transformer, scheduler=model.make_scheduler(scheduler))


def _edm_log_model():
    """tiny_stable_audio conditioned on 0.25 ln(sigma), the convention of diffusers' EDM schedulers."""
    cfg = mf.MelFusionConfig.preset("tiny_stable_audio")
    cfg.denoiser.params["noise_conditioning"] = "log"
    torch.manual_seed(0)
    return mf.MelFusion.from_config(cfg)


@pytest.mark.parametrize("scheduler, prompt, guidance", [
    ("cosine_dpm_solver", "a calm flute melody", 7.0),   # Stable Audio Open's own (an SDE sampler, seeded)
    ("edm_dpm_solver", "drums", 3.0),                     # the scheduler diffusers' pipeline annotates
])
def test_alpha_zero_and_no_image_equal_diffusers_stable_audio_pipeline(model, scheduler, prompt, guidance):
    model = model if scheduler == "cosine_dpm_solver" else _edm_log_model()
    pipe = _pipeline(model, scheduler)
    frames = pipe.transformer.config.sample_size  # the pipeline always samples this many latent frames
    seconds = frames * model.codec.downsample / model.sample_rate
    ref = pipe(prompt, audio_end_in_s=seconds, num_inference_steps=5, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(0), output_type="pt").audios.float().numpy()
    kw = dict(text=prompt, seconds=seconds, num_inference_steps=5, guidance_scale=guidance, seed=0,
              scheduler=scheduler, peak_normalize=False, progress=False)
    ours = model.generate(image=None, **kw).waveforms
    n = min(ref.shape[-1], ours.shape[-1])
    assert ref.shape[:2] == ours.shape[:2] == (1, 2) and abs(ref.shape[-1] - ours.shape[-1]) <= 1
    assert np.abs(ref).max() > 1e-3  # a real signal, not two silences
    np.testing.assert_allclose(ours[..., :n], ref[..., :n], atol=1e-4, rtol=0)
    alphas = model.synapse.mixer.alpha.detach().clone()
    try:
        with torch.no_grad():
            model.synapse.mixer.alpha.zero_()
        with_image = model.generate(image=IMAGE, **kw).waveforms
    finally:
        with torch.no_grad():
            model.synapse.mixer.alpha.copy_(alphas)
    np.testing.assert_array_equal(with_image, ours)  # alpha 0: exactly the text-only output


def test_every_edm_scheduler_gives_the_model_its_own_noise_conditioning(model):
    seen = {}
    for name in ("cosine_dpm_solver", "edm_dpm_solver", "edm_euler"):
        calls = []
        original = model.denoiser.forward

        def spy(latents, timestep, *args, _calls=calls, _original=original, **kw):
            _calls.append(float(torch.as_tensor(timestep).reshape(-1)[0]))
            return _original(latents, timestep, *args, **kw)

        model.denoiser.forward = spy
        try:
            model.generate(text="x", num_inference_steps=4, scheduler=name, progress=False)
        finally:
            del model.denoiser.forward
        seen[name] = calls
    # Stable Audio was trained on atan(sigma) * 2 / pi in (0, 1): every scheduler gives the model that
    for calls in seen.values():
        assert all(0.0 < t < 1.0 for t in calls)
    np.testing.assert_allclose(seen["edm_euler"][0], seen["cosine_dpm_solver"][0], rtol=1e-6)


def test_the_image_changes_the_audio_and_output_is_stereo(model):
    kw = dict(text="a calm flute melody", num_inference_steps=4, seed=1, progress=False)
    a = model.generate(image=IMAGE, **kw)
    b = model.generate(image=OTHER, **kw)
    none = model.generate(image=None, **kw)
    assert a.waveforms.shape == (1, 2, int(round(model.config.sampling.seconds * 44100)))
    assert a.sample_rate == 44100 and a.mel.ndim == 3
    assert np.abs(a.waveforms - b.waveforms).max() > 1e-4
    assert np.abs(a.waveforms - none.waveforms).max() > 1e-4
    two = model.generate(image=IMAGE, num_samples=2, **kw).waveforms
    assert two.shape[:2] == (2, 2)


def test_layer_pairs_and_grouped_query_heads(model):
    rows = model.synapse.wiring()
    assert [r["music_layer"] for r in rows] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert rows[0]["heads"] == "8->2" and rows[0]["aligner"] == "linear"  # SD taps 8 heads; DiT keys: 2 (GQA)


def test_multichannel_wav_is_written(model, tmp_path):
    import soundfile as sf

    out = model.generate(image=IMAGE, text="x", num_inference_steps=2, progress=False)
    (path,) = out.save(tmp_path / "stereo.wav")
    data, rate = sf.read(str(path))
    assert rate == 44100 and data.shape == (out.waveforms.shape[-1], 2)
    out.save_spectrogram(tmp_path / "stereo.png")


def test_save_and_load_round_trip_is_exact(model, tmp_path):
    path = model.save_pretrained(tmp_path / "sa")
    names = sorted(p.name for p in path.iterdir())
    assert "transformer" in names and "projection_model" in names
    loaded = mf.MelFusion.from_pretrained(path)
    kw = dict(image=IMAGE, text="a calm flute melody", num_inference_steps=3, seed=2, progress=False)
    np.testing.assert_array_equal(model.generate(**kw).waveforms, loaded.generate(**kw).waveforms)
    # the transformer folder is a stock diffusers model
    from diffusers import StableAudioDiTModel

    StableAudioDiTModel.from_pretrained(path / "transformer")
    # saving again over the same folder is allowed (it owns every entry)
    loaded.save_pretrained(path)


def test_training_a_few_steps_writes_a_loadable_model(tmp_path):
    from melfusion.datasets import write_toy_manifest
    from melfusion.training import TrainConfig, Trainer

    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=0.5, sample_rate=44100)
    cfg = TrainConfig.model_validate({"model": "tiny_stable_audio", "output": str(tmp_path / "run"),
                                      "data": {"manifest": str(manifest)}, "max_steps": 2, "batch_size": 2,
                                      "mode": "synapse+unet", "checkpoint_every": 2, "log_every": 1,
                                      "progress": False, "tensorboard": False, "plot": False,
                                      "image_features": "inversion", "inversion_steps": 4})
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.denoiser.transformer.state_dict().items()}
    result = trainer.train()
    assert np.isfinite(result.losses).all() and len(result.losses) == 2
    after = trainer.model.denoiser.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the DiT trained
    path = trainer.save_model(tmp_path / "trained")
    loaded = mf.MelFusion.from_pretrained(path)
    out = loaded.generate(image=IMAGE, text="x", num_inference_steps=2, progress=False)
    assert np.isfinite(out.waveforms).all() and out.waveforms.shape[1] == 2


def test_full_size_stable_audio_on_the_meta_device(capsys):
    assert main(["inspect", "--preset", "stable_audio"]) == 0
    out = capsys.readouterr().out
    assert "music denoiser (stable_audio_dit): 1,057,335,680 parameters (transformer 1,056,939,136" in out
    assert "865,910,724" in out  # SD 2.1's UNet
    rows = [line for line in out.splitlines() if line.startswith("up_blocks.")]
    assert len(rows) == 24  # every DiT block gets the SD tap of nearest relative depth
    assert rows[0].split()[:2] == ["up_blocks.1.attentions.0", "transformer_blocks.0.attn2"]
    assert rows[-1].split()[:2] == ["up_blocks.3.attentions.2", "transformer_blocks.23.attn2"]
    assert rows[0].split()[2:4] == ["20->12", "64"]
    assert "24 layer pairs" in out and "edm schedule (v_prediction)" in out
