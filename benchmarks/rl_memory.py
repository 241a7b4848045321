"""Compile-only memory of a PPO or GRPO iteration for an NVIDIA H100 or H200, on a machine without one:
does an 8B PPO run fit one 80 GB GPU? Compiles the run's four programs (a rollout chunk's prefill and
decode loop, its scoring, an optimizer step on a minibatch) with XLA's CUDA backend for a described
device (see gpu_compile.py, whose setup this shares), and prints a row per program: the peak memory
of each (arguments + outputs - aliased + temporaries; the frozen weights are arguments of every
program, so a program's peak is the run's peak while it runs).

Every option after --gpu is train.py's, for example (from the repository root, in gpu_compile.py's venv):

    /tmp/gpuaot/bin/python benchmarks/rl_memory.py --gpu h100 --stage ppo --model llama3.1-8b \\
        --lora-rank 16 --batch-size 512 --minibatch-size 64 --grad-accum 8 --seq-len 1024 \\
        --max-new-tokens 512 --remat full --sharding single --dtype bfloat16

Without --reward-model the reward model has the policy's shape, with a score head (and the value
model starts from it, as Llama 2 did); with LoRA the policy and the value are adapters on frozen bases.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from gpu_compile import GPUS, TARGET_CONFIG  # benchmarks/, beside this script; also readies the CUDA compiler
from jax.experimental import topologies

from llama_jax.aot import compile_rl, format_report
from llama_jax.errors import ArgumentParser, UserError, run_cli
from llama_jax.train_config import RL_STAGES, parse_args


@dataclass(frozen=True)
class Gpu:
    """A described GPU, as aot.compile_report reads a target."""

    name: str
    hbm_bytes: int
    shape: tuple[int, ...] = (1,)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__, add_help=False)
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the device to compile for")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_args([*rest, "--compile-only"])
    if cfg.stage not in RL_STAGES:
        raise UserError(f"--stage must be one of {', '.join(RL_STAGES)}")
    name, bandwidth, memory = GPUS[args.gpu]
    config = TARGET_CONFIG.format(name=name, bandwidth=bandwidth, memory=memory)
    devices = list(topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=config).devices)
    print(f"{name} (compiled without a device, {memory / 2**30:.1f} GiB)")
    print(format_report(compile_rl(cfg, devices, Gpu(args.gpu.upper(), memory))))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
