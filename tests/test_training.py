"""Training (Algorithm 1): learning, exact resume, bad data, interrupted checkpoints, non-finite losses, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from melfusion.datasets import ManifestError, write_toy_manifest
from melfusion.training import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
)
from melfusion.training.checkpoints import optimizer_state_from_files, optimizer_state_to_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_manifest(tmp_path_factory.mktemp("toy"), n=8, seconds=1.0)


def make_config(manifest: Path, output: Path, **fields) -> TrainConfig:
    data = {
        "model": "tiny",
        "data": {"manifest": str(manifest)},
        "output": str(output),
        "batch_size": 2,
        "max_steps": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "optim": {"unet_lr": 1e-3, "alpha_lr": 1e-2},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return TrainConfig.model_validate(data)


def trained_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer._trained().items()}


# -- learning ------------------------------------------------------------------------------------


def test_loss_falls_over_50_steps_and_alphas_move(toy, tmp_path):
    cfg = make_config(toy, tmp_path / "run", max_steps=50, batch_size=2, checkpoint_every=50, plot=True)
    trainer = Trainer(cfg)
    start_alphas = trainer._alphas()
    result = trainer.train()
    losses = np.array(result.losses)
    assert len(losses) == 50 and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.6 * first, (first, last)
    end_alphas = trainer._alphas()
    assert start_alphas == pytest.approx([0.5, 0.5])
    assert all(abs(e - s) > 1e-3 for s, e in zip(start_alphas, end_alphas, strict=True)), end_alphas
    # the log, the plot and the saved model
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,lr_alphas,lr_unet") and "alpha_0" in log[0] and len(log) == 51
    assert (tmp_path / "run" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from melfusion import MelFusion

    loaded = MelFusion.from_pretrained(result.model_path)
    assert loaded.synapse.mixer.alphas().tolist() == pytest.approx(end_alphas, abs=1e-6)


# -- exact resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    {},
    {"image_features": "inverted", "inversion_steps": 10, "prediction_type": "v_prediction", "min_snr_gamma": 5.0,
     "gradient_accumulation_steps": 2, "ema": {"enabled": True, "decay": 0.9},
     "optim": {"lr_scheduler": "cosine", "warmup_steps": 2}},
], ids=["default", "inverted-v-minsnr-accum-ema-cosine"])
def test_resume_is_exact(toy, tmp_path, variant):
    full = Trainer(make_config(toy, tmp_path / "full", max_steps=6, checkpoint_every=3, **variant))
    full_result = full.train()

    # the same run, stopped after 3 steps (the learning-rate schedule still spans 6)
    first = Trainer(make_config(toy, tmp_path / "split", max_steps=6, checkpoint_every=3, **variant))
    first.train(max_steps=3)
    second = Trainer(make_config(toy, tmp_path / "split", max_steps=6, checkpoint_every=3, **variant))
    second_result = second.train(resume=True)

    assert second_result.step == 6
    a, b = trained_state(full), trained_state(second)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert full_result.losses[3:] == pytest.approx(second_result.losses, abs=1e-6)
    if full.ema is not None:
        for k in full.ema.shadow:
            torch.testing.assert_close(full.ema.shadow[k], second.ema.shadow[k], atol=1e-6, rtol=0)
    # the resumed run's log reads as one run
    steps = [int(r.split(",")[0]) for r in (tmp_path / "split" / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fresh_run_refuses_an_output_with_checkpoints(toy, tmp_path):
    Trainer(make_config(toy, tmp_path / "run", max_steps=2)).train()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(make_config(toy, tmp_path / "run", max_steps=2)).train()


def test_resume_rejects_a_different_run(toy, tmp_path):
    Trainer(make_config(toy, tmp_path / "run", max_steps=2)).train()
    other = Trainer(make_config(toy, tmp_path / "run", max_steps=4, batch_size=4))
    with pytest.raises(ValueError, match="batch_size"):
        other.train(resume=True)


# -- what is trained ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["alphas", "synapse", "synapse+unet"])
def test_modes_train_only_their_parameters(toy, tmp_path, mode):
    model_cfg = TrainConfig().model_config_resolved().model_copy(deep=True)
    model_cfg.synapse.aligner.name = "linear"  # an aligner with parameters
    cfg = make_config(toy, tmp_path / "run", max_steps=2, mode=mode, model=model_cfg,
                      optim={"synapse_lr": 1e-2})
    trainer = Trainer(cfg)
    unet0 = {k: v.clone() for k, v in trainer.model.denoiser.unet.state_dict().items()}
    mixer0 = [p.clone() for p in trainer.model.synapse.mixer.parameters()]
    aligner0 = [p.clone() for p in trainer.model.synapse.aligners.parameters()]
    trainer.train()
    unet_changed = any(not torch.equal(unet0[k], v) for k, v in trainer.model.denoiser.unet.state_dict().items())
    mixer_changed = any(not torch.equal(a, b) for a, b in zip(mixer0, trainer.model.synapse.mixer.parameters(), strict=True))
    aligner_changed = any(not torch.equal(a, b)
                          for a, b in zip(aligner0, trainer.model.synapse.aligners.parameters(), strict=True))
    assert mixer_changed
    assert aligner_changed == (mode != "alphas")
    assert unet_changed == (mode == "synapse+unet")
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["alphas"] == 1e-2


def test_text_only_model_trains(toy, tmp_path):
    model_cfg = TrainConfig().model_config_resolved().model_copy(deep=True)
    model_cfg.synapse.enabled = False
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=2, model=model_cfg))
    assert np.isfinite(trainer.train().losses).all()
    with pytest.raises(ValueError, match="mode"):
        make_config(toy, tmp_path / "x", model=model_cfg, mode="alphas")


# -- bad data -------------------------------------------------------------------------------------


@pytest.fixture()
def bad_manifest(toy, tmp_path) -> Path:
    """The toy rows plus a missing file, a corrupt WAV, a zero-length WAV and an empty caption."""
    folder = toy.parent
    rows = [json.loads(line) for line in toy.read_text().splitlines()]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 20)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    image = str(folder / rows[0]["img_path"])
    extra = [
        {"captions": "missing audio", "location": str(tmp_path / "nope.wav"), "img_path": image},
        {"captions": "corrupt audio", "location": str(tmp_path / "corrupt.wav"), "img_path": image},
        {"captions": "zero-length audio", "location": str(tmp_path / "empty.wav"), "img_path": image},
        {"captions": "   ", "location": str(folder / rows[1]["location"]), "img_path": image},
    ]
    good = [{**r, "location": str(folder / r["location"]), "img_path": str(folder / r["img_path"])} for r in rows]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good[:4] + extra + good[4:]) + "\n")
    return path


def test_bad_rows_error_names_each_row(bad_manifest, tmp_path):
    with pytest.raises(ManifestError) as info:
        Trainer(make_config(bad_manifest, tmp_path / "run"))
    message = str(info.value)
    for row, needle in ((5, "nope.wav"), (6, "corrupt.wav"), (7, "empty.wav"), (8, "caption")):
        assert f"row {row}" in message and needle in message, message
    assert len(info.value.bad) == 4


def test_bad_rows_skip_trains_on_the_rest_and_reports(bad_manifest, tmp_path):
    with pytest.warns(UserWarning, match="skipping 4 bad rows"):
        trainer = Trainer(make_config(bad_manifest, tmp_path / "run", max_steps=2, data={"on_bad_rows": "skip"}))
    assert len(trainer.rows) == 8 and [r for r, _ in trainer.skipped] == [5, 6, 7, 8]
    assert np.isfinite(trainer.train().losses).all()
    report = json.loads((tmp_path / "run" / "skipped_rows.json").read_text())
    assert [b["row"] for b in report["bad"]] == [5, 6, 7, 8]


# -- failures mid-run -------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(toy, tmp_path, monkeypatch):
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=6, checkpoint_every=2))
    real = trainer._micro_loss

    def poisoned(batch, step, micro):
        loss = real(batch, step, micro)
        return loss * float("nan") if step == 3 else loss

    monkeypatch.setattr(trainer, "_micro_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 4.*step-00000002"):
        trainer.train()
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "step-00000002"
    tensors, state = load_checkpoint(last)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in tensors["trainable"].values())


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import melfusion.training.checkpoints as ck
    from melfusion.training import TrainConfig, Trainer

    real = ck.save_file
    calls = {"n": 0}

    def dying_save_file(tensors, path):
        real(tensors, path)
        if "step-00000004" in path:  # the second checkpoint: die after its first file
            os.kill(os.getpid(), signal.SIGKILL)

    ck.save_file = dying_save_file
    cfg = TrainConfig.model_validate_json(sys.argv[1])
    Trainer(cfg).train()
""")


