"""Ahead-of-time compile the train step for an NVIDIA H100 or H200, on a machine without a GPU.

Compiles the same jitted `train_step` as train.py (random-weight shapes, a synthetic batch) with
XLA's CUDA backend for a described device and reads the optimized executable: compile time, peak
memory (argument + output - aliased + temporaries; XLA's own peak too), kernels launched per step
(fusions, custom-calls and copies, loop bodies times their trip counts), matmul TFLOP per step (the
dots of gemm fusions; cuDNN attention's are not counted) and the bytes every other kernel but
cuDNN's moves (operands + outputs; an operand read through dynamic-slices counts only the slices,
an in-place dynamic-update-slice only its update). Prints a table with one row per combination of
the comma-separated options.

These are compile-time estimates: nothing is autotuned without a device, so matmuls are Triton
fusions with default tiles, and the real fusions, kernels and memory on a GPU can differ. "fits"
compares the peak with the whole device memory; by default JAX preallocates 75% of it
(XLA_PYTHON_CLIENT_MEM_FRACTION).

Setup, once: a separate venv with jax's CUDA plugin at the jax version of the project's environment
(0.10.2 here; `python -c "import jax; print(jax.__version__)"`), then this project into it:

    python3 -m venv /tmp/gpuaot && /tmp/gpuaot/bin/pip install "jax[cuda13]==0.10.2"
    /tmp/gpuaot/bin/pip install -e .

Usage, from the repository root:

    /tmp/gpuaot/bin/python benchmarks/gpu_compile.py --model llama3.2-1b --seq-len 4096 --batch-size 2,4,8 --unroll 1,0
    /tmp/gpuaot/bin/python benchmarks/gpu_compile.py --gpu h200 --model llama3.1-8b --batch-size 1,2 --remat none,full
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # never touch a local GPU, if there is one
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # else the plugin fails its version checks, no driver

import argparse
import itertools
import math
import re
import sys
import time
from typing import NamedTuple

from jax._src.cudnn import fused_attention_stablehlo
from jax.experimental import topologies
from train_step import print_table, run_config  # benchmarks/, beside this script

from llama_jax.config import get_preset
from llama_jax.errors import ArgumentParser, UserError, run_cli
from llama_jax.model import REMAT_POLICIES
from llama_jax.step import PRETRAIN, build

TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 7 }} runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""
GPUS = {  # name, memory bandwidth (bytes/s), device memory (bytes); both sm_90 with 132 SMs
    "h100": ("NVIDIA H100 80GB HBM3", 3352320000000, 84929347584),
    "h200": ("NVIDIA H200", 4800000000000, 150754820096),
}

# jax's cuDNN attention checks the compute capability of the default backend's devices, which is
# the CPU here (the CUDA client has no devices), and would refuse; answer as sm_90 does.
fused_attention_stablehlo.check_compute_capability = lambda cap: (9, 0) >= tuple(map(int, cap.split(".")))
fused_attention_stablehlo.is_cuda_compute_capability_equal = lambda cap: (9, 0) == tuple(map(int, cap.split(".")))


class Instr(NamedTuple):
    root: bool
    name: str
    type: str
    op: str
    args: str  # inside op(...): operand names, or a parameter's number
    attrs: str

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.args)

    def ref(self, key: str) -> str:  # the computation named by calls=, body=, ...
        return re.search(key + r"=%([\w.\-]+)", self.attrs).group(1)


Computation = dict[str, Instr]  # by name, in the printed order
HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .*\{$")
INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(([^)]*)\)(.*)$")
SHAPE = re.compile(r"\b(pred|[a-z]+\d+\w*)\[([\d,]*)\]")


def parse_hlo(text: str) -> tuple[dict[str, Computation], str]:
    """Optimized HLO text -> ({computation name: its instructions}, the entry computation's name)."""
    comps: dict[str, Computation] = {}
    entry = current = ""
    for line in text.splitlines():
        if header := HEADER.match(line):
            current = header.group(2)
            comps[current] = {}
            entry = current if header.group(1) else entry
        elif current and (m := INSTR.match(line)):
            comps[current][m.group(2)] = Instr(bool(m.group(1)), *m.groups()[1:])
    return comps, entry


def dims(ty: str) -> list[int]:
    return [int(d) for d in SHAPE.search(ty).group(2).split(",") if d]


def nbytes(ty: str) -> float:
    """Bytes of an array or tuple type: 'bf16[2,4096]{1,0}', '(f32[], s32[8])'."""
    bits = lambda dtype: 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())  # f8e4m3fn: 8
    return sum(math.prod(int(d) for d in ds.split(",") if d) * bits(dt) / 8 for dt, ds in SHAPE.findall(ty))


def dot_flops(comp: Computation, comps: dict[str, Computation]) -> int:
    """2 x output elements x contracted size, over the dots of a computation and its nested fusions."""
    total = 0
    for i in comp.values():
        if i.op == "dot":
            lhs = dims(comp[i.operands[0]].type)
            contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs).group(1)
            total += 2 * math.prod(dims(i.type)) * math.prod(lhs[int(c)] for c in contracted.split(",") if c)
        elif i.op == "fusion":
            total += dot_flops(comps[i.ref("calls")], comps)
    return total


