"""Sharded training: accelerate's FSDP2 engine trains exactly as data parallelism does, checkpoints hold whole
tensors, a resumed sharded run continues exactly, and the saved model loads. DeepSpeed, Megatron-LM and FSDP
version 1 are refused before any work, with what to use instead.

accelerate selects FSDP only from GPU-family distributed types; tests/helpers/fsdp_cpu.py marks two CPU
processes (gloo) as multi-GPU so that accelerate's own FSDP2 path runs here (docs/training.md, "Sharded
training").
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


def _config(manifest: Path, output: Path, **fields) -> TrainConfig:
    data = {"model": "tiny", "data": {"manifest": str(manifest)}, "output": str(output), "max_steps": 1,
            "progress": False, "tensorboard": False, "plot": False}
    return TrainConfig.model_validate({**data, **fields})


@pytest.mark.parametrize("engine", [DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM])
def test_trainer_refuses_deepspeed_and_megatron(tmp_path, engine):
    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    fake = SimpleNamespace(distributed_type=engine, device="cpu", is_main_process=True, num_processes=2)
    with pytest.raises(ValueError, match=rf"^accelerate: distributed_type {engine.name} \(sharded training\) is not "
                                         r"supported .*Use FSDP .*examples/accelerate/fsdp.yaml"):
        Trainer(_config(manifest, tmp_path / "run"), accelerator=fake)
    assert not (tmp_path / "run").exists()  # refused before anything was written


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


def test_fsdp_trains_as_ddp_does_and_resumes_exactly(tmp_path):
    """Two CPU processes under accelerate's FSDP2 (the tiny UNet's transformer blocks as units), mode
    synapse+unet with gradient accumulation, clipping and an EMA, launched with examples/accelerate/fsdp.yaml:
    after one step, a checkpoint and a second step resumed by a new model and trainer, every checkpointed tensor (trained weights, EMA, AdamW state) is whole and equals the same run
    under DDP within 1e-6, and the saved models agree."""
    manifest = write_toy_manifest(tmp_path / "toy", n=8, seconds=1.0)
    config = tmp_path / "train.yaml"
    _config(manifest, tmp_path / "unused", batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            checkpoint_every=1, keep_last=3, ema={"enabled": True, "decay": 0.5},
            optim={"unet_lr": 1e-3, "alpha_lr": 1e-2, "max_grad_norm": 0.5}).save(config)

    out = _launch(config, tmp_path / "ddp", "cli")  # DDP through `accelerate launch --multi_gpu` and the CLI
    assert "trained 2 steps" in out
    # examples/accelerate/fsdp.yaml: one step, then a new model and trainer resume from its checkpoint
    out = _launch(config, tmp_path / "fsdp", "launched", "--max-steps", "1", "--then-resume")
    assert "plugin: fsdp_version=2 wrap=['BasicTransformerBlock']" in out
    assert "trained 1 steps; resuming" in out
    done = next(line for line in out.splitlines() if line.startswith("trained 2 steps;"))
    sharded, total = (int(w) for w in done.split("; ")[1].split()[0:3:2])
    assert sharded == total > 0  # every trained tensor was a slice

    for step in (1, 2):
        ddp, ddp_state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / f"step-{step:08d}")
        fsdp, fsdp_state = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / f"step-{step:08d}")
        assert fsdp_state["world_size"] == ddp_state["world_size"] == 2
        assert fsdp.keys() == ddp.keys() == {"trainable", "optimizer", "ema"}
        for stem in ddp:
            assert fsdp[stem].keys() == ddp[stem].keys()
            for key, want in ddp[stem].items():
                got = fsdp[stem][key]
                assert got.shape == want.shape, (stem, key)  # whole tensors, not one process's slice
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{stem}: {key}")
    first, _ = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "step-00000001")
    last, _ = load_checkpoint(latest_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    moved = [k for k in last["trainable"] if not torch.equal(last["trainable"][k], first["trainable"][k])]
    assert len(moved) > len(last["trainable"]) // 2  # the second step trained

    from melfusion import MelFusion

    a = MelFusion.from_pretrained(tmp_path / "fsdp" / "model")
    b = MelFusion.from_pretrained(tmp_path / "ddp" / "model")
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert sa.keys() == sb.keys()
    for key in sb:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-6, msg=key)
    torch.testing.assert_close(a.synapse.mixer.alphas(), b.synapse.mixer.alphas(), rtol=1e-6, atol=1e-6)
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
