"""Run melfusion's Trainer under accelerate's DeepSpeed engine (ZeRO-2) on CPU processes, for tests/test_sharded.py.

    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml --num_processes 2 \
        tests/helpers/deepspeed_cpu.py CONFIG OUTPUT [--max-steps N] [--then-resume] \
        [--also-resume CHECKPOINT OUTPUT2]

DeepSpeed runs on the CPU (its CPU accelerator, gloo). accelerate does not: without a GPU its process state
has no backend (one process, rank 0) when DeepSpeed is asked for. This script corrects that state from the
process group DeepSpeed set up (the world size and this process's rank) before the Accelerator is built, and
keeps DeepSpeed from compiling its optional shared-memory all-reduce (a C++ build; gloo is used instead).
Everything after that is accelerate's and DeepSpeed's own code, and the library's, as a GPU run executes it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
from pathlib import Path

# (deepspeed.comm's attribute `torch` is the torch package: the module itself is looked up by name)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # see the module doc

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from melfusion.training import NonFiniteWeightsError, TrainConfig, Trainer  # noqa: E402


def _accelerator(mixed_precision: str) -> Accelerator:
    state = PartialState()
    assert os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and dist.is_initialized()
    PartialState._shared_state.update(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                                      local_process_index=int(os.environ["LOCAL_RANK"]), backend="gloo")
    assert state.num_processes == dist.get_world_size() > 1
    # as the Trainer builds it; the plugin comes from the launcher's ACCELERATE_DEEPSPEED_* variables
    accelerator = Accelerator(mixed_precision=mixed_precision)
    assert accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.distributed_type
    return accelerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("output")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--then-resume", action="store_true",
                        help="after training to --max-steps, a new Trainer resumes from its checkpoint to the "
                             "config's max_steps, in the same processes")
    parser.add_argument("--also-resume", nargs=2, metavar=("CHECKPOINT", "OUTPUT2"), default=None,
                        help="then a run in OUTPUT2 resumes a copy of CHECKPOINT (e.g. one written without "
                             "DeepSpeed) to the config's max_steps")
    parser.add_argument("--nan-gradient", default=None, metavar="OUTPUT3",
                        help="then a run in OUTPUT3 whose gradients are made NaN (the loss stays finite) must stop "
                             "with NonFiniteWeightsError")
    args = parser.parse_args()
    config = TrainConfig.load(args.config, output=args.output)
    accelerator = _accelerator(config.mixed_precision)
    trainer = Trainer(config, accelerator=accelerator)
    zero = trainer.wrapped.zero_optimization_stage()
    result = trainer.train(max_steps=args.max_steps)
    if accelerator.is_main_process:
        print(f"zero stage {zero}; optimizer {type(trainer.optimizer.optimizer).__name__}", flush=True)
    # how much of the AdamW state this process holds: its ZeRO partitions of each parameter group
    base = trainer.optimizer.optimizer.optimizer
    held = sum(v.numel() for g in base.param_groups for flat in g["params"]
               for k, v in base.state.get(flat, {}).items() if k == "exp_avg")
    total = sum(p.numel() for p in trainer._trained().values())
    for rank in range(accelerator.num_processes):  # one line per process, in order
        if rank == accelerator.process_index:
            print(f"rank {rank} holds {held} of {total} exp_avg values", flush=True)
        accelerator.wait_for_everyone()
    if args.then_resume:  # a fresh model and trainer, as a restarted run has, in the same process group
        if accelerator.is_main_process:
            print(f"trained {result.step} steps; resuming", flush=True)
        trainer = Trainer(config, accelerator=accelerator)
        result = trainer.train(resume=True)
    if accelerator.is_main_process:
        print(f"trained {result.step} steps", flush=True)
    if args.also_resume:
        source, output = Path(args.also_resume[0]), Path(args.also_resume[1])
        if accelerator.is_main_process:
            shutil.copytree(source, output / "checkpoints" / source.name)
        accelerator.wait_for_everyone()
        trainer = Trainer(TrainConfig.load(args.config, output=str(output)), accelerator=accelerator)
        result = trainer.train(resume=True)
        if accelerator.is_main_process:
            print(f"resumed {source.name}: trained {result.step} steps", flush=True)
    if args.nan_gradient:
        trainer = Trainer(TrainConfig.load(args.config, output=args.nan_gradient), accelerator=accelerator)
        name, param = next(iter(trainer._trained().items()))
        before = param.detach().clone()
        param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        try:
            trainer.train()
        except NonFiniteWeightsError as exc:
            same = torch.equal(param.detach(), before)
            if accelerator.is_main_process:
                print(f"refused: {exc}; {name} unchanged: {same}", flush=True)
        else:
            raise AssertionError("NaN gradients were not refused")


if __name__ == "__main__":
    main()
