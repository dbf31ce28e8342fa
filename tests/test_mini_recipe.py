"""The mini recipe end to end at toy size: data, image LDM, music model, save; reusing an image LDM."""

import json

import torch

import melfusion as mf
from melfusion.training.mini import MiniRecipe, train_mini, write_mini_data


def _recipe(**kw):
    kw.setdefault("n_image", 12)  # the shipped recipe's image LDM sees more pictures than the music (960)
    return MiniRecipe(n_train=8, n_heldout=4, image_vae_steps=3, image_unet_steps=3, music_steps=2,
                      batch_size=4, inversion_steps=4, **kw)


def test_train_mini_end_to_end_then_a_variant_on_the_same_image_ldm(tmp_path):
    model_dir = train_mini(tmp_path / "run", _recipe(), progress=False)
    model = mf.MelFusion.from_pretrained(model_dir)
    summary = json.loads((tmp_path / "run" / "mini_summary.json").read_text())
    assert set(summary["timings"]) == {"data_s", "image_ldm_s", "music_s"}
    assert len(summary["alphas"]) == 2  # the mini preset's two encoder layer pairs
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


def test_an_augmented_recipe_trains_on_other_families_and_keeps_the_heldout_set(tmp_path):
    import pytest

    from melfusion.datasets.synthetic import TRAIN_FAMILIES

    classic_train, classic_heldout = write_mini_data(tmp_path / "classic", _recipe(augment=False, n_image=None))
    train, heldout = write_mini_data(tmp_path / "augmented", _recipe(augment=True))
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert {r["family"] for r in rows} <= set(TRAIN_FAMILIES) and len(rows) == 8
    assert heldout.read_bytes() == classic_heldout.read_bytes()
    # switching augmentation on in an existing folder rewrites the training set, not silently reusing it
    write_mini_data(tmp_path / "classic", _recipe(augment=True, families=("noise",)))
    assert {json.loads(line)["family"] for line in classic_train.read_text().splitlines()} == {"noise"}
    # ... and so does another saturation range (the default's stamp is the one earlier runs wrote)
    first = classic_train.parent / json.loads(classic_train.read_text().splitlines()[0])["img_path"]
    before = first.read_bytes()
    write_mini_data(tmp_path / "classic", _recipe(augment=True, families=("noise",), saturation=(1.0, 1.0)))
    assert first.read_bytes() != before
    assert "saturation" in (tmp_path / "classic" / "train" / ".complete").read_text()
    with pytest.raises(ValueError, match="families"):
        _recipe(augment=True, families=("hexagon",))
    with pytest.raises(ValueError, match="sampling"):
        _recipe(sampling=[("image_guidance_scale", 7.0)])
    cfg = _recipe(sampling={"image_guidance_scale": 7.0}).model_config()
    assert cfg.sampling.image_guidance_scale == 7.0


def test_the_image_ldm_can_train_on_more_pictures_than_the_music(tmp_path):
    from melfusion.training.mini import image_manifest

    assert MiniRecipe().augment and MiniRecipe().n_image == 960  # the shipped recipe's
    recipe = _recipe(augment=True, n_image=12)
    train, _ = write_mini_data(tmp_path, recipe)
    pictures = image_manifest(tmp_path, recipe)
    assert pictures != train and image_manifest(tmp_path, _recipe(n_image=None)) == train
    train_rows = train.read_text().splitlines()
    picture_rows = pictures.read_text().splitlines()
    assert len(train_rows) == 8 and len(picture_rows) == 12
    assert picture_rows[:8] == train_rows  # the music's pictures are the first of the image LDM's
    for row in map(json.loads, train_rows):
        assert (train.parent / row["img_path"]).read_bytes() == (pictures.parent / row["img_path"]).read_bytes()