def test_killed_checkpoint_write_leaves_the_previous_one_loadable(toy, tmp_path):
    cfg = make_config(toy, tmp_path / "run", max_steps=6, checkpoint_every=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json()], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "run" / "checkpoints"
    assert list(folder.glob(".step-00000004.melfusion-tmp-*")), "the kill did not happen during the write"
    last = latest_checkpoint(folder)
    assert last.name == "step-00000002"
    # resuming continues from step 2 and cleans up the half-written folder
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=4, checkpoint_every=2))
    assert trainer.train(resume=True).step == 4
    assert not list(folder.glob(".step-*.melfusion-tmp-*"))
    assert latest_checkpoint(folder).name == "step-00000004"


# -- distributed ------------------------------------------------------------------------------------


@pytest.mark.slow  # tests/test_sharded.py runs the same launch as its DDP reference in the default run
def test_two_processes_with_gloo_train_like_one(toy, tmp_path):
    config = tmp_path / "train.yaml"
    make_config(toy, tmp_path / "unused", max_steps=2, checkpoint_every=2).save(config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # on a machine without GPUs, --multi_gpu is accelerate's way to start torchrun; the trainer then picks gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "melfusion.cli", "train", "--config", str(config), "--output", str(tmp_path / "two")]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 2 steps" in proc.stdout
    two, two_state = load_checkpoint(latest_checkpoint(tmp_path / "two" / "checkpoints"))
    assert two_state["world_size"] == 2

    one_trainer = Trainer(make_config(toy, tmp_path / "one", max_steps=2, checkpoint_every=2))
    one_trainer.train()
    one, one_state = load_checkpoint(latest_checkpoint(tmp_path / "one" / "checkpoints"))
    assert one_state["world_size"] == 1
    assert two.keys() == one.keys()
    for stem in one:
        assert {k: v.shape for k, v in two[stem].items()} == {k: v.shape for k, v in one[stem].items()}
    assert all(torch.isfinite(v).all() for v in two["trainable"].values())
    from melfusion import MelFusion

    MelFusion.from_pretrained(tmp_path / "two" / "model")  # the saved model loads


# -- pieces ------------------------------------------------------------------------------------------


def test_optimizer_state_round_trips_without_pickle():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 1e-5}])
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_state_to_files(opt)
    json.dumps(meta)  # plain JSON
    other = torch.optim.AdamW([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 1.0}])
    optimizer_state_from_files(other, tensors, meta)
    a, b = opt.state_dict(), other.state_dict()
    assert [g["lr"] for g in b["param_groups"]] == [1e-3, 1e-5]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            torch.testing.assert_close(v, b["state"][i][k])


