"""Sharded training: accelerate's FSDP2 engine and DeepSpeed ZeRO-2 train exactly as data parallelism does,
checkpoints hold whole tensors in the usual layout, a resumed sharded run continues exactly (across engines
too, for ZeRO), and the saved model loads. Megatron-LM, FSDP version 1 and the DeepSpeed settings the trainer
does not run are refused before any work, with what to use instead.

accelerate selects FSDP only from GPU-family distributed types; tests/helpers/fsdp_cpu.py marks two CPU
processes (gloo) as multi-GPU so that accelerate's own FSDP2 path runs here. DeepSpeed runs on the CPU, but
accelerate gives its processes no backend there; tests/helpers/deepspeed_cpu.py corrects that (docs/training.md,
"Sharded training").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import DistributedType

from melfusion.datasets import write_toy_manifest
from melfusion.training import TrainConfig, Trainer, latest_checkpoint, load_checkpoint
from melfusion.training.sharding import is_sharded, local, shard_like, whole, whole_parameters

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "helpers" / "fsdp_cpu.py"
FSDP_CONFIG = REPO / "examples" / "accelerate" / "fsdp.yaml"
DEEPSPEED_WORKER = REPO / "tests" / "helpers" / "deepspeed_cpu.py"
DEEPSPEED_YAML = REPO / "examples" / "accelerate" / "deepspeed_zero2.yaml"
DEEPSPEED_JSON = REPO / "examples" / "accelerate" / "deepspeed_zero2.json"


def _config(manifest: Path, output: Path, **fields) -> TrainConfig:
    data = {"model": "tiny", "data": {"manifest": str(manifest)}, "output": str(output), "max_steps": 1,
            "progress": False, "tensorboard": False, "plot": False}
    return TrainConfig.model_validate({**data, **fields})


def test_trainer_refuses_megatron(tmp_path):
    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    fake = SimpleNamespace(distributed_type=DistributedType.MEGATRON_LM, device="cpu", is_main_process=True,
                           num_processes=2)
    with pytest.raises(ValueError, match=r"^accelerate: distributed_type MEGATRON_LM \(sharded training\) is not "
                                         r"supported .*Use FSDP .*examples/accelerate/fsdp.yaml.*DeepSpeed ZeRO-2"):
        Trainer(_config(manifest, tmp_path / "run"), accelerator=fake)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _fake_deepspeed(ds_config: dict, processes: int = 2) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, device="cpu", is_main_process=True,
                           num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize(("ds_config", "mixed", "message"), [
    ({"zero_optimization": {"stage": 3}}, "no", r"zero_optimization.stage 3 is not supported .*stages 1 and 2.*"
                                                r"ZeRO-3.*use FSDP: examples/accelerate/fsdp.yaml"),
    ({"zero_optimization": {"stage": 0}}, "no", r"zero_optimization.stage 0 is not supported"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "no",
     r"zero_optimization.offload_optimizer \(device cpu\) is not supported"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "bf16",
     r"DeepSpeed bf16.enabled casts .* set bf16.enabled false and torch_autocast: \{enabled: true, dtype: bfloat16\}"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": "true"}}, "no", r"DeepSpeed fp16.enabled casts"),
    ({"zero_optimization": {"stage": 2}}, "fp16", r"^mixed_precision: fp16 is not supported under DeepSpeed"),
    ({"zero_optimization": {"stage": "3"}}, "no", r"zero_optimization.stage 3 is not supported"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "no",
     r"has a 'scheduler' section; melfusion's trainer builds its own \(set optim.lr_scheduler"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "no", r"has a 'optimizer' section"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "yes"}}, "no",
     r"bf16.enabled is 'yes'; give true, false or \"auto\""),
    ({"zero_optimization": [2]}, "no", r"zero_optimization is not a mapping"),
])
def test_trainer_refuses_deepspeed_settings_it_does_not_run(tmp_path, ds_config, mixed, message):
    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    with pytest.raises(ValueError, match=message):
        Trainer(_config(manifest, tmp_path / "run", mixed_precision=mixed), accelerator=_fake_deepspeed(ds_config))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_deepspeed_on_cpu_processes_is_refused_not_run_as_ddp(tmp_path, monkeypatch):
    """`accelerate launch` with a DeepSpeed config on a machine without GPUs: accelerate would train plain DDP
    (its CPU processes stay MULTI_CPU); the trainer says so instead, before any work."""
    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^accelerate: DeepSpeed was asked for .* without a GPU"):
        Trainer(_config(manifest, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_zero_config_takes_the_training_configs_batch_clipping_and_precision():
    from melfusion.training.zero import fill_zero_config

    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "torch_autocast": {"enabled": "auto", "dtype": "auto"}}
    fill_zero_config(_fake_deepspeed(ds, processes=4), batch_size=3, gradient_accumulation_steps=2,
                     max_grad_norm=0.5, mixed_precision="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    ds = {"zero_optimization": {"stage": 2}}  # absent values too; no clipping is 0; no autocast without bf16
    fill_zero_config(_fake_deepspeed(ds), batch_size=1, gradient_accumulation_steps=1, max_grad_norm=None)
    assert ds["gradient_clipping"] == 0.0 and ds["torch_autocast"] == {"enabled": False}
    assert ds["train_batch_size"] == 2
    for key, value, named in [("train_micro_batch_size_per_gpu", 4, "batch_size gives 3"),
                              ("gradient_accumulation_steps", 1, "gradient_accumulation_steps gives 2"),
                              ("gradient_clipping", 1.0, "optim.max_grad_norm gives 0.5")]:
        ds = {"zero_optimization": {"stage": 2}, key: value}
        with pytest.raises(ValueError, match=rf"^accelerate: the DeepSpeed config sets {key} {value}, .*{named}"):
            fill_zero_config(_fake_deepspeed(ds), batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5)
    ds = {"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}}
    with pytest.raises(ValueError, match=r"torch_autocast.enabled True, the training config's mixed_precision is "
                                         r"'no'"):
        fill_zero_config(_fake_deepspeed(ds), batch_size=1, gradient_accumulation_steps=1, max_grad_norm=None)
    # DeepSpeed reads any string as true and compares numbers as numbers: what is written is the training
    # config's value, typed; an equal string passes, "false" stays off, and a word is named
    ds = {"zero_optimization": {"stage": 2}, "gradient_clipping": "0.5", "train_micro_batch_size_per_gpu": "3",
          "torch_autocast": {"enabled": "false"}}
    fill_zero_config(_fake_deepspeed(ds), batch_size=3, gradient_accumulation_steps=1, max_grad_norm=0.5)
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["torch_autocast"]["enabled"] is False
    ds = {"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": "TRUE", "dtype": "bf16"}}
    fill_zero_config(_fake_deepspeed(ds), batch_size=1, gradient_accumulation_steps=1, max_grad_norm=None,
                     mixed_precision="bf16")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    for value in ("none", "Auto", float("nan")):
        ds = {"zero_optimization": {"stage": 2}, "gradient_clipping": value}
        with pytest.raises(ValueError, match=r"^accelerate: the DeepSpeed config's gradient_clipping is .*, not a"):
            fill_zero_config(_fake_deepspeed(ds), batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0)
    ds = {"zero_optimization": {"stage": 2}, "torch_autocast": {"dtype": "float16"}}
    with pytest.raises(ValueError, match=r"torch_autocast.dtype is float16; .* runs bfloat16"):
        fill_zero_config(_fake_deepspeed(ds), batch_size=1, gradient_accumulation_steps=1, max_grad_norm=None,
                         mixed_precision="bf16")


def test_shipped_deepspeed_config_loads_in_accelerate():
    """examples/accelerate/deepspeed_zero2.json is a DeepSpeed config accelerate reads, ZeRO stage 2 with float32
    weights, and what melfusion fills in is "auto" there (so any training config runs with it)."""
    pytest.importorskip("deepspeed")
    import json

    from accelerate.utils import DeepSpeedPlugin

    from melfusion.training.zero import check_zero_config

    plugin = DeepSpeedPlugin(hf_ds_config=str(DEEPSPEED_JSON))
    assert plugin.zero_stage == 2
    raw = json.loads(DEEPSPEED_JSON.read_text())
    assert all(raw[k] == "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                          "train_batch_size", "gradient_clipping"))
    check_zero_config(_fake_deepspeed(plugin.deepspeed_config), "bf16")
    text = DEEPSPEED_YAML.read_text()
    assert "distributed_type: DEEPSPEED" in text and "deepspeed_config_file: examples/accelerate/deepspeed_zero2.json" in text


def test_trainer_refuses_fsdp_version_1(tmp_path):
    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, device="cpu", is_main_process=True,
                           num_processes=2, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match=r"^accelerate: FSDP version 1 is not supported .*fsdp_version: 2"):
        Trainer(_config(manifest, tmp_path / "run"), accelerator=fake)
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_fsdp_parameter_offload(tmp_path):
    from torch.distributed.fsdp import CPUOffloadPolicy

    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    plugin = SimpleNamespace(fsdp_version=2, cpu_offload=CPUOffloadPolicy())
    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, device="cpu", is_main_process=True,
                           num_processes=2, state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(ValueError, match=r"^accelerate: FSDP parameter offload .* fsdp_offload_params: false"):
        Trainer(_config(manifest, tmp_path / "run"), accelerator=fake)
    assert not (tmp_path / "run").exists()


def test_data_parallel_accelerators_pass_the_check(tmp_path):
    from accelerate import Accelerator

    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    trainer = Trainer(_config(manifest, tmp_path / "run"), accelerator=Accelerator(cpu=True))
    assert trainer.accelerator.distributed_type == DistributedType.NO
    assert not trainer.sharded
    trainer.close()


def test_sharding_helpers_leave_plain_tensors_alone():
    x = torch.randn(3, 4)
    assert not is_sharded(x)
    assert local(x) is x
    assert torch.equal(whole(x), x)
    like = torch.zeros(3, 4, dtype=torch.float64)
    moved = shard_like(x, like)
    assert moved.dtype == torch.float64 and torch.equal(moved, x.double())
    # the EMA stays float32 on resume whatever the weights' dtype (it was once rounded to theirs)
    precise = torch.tensor([1.0001, 0.123456789])
    assert torch.equal(shard_like(precise, torch.zeros(2, dtype=torch.bfloat16), dtype=torch.float32), precise)
    layer = torch.nn.Linear(4, 2)
    before = layer.weight
    with whole_parameters(layer):
        assert layer.weight is before  # nothing sharded: nothing swapped
    assert layer.weight is before


def _launch(config: Path, output: Path, engine: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if engine == "launched":  # through accelerate's launcher and the shipped config file, as on GPUs
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2",
                    "--mixed_precision", "no"]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [sys.executable, *launcher, str(WORKER), str(config), str(output), engine, *args]
    if engine == "cli":  # data parallelism as the docs start it: accelerate launch --multi_gpu, the CLI
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "melfusion.cli",
               "train", "--config", str(config), "--output", str(output), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path]:
    """The reference for the sharded engines: two CPU processes under DDP, through `accelerate launch
    --multi_gpu` and the CLI, mode synapse+unet (the default) with gradient accumulation, clipping, an EMA and
    two learning-rate groups, two steps, a checkpoint after each: ``(train.yaml, run folder)``."""
    tmp = tmp_path_factory.mktemp("ddp")
    manifest = write_toy_manifest(tmp / "toy", n=8, seconds=1.0)
    config = tmp / "train.yaml"
    _config(manifest, tmp / "unused", batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            checkpoint_every=1, keep_last=3, ema={"enabled": True, "decay": 0.5},
            optim={"unet_lr": 1e-3, "alpha_lr": 1e-2, "max_grad_norm": 0.5}).save(config)
    out = _launch(config, tmp / "ddp", "cli")
    assert "trained 2 steps" in out
    return config, tmp / "ddp"


def _assert_checkpoints_match(run: Path, reference: Path, step: int) -> None:
    """Every checkpointed tensor (trained weights, EMA, AdamW state) of ``run`` at ``step`` is whole and equals
    the reference's within 1e-6."""
    ref, ref_state = load_checkpoint(reference / "checkpoints" / f"step-{step:08d}")
    got, got_state = load_checkpoint(run / "checkpoints" / f"step-{step:08d}")
    assert got_state["world_size"] == ref_state["world_size"] == 2
    assert got.keys() == ref.keys() == {"trainable", "optimizer", "ema"}
    for stem in ref:
        assert got[stem].keys() == ref[stem].keys(), stem
        for key, want in ref[stem].items():
            assert got[stem][key].shape == want.shape, (stem, key)  # whole tensors, not one process's slice
            torch.testing.assert_close(got[stem][key], want, rtol=1e-6, atol=1e-6, msg=f"{stem}: {key}")
    assert got_state["optimizer"]["plain_state"] == ref_state["optimizer"]["plain_state"]
    assert [g["params"] for g in got_state["optimizer"]["param_groups"]] == \
        [g["params"] for g in ref_state["optimizer"]["param_groups"]]
    assert [g["lr"] for g in got_state["optimizer"]["param_groups"]] == \
        [g["lr"] for g in ref_state["optimizer"]["param_groups"]]


