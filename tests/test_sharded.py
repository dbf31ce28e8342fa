"""Sharded engines (FSDP, DeepSpeed) are refused by the trainer, before any work, with what to use instead.

Why not supported: accelerate shards only on accelerators (its AcceleratorState turns a multi-process run into
FSDP or DeepSpeed only from the GPU-family distributed types; on CPU processes it stays MULTI_CPU, plain DDP),
so no test here can exercise it, and the trainer writes checkpoints from each process's own state dicts, which
under sharding would hold shards. docs/training.md, "Sharded training"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate import DistributedType

from melfusion.datasets import write_toy_manifest
from melfusion.training import TrainConfig, Trainer


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_trainer_refuses_sharded_engines(tmp_path, engine):
    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    config = TrainConfig.model_validate({"model": "tiny", "data": {"manifest": str(manifest)},
                                         "output": str(tmp_path / "run"), "max_steps": 1, "progress": False})
    fake = SimpleNamespace(distributed_type=engine, device="cpu", is_main_process=True, num_processes=2)
    with pytest.raises(ValueError, match=rf"^accelerate: distributed_type {engine.name} \(sharded training\) is not "
                                         r"supported .*accelerate launch --multi_gpu"):
        Trainer(config, accelerator=fake)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_data_parallel_accelerators_pass_the_check(tmp_path):
    from accelerate import Accelerator

    manifest = write_toy_manifest(tmp_path / "toy", n=4, seconds=1.0)
    config = TrainConfig.model_validate({"model": "tiny", "data": {"manifest": str(manifest)},
                                         "output": str(tmp_path / "run"), "max_steps": 1, "progress": False})
    trainer = Trainer(config, accelerator=Accelerator(cpu=True))
    assert trainer.accelerator.distributed_type == DistributedType.NO