def test_features_at_uses_each_samples_own_timestep(tiny_model):
    fs = tiny_model.feature_source
    torch.manual_seed(0)
    x = torch.randn(2, fs.unet.config.in_channels, fs.latent_size, fs.latent_size)
    both = fs.features_at(x, torch.tensor([10, 700]))
    for i, t in enumerate((10, 700)):
        one = fs.features_at(x[i:i + 1], torch.tensor([t]))
        for name, (k, v) in one.items():
            torch.testing.assert_close(both[name][0][i:i + 1], k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(both[name][1][i:i + 1], v, atol=1e-5, rtol=1e-5)


def test_inversion_latents_end_where_invert_ends(tiny_model):
    fs = tiny_model.feature_source
    torch.manual_seed(0)
    z = torch.randn(1, fs.unet.config.in_channels, fs.latent_size, fs.latent_size)
    ts = [1, 101, 201, 301]
    traj = fs.inversion_latents(z, ts)
    assert sorted(traj) == ts
    torch.testing.assert_close(traj[301], fs.invert(z, ts).float())


def test_torch_mel_matches_librosa_front_end():
    from melfusion.datasets import MelFrontEnd

    fe = MelFrontEnd()
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    np.testing.assert_allclose(fe.batch(torch.from_numpy(wave)[None])[0].numpy(), fe(wave), atol=1e-4)


# -- config and CLI --------------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_applies_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: tiny\nbatch_size: 2\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.load(path)
    path.write_text("model: tiny\ndata: {manifest: a.jsonl}\n")
    cfg = TrainConfig.load(path, **{"data.manifest": "b.jsonl", "max_steps": 7, "output": None})
    assert cfg.data.manifest == "b.jsonl" and cfg.max_steps == 7 and cfg.output == "runs/melfusion"
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="no-such-preset")


