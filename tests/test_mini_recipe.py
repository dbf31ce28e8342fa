"""The mini recipe end to end at toy size: data, image LDM, music model, save; reusing an image LDM."""

import json

import torch

import melfusion as mf
from melfusion.training.mini import MiniRecipe, train_mini, write_mini_data


def _recipe(**kw):
    return MiniRecipe(n_train=8, n_heldout=4, image_vae_steps=3, image_unet_steps=3, music_steps=2,
                      batch_size=4, inversion_steps=4, **kw)


def test_train_mini_end_to_end_then_a_variant_on_the_same_image_ldm(tmp_path):
    model_dir = train_mini(tmp_path / "run", _recipe(), progress=False)
    model = mf.MelFusion.from_pretrained(model_dir)
    summary = json.loads((tmp_path / "run" / "mini_summary.json").read_text())
    assert set(summary["timings"]) == {"data_s", "image_ldm_s", "music_s"}
    assert len(summary["alphas"]) == 4
    # the trained VAE's latent scale travels with the saved config
    scale = model.config.feature_source.params["vae"]["config"]["scaling_factor"]
    assert scale == model.feature_source.vae.config.scaling_factor != 0.18215
    out = model.generate(image=str(tmp_path / "run/data/heldout/images/syn_100000.png"), text="a calm flute melody",
                         num_inference_steps=2, progress=False)
    assert out.waveforms.shape == (1, 40960)

    variant = train_mini(tmp_path / "text-only", _recipe(synapse={"enabled": False}), image_from=model_dir,
                         progress=False)
    other = mf.MelFusion.from_pretrained(variant)
    assert other.synapse is None
    for a, b in zip(model.feature_source.unet.parameters(), other.feature_source.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mini_data_is_reused_and_held_out(tmp_path):
    recipe = _recipe()
    train, heldout = write_mini_data(tmp_path, recipe)
    stamp = train.stat().st_mtime_ns
    assert write_mini_data(tmp_path, recipe) == (train, heldout)
    assert train.stat().st_mtime_ns == stamp  # not rewritten
    train_images = {json.loads(line)["img_path"] for line in train.read_text().splitlines()}
    assert not train_images & {json.loads(line)["img_path"] for line in heldout.read_text().splitlines()}
