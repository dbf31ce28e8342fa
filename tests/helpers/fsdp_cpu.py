"""Run melfusion's Trainer under accelerate's FSDP2 engine on CPU processes (gloo), for tests/test_sharded.py.

    torchrun --nproc_per_node 2 tests/helpers/fsdp_cpu.py CONFIG OUTPUT fsdp|ddp [--max-steps N] [--resume]
        [--then-resume]
    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/helpers/fsdp_cpu.py CONFIG OUTPUT launched

accelerate turns a multi-process run into FSDP only from its GPU-family distributed types; on CPU processes it
stays MULTI_CPU (plain DDP). This script marks the CPU state as multi-GPU before the Accelerator is built, so
that accelerate's own FSDP2 code (``fully_shard`` with its wrap policy, its optimizer swap, its gradient
clipping) runs on the CPU with gloo. Everything after that is the library's code as a GPU run executes it.
``ddp`` runs the same processes without sharding, as the reference; ``launched`` takes the FSDP settings that
``accelerate launch --config_file`` put in the environment (a config file's, as on GPUs).
"""

from __future__ import annotations

import argparse

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from melfusion.training import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("output")
    parser.add_argument("engine", choices=["fsdp", "ddp", "launched"])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--then-resume", action="store_true",
                        help="after training to --max-steps, a new Trainer resumes from its checkpoint to the "
                             "config's max_steps, in the same processes")
    args = parser.parse_args()
    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    if args.engine == "fsdp":
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # see the module doc
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["BasicTransformerBlock"], reshard_after_forward=True)
        accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
        assert accelerator.distributed_type == DistributedType.FSDP, accelerator.distributed_type
    elif args.engine == "launched":
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        accelerator = Accelerator(cpu=True)  # the plugin comes from the launcher's FSDP_* variables
        assert accelerator.distributed_type == DistributedType.FSDP, accelerator.distributed_type
        plugin = accelerator.state.fsdp_plugin
        print(f"plugin: fsdp_version={plugin.fsdp_version} wrap={plugin.transformer_cls_names_to_wrap}", flush=True)
    else:
        accelerator = Accelerator(cpu=True)
    config = TrainConfig.load(args.config, output=args.output)
    trainer = Trainer(config, accelerator=accelerator)
    result = trainer.train(max_steps=args.max_steps, resume=args.resume)
    if args.then_resume:  # a fresh model and trainer, as a restarted run has, in the same process group
        if accelerator.is_main_process:
            print(f"trained {result.step} steps; resuming", flush=True)
        # a new Accelerator too (the process-wide state, FSDP, carries over): accelerate's FSDP gradient
        # clipping looks for the parameters among every model one Accelerator prepared
        accelerator = Accelerator(cpu=True)
        assert accelerator.distributed_type == DistributedType.FSDP, accelerator.distributed_type
        trainer = Trainer(config, accelerator=accelerator)
        result = trainer.train(resume=True)
    if accelerator.is_main_process:
        sharded = sum(type(p).__name__ == "DTensor" for p in trainer._trained().values())
        print(f"trained {result.step} steps; {sharded} of {len(trainer._trained())} trained tensors sharded",
              flush=True)


if __name__ == "__main__":
    main()