def test_cli_train_and_resume(toy, tmp_path, capsys):
    from melfusion.cli import main

    out = tmp_path / "run"
    example = REPO / "examples" / "train-tiny.yaml"
    args = ["train", "--config", str(example), "--manifest", str(toy), "--output", str(out)]
    assert main(args + ["--max-steps", "2"]) == 0
    assert "trained 2 steps on 8 rows" in capsys.readouterr().out
    assert (out / "model" / "melfusion_config.json").is_file()
    assert main(args + ["--max-steps", "3", "--resume"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    # errors: one line naming the problem, exit 2
    assert main(["train", "--config", str(example), "--manifest", str(tmp_path / "none.jsonl"),
                 "--output", str(tmp_path / "x")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_every_config_field_is_documented():
    from melfusion.training import DataConfig, EMAConfig, OptimConfig

    doc = (REPO / "docs" / "training.md").read_text()
    names = [f"`{n}`" for n in TrainConfig.model_fields]
    names += [f"`{prefix}.{n}`" for prefix, cls in (("data", DataConfig), ("optim", OptimConfig), ("ema", EMAConfig))
              for n in cls.model_fields]
    missing = [n for n in names if n not in doc]
    assert not missing, f"docs/training.md does not document {missing}"


def test_data_workers_do_not_change_the_run(toy, tmp_path):
    a = Trainer(make_config(toy, tmp_path / "a", max_steps=2)).train()
    b = Trainer(make_config(toy, tmp_path / "b", max_steps=2, data={"num_workers": 1})).train()
    assert a.losses == pytest.approx(b.losses, abs=1e-6)


def test_init_from_starts_from_a_saved_model(toy, tmp_path):
    first = Trainer(make_config(toy, tmp_path / "a", max_steps=2))
    result = first.train()
    second = Trainer(make_config(toy, tmp_path / "b", max_steps=2, init_from=str(result.model_path)))
    for k, v in first._trained().items():
        torch.testing.assert_close(second._trained()[k], v.detach())


@pytest.mark.parametrize("features", ["inverted", "noised"])
def test_image_timestep_cap_applies_in_training(toy, tmp_path, features):
    """``synapse.image_timestep_max``: every sample's image features come from no later than the cap, and (for
    inverted features) from the grid points generation would use."""
    model_cfg = TrainConfig().model_config_resolved().model_copy(deep=True)
    model_cfg.synapse.image_timestep_max = 300
    trainer = Trainer(make_config(toy, tmp_path / "run", max_steps=1, model=model_cfg, image_features=features,
                                  inversion_steps=10))
    fs = trainer.model.feature_source
    seen = []
    original = fs.features_at

    def record(x, timesteps):
        seen.append(timesteps.cpu().clone())
        return original(x, timesteps)

    fs.features_at = record
    images = torch.rand(3, 3, fs.resolution, fs.resolution, generator=torch.Generator().manual_seed(0))
    trainer._image_kv(images, torch.tensor([999, 400, 10]), torch.Generator().manual_seed(0))
    used = seen[-1].tolist()
    if features == "noised":
        assert used == [300, 300, 10]
    else:
        grid = trainer.inversion_grid
        kept = grid[grid <= 300]
        assert used[0] == used[1] == int(kept.max())
        assert used[2] == int(grid[(grid - 10).abs().argmin()])
    assert max(used) <= 300