def traffic(i: Instr, comp: Computation, comps: dict[str, Computation]) -> float:
    """Operand + output bytes of a kernel; an operand read only through (dynamic) slices or gathers
    (an embedding lookup) counts their slices, an output that is an in-place dynamic-update-slice
    counts its update (and no input)."""
    operands = [nbytes(comp[o].type) for o in i.operands]
    output = sum(operands) if i.op == "copy-start" else nbytes(i.type)  # copy-start: (dest, source, context)
    if i.op != "fusion":
        return output + sum(operands)
    fused = comps[i.ref("calls")]
    params = {p.name: int(p.args) for p in fused.values() if p.op == "parameter"}
    for name, k in params.items():
        users = [u for u in fused.values() if name in u.operands]
        if users and all(u.op in ("slice", "dynamic-slice", "gather") and u.operands[0] == name for u in users):
            operands[k] = sum(nbytes(u.type) for u in users)
    unwrap = lambda name: unwrap(fused[name].operands[0]) if fused[name].op in ("bitcast", "reshape") else name
    root = next(r for r in fused.values() if r.root)
    for name in root.operands if root.op == "tuple" else [root.name]:
        out = fused[unwrap(name)]
        if out.op == "dynamic-update-slice":
            output -= nbytes(out.type) - nbytes(fused[out.operands[1]].type)
            if (buffer := unwrap(out.operands[0])) in params:
                operands[params[buffer]] = 0
    return output + sum(operands)


def step_costs(text: str) -> tuple[int, int, float]:
    """(kernels launched, matmul FLOPs, bytes moved by all other kernels but cuDNN's) per step."""
    comps, entry = parse_hlo(text)
    kernels = flops = moved = 0

    def visit(comp: Computation, times: int) -> None:
        nonlocal kernels, flops, moved
        for i in comp.values():
            if i.op == "while":  # a known trip count: XLA runs only the body (else: count one pass)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.attrs)
                visit(comps[i.ref("body")], times * int(trips.group(1) if trips else 1))
            elif i.op in ("call", "conditional", "async-start"):  # conditional: every branch, an upper bound
                for name in re.findall(r"%([\w.\-]+)", i.attrs):
                    if name in comps:
                        visit(comps[name], times)
            elif i.op in ("fusion", "custom-call", "copy", "copy-start"):
                kernels += times
                kind = re.search(r'"fusion_backend_config":\{"kind":"[^"]+"|custom_call_target="[^"]+"', i.attrs)
                matmul = dot_flops(comps[i.ref("calls")], comps) if i.op == "fusion" else 0
                flops += matmul * times
                if not (matmul or (kind and re.search("gemm|cublas|cudnn", kind.group()))):
                    moved += traffic(i, comp, comps) * times

    visit(comps[entry], 1)
    return kernels, flops, moved


def row(devices: list, memory: int, combination: tuple, args: argparse.Namespace) -> dict[str, str]:
    preset, batch_size, remat, attention, unroll = combination
    head = {"preset": preset, "batch x seq": f"{batch_size} x {args.seq_len}", "remat": remat}
    try:
        cfg = run_config(preset, batch_size, remat, attention, unroll, args)
        step = build(cfg, get_preset(preset), PRETRAIN, devices)
        head |= {"attention": step.model.attention_impl, "unroll": str(step.model.scan_unroll)}
        start = time.perf_counter()
        compiled = step.run.lower(step.state, step.batch).compile()
        seconds = time.perf_counter() - start
    except Exception as e:  # one failed combination must not end the table
        print(f"{head}: {type(e).__name__}: {e}", file=sys.stderr)
        return head | {"compile s": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    xla_peak = getattr(m, "peak_memory_in_bytes", 0)
    kernels, flops, moved = step_costs(compiled.as_text())
    return head | {
        "compile s": f"{seconds:.1f}",
        "peak GiB": f"{peak / 2**30:.1f}",
        "XLA peak GiB": f"{xla_peak / 2**30:.1f}" if xla_peak else "-",
        "fits": "yes" if peak <= memory else "no",
        "kernels/step": f"{kernels:,}",
        "matmul TFLOP": f"{flops / 1e12:.1f}",
        "non-matmul GiB": f"{moved / 2**30:.1f}",
    }


def integers(text: str) -> list[int]:  # argparse reports the ValueError as a usage error
    return [int(v) for v in text.split(",")]


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the device to compile for")
    parser.add_argument("--model", default="llama3.2-1b", help="comma-separated presets (default: llama3.2-1b)")
    parser.add_argument("--batch-size", type=integers, default="8", help="comma-separated batch sizes (default: 8)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--remat", default="none", help=f"comma-separated, of {', '.join(REMAT_POLICIES)}")
    parser.add_argument("--attention", default="auto", help="comma-separated, of auto (cudnn), xla, cudnn")
    parser.add_argument("--unroll", type=integers, default="0", help="comma-separated layers per loop (0: auto)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--loss-chunk", type=int, default=512)
    parser.set_defaults(dtype="bfloat16")  # the compute dtype; parameters stay float32
    args = parser.parse_args(argv)
    presets, remats = args.model.split(","), args.remat.split(",")
    for preset in presets:
        get_preset(preset)  # an unknown name fails before any work
    if unknown := set(remats) - set(REMAT_POLICIES):
        raise UserError(f"--remat: unknown policy {sorted(unknown)[0]!r}; use {', '.join(REMAT_POLICIES)}")
    name, bandwidth, memory = GPUS[args.gpu]
    config = TARGET_CONFIG.format(name=name, bandwidth=bandwidth, memory=memory)
    topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=config)
    print(f"{name} (compiled without a device, {memory / 2**30:.1f} GiB): compute bfloat16, parameters float32")
    grid = itertools.product(presets, args.batch_size, remats, args.attention.split(","), args.unroll)
    print_table([row(list(topology.devices), memory, combination, args) for combination in grid])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