def _assert_models_match(run: Path, reference: Path) -> None:
    from melfusion import MelFusion

    a = MelFusion.from_pretrained(run / "model")
    b = MelFusion.from_pretrained(reference / "model")
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert sa.keys() == sb.keys()
    for key in sb:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-6, msg=key)
    torch.testing.assert_close(a.synapse.mixer.alphas(), b.synapse.mixer.alphas(), rtol=1e-6, atol=1e-6)


def test_fsdp_trains_as_ddp_does_and_resumes_exactly(tmp_path, ddp_run):
    """Two CPU processes under accelerate's FSDP2 (the tiny UNet's transformer blocks as units), the reference's
    settings, launched with examples/accelerate/fsdp.yaml: after one step, a checkpoint and a second step resumed
    by a new model and trainer, every checkpointed tensor (trained weights, EMA, AdamW state) is whole and equals
    the same run under DDP within 1e-6, and the saved models agree."""
    config, ddp = ddp_run
    # examples/accelerate/fsdp.yaml: one step, then a new model and trainer resume from its checkpoint
    out = _launch(config, tmp_path / "fsdp", "launched", "--max-steps", "1", "--then-resume")
    assert "plugin: fsdp_version=2 wrap=['BasicTransformerBlock']" in out
    assert "trained 1 steps; resuming" in out
    done = next(line for line in out.splitlines() if line.startswith("trained 2 steps;"))
    sharded, total = (int(w) for w in done.split("; ")[1].split()[0:3:2])
    assert sharded == total > 0  # every trained tensor was a slice

    for step in (1, 2):
        _assert_checkpoints_match(tmp_path / "fsdp", ddp, step)
    first, _ = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "step-00000001")
    last, _ = load_checkpoint(latest_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    moved = [k for k in last["trainable"] if not torch.equal(last["trainable"][k], first["trainable"][k])]
    assert len(moved) > len(last["trainable"]) // 2  # the second step trained

    _assert_models_match(tmp_path / "fsdp", ddp)
    from melfusion import MelFusion

    a = MelFusion.from_pretrained(tmp_path / "fsdp" / "model")
    # the saved model holds the averaged (EMA) weights, as without sharding
    ema = last["ema"]
    named = dict(a.denoiser.named_parameters())
    checked = 0
    for key, value in ema.items():
        name = key.removeprefix("denoiser.")
        if name in named:
            torch.testing.assert_close(named[name].detach(), value, rtol=1e-6, atol=1e-6, msg=key)
            checked += 1
    assert checked > 10


def test_deepspeed_zero2_trains_as_ddp_does_and_resumes_exactly(tmp_path, ddp_run):
    """Two CPU processes under accelerate's DeepSpeed engine, ZeRO stage 2, launched with
    examples/accelerate/deepspeed_zero2.yaml, the reference's settings (batch, accumulation and clipping reach
    DeepSpeed through the config's "auto" values): each process holds about half the AdamW state; after one
    step, a checkpoint and a second step resumed by a new model and trainer, every checkpointed tensor (trained
    weights, EMA, AdamW state) is whole and equals the same run under DDP within 1e-6, the saved models agree,
    and a ZeRO run resumes the DDP run's first checkpoint to the same second step."""
    pytest.importorskip("deepspeed")
    config, ddp = ddp_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DEEPSPEED_YAML),
           "--num_processes", "2", str(DEEPSPEED_WORKER), str(config), str(tmp_path / "zero"), "--max-steps", "1",
           "--then-resume", "--also-resume", str(ddp / "checkpoints" / "step-00000001"), str(tmp_path / "cross"),
           "--nan-gradient", str(tmp_path / "nan")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "zero stage 2; optimizer DeepSpeedZeroOptimizer" in out
    held = [line.split() for line in out.splitlines() if line.startswith("rank ") and " holds " in line]
    assert len(held) == 2
    total = int(held[0][5])
    parts = [int(words[3]) for words in held]
    assert all(0.4 * total < n < 0.6 * total for n in parts), (parts, total)  # split, not replicated
    assert total <= sum(parts) < total + 64  # together, all of it (DeepSpeed pads each group's flat copy a little)
    assert "trained 1 steps; resuming" in out and "trained 2 steps" in out
    assert "resumed step-00000001: trained 2 steps" in out

    for step in (1, 2):
        _assert_checkpoints_match(tmp_path / "zero", ddp, step)
    _assert_checkpoints_match(tmp_path / "cross", ddp, 2)  # a checkpoint written without DeepSpeed resumes
    _assert_models_match(tmp_path / "zero", ddp)
    _assert_models_match(tmp_path / "cross", ddp)
    # NaN gradients with a finite loss: DeepSpeed skips the update; the trainer stops, as it does without it
    refused = next(line for line in out.splitlines() if line.startswith("refused: "))
    assert "training: the gradients hold NaN or infinite values at step 1" in refused, refused
    assert refused.endswith("unchanged: True"), refused
    assert not list((tmp_path / "nan" / "checkpoints").glob("step-*"))

    # and a checkpoint written under ZeRO resumes in one process without DeepSpeed, its state as written
    saved, _ = load_checkpoint(tmp_path / "zero" / "checkpoints" / "step-00000001")
    import shutil

    shutil.copytree(tmp_path / "zero" / "checkpoints" / "step-00000001",
                    tmp_path / "plain" / "checkpoints" / "step-00000001")
    trainer = Trainer(TrainConfig.load(config, output=str(tmp_path / "plain")))
    with pytest.warns(UserWarning, match="written by 2 processes, this run has 1"):
        trainer.load_state(tmp_path / "plain" / "checkpoints" / "step-00000001")
    again, _ = trainer.state_tensors()
    trainer.close()
    for stem in ("trainable", "optimizer", "ema"):
        assert again[stem].keys() == saved[stem].keys(), stem
        for key, want in saved[stem].items():
            assert torch.equal(again[stem][key].cpu(), want), (stem, key)


def test_models_load_onto_an_indexed_cpu(tmp_path):
    """accelerate gives each CPU process the device ``cpu:0``; safetensors only takes ``cpu``. A run with
    ``init_from`` on several CPU processes loaded nothing before this was handled."""
    from melfusion import MelFusion, MelFusionConfig

    torch.manual_seed(0)
    model = MelFusion.from_config(MelFusionConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    loaded = MelFusion.from_pretrained(tmp_path / "m", device=torch.device("cpu:0"))
    want, got = model.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
