"""`decode.py --compile-for h100|h200`: prefill and decode compiled ahead of time for an NVIDIA
GPU on a machine without one, and the bytes the compiled programs move.

Compiles generate's jitted `prefill`, `decode` (the on-device loop) and `decode_step` (the
streaming step) with XLA's CUDA backend for a described device, twice: with XLA's default GEMMs
(Triton fusions, which can read a slice of a stacked weight in place) and with
`--xla_gpu_enable_triton_gemm=false`, so that every GEMM is a library call (cuBLAS) the way an
autotuned decode GEMV usually is: such a call needs each operand as a whole buffer. For each
program it prints the peak memory, the bytes moved by every kernel that is not a GEMM (or cuDNN)
per step against the weight bytes, and how many of those kernels copy a layer's weight matrix.

A decode step at the bandwidth limit reads the weights once, plus the live KV cache: non-GEMM
bytes of a few percent of the weights. `--layout stacked` is the training layout (one array per
weight with a leading layers axis) for comparison. Setup: see benchmarks/gpu_compile.py.
"""

from __future__ import annotations

import math
import os
import re
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
import jax.numpy as jnp
from gpu_compile import GPUS, TARGET_CONFIG, Computation, dot_flops, parse_hlo, traffic  # benchmarks/
from jax.experimental import topologies
from train_step import print_table

from llama_jax import generate, quant, sharding
from llama_jax.aot import abstract
from llama_jax.config import LlamaConfig
from llama_jax.generate import Sampling
from llama_jax.model import build_model, init_cache, param_shapes

GEMM_MODES = {"triton": {}, "cublas": {"xla_gpu_enable_triton_gemm": False}}


def kernel_costs(text: str, weight_sizes: set[int]) -> dict[str, float]:
    """Of an optimized program: kernels launched, bytes moved by non-GEMM kernels inside a while
    loop's body (one decode step) and outside it (once per call), and how many non-GEMM kernels
    write an array the size of a layer's weight matrix (a copy of it)."""
    comps, entry = parse_hlo(text)
    costs = {"kernels": 0, "loop": 0.0, "once": 0.0, "copies": 0, "has_loop": False}

    def visit(comp: Computation, where: str) -> None:
        for i in comp.values():
            if i.op == "while":
                costs["has_loop"] = True
                visit(comps[i.ref("body")], "loop")
            elif i.op in ("call", "conditional", "async-start"):
                for name in re.findall(r"%([\w.\-]+)", i.attrs):
                    if name in comps:
                        visit(comps[name], where)
            elif i.op in ("fusion", "custom-call", "copy", "copy-start"):
                costs["kernels"] += 1
                kind = re.search(r'"fusion_backend_config":\{"kind":"[^"]+"|custom_call_target="[^"]+"', i.attrs)
                gemm = (i.op == "fusion" and dot_flops(comps[i.ref("calls")], comps)) or (
                    kind and re.search("gemm|cublas|cudnn", kind.group())
                )
                if not gemm:
                    costs[where] += traffic(i, comp, comps)
                    out = [math.prod(int(d) for d in s.split(",") if d) for s in re.findall(r"\[([\d,]*)\]", i.type)]
                    costs["copies"] += any(n in weight_sizes for n in out)

    visit(comps[entry], "once")
    return costs


def compile_rows(
    gpu: str, cfg: LlamaConfig, layouts: list[str], batches: list[int], prompt: int, context: int,
    quantize: str = "none", gemms: str = "triton,cublas",
) -> list[dict[str, str]]:  # fmt: skip
    name, bandwidth, memory = GPUS[gpu]
    desc = TARGET_CONFIG.format(name=name, bandwidth=bandwidth, memory=memory)
    devices = list(topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=desc).devices)
    plan = sharding.load_plan("single")
    mesh = sharding.build_mesh(plan, devices)
    greedy = Sampling(temperature=0.0)
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    vec = lambda b, dtype: jax.ShapeDtypeStruct((b,), dtype, sharding=one)  # noqa: E731
    dt = jnp.dtype(jnp.bfloat16)

    def stored_shapes(c: LlamaConfig, per_layer: bool):  # as load() places them: scales float32
        shapes = param_shapes(c, dt, per_layer=per_layer)
        as_stored = lambda p, s: jax.ShapeDtypeStruct(s.shape, quant.load_dtype(p, s.dtype, dt))  # noqa: E731
        return jax.tree_util.tree_map_with_path(as_stored, shapes)

    def cache(b: int, length: int, per_layer: bool):
        shapes = jax.eval_shape(lambda: init_cache(cfg, b, length, dt, per_layer))
        return abstract(shapes, sharding.cache_shardings(plan, mesh, shapes))

    def keys(b: int):
        k = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((b,), jnp.uint32)))
        return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=one)

    rows, weights = [], []
    for mode, layout in [(m, lay) for m in quantize.split(",") for lay in layouts]:
        qcfg = cfg.replace(quantization=mode)
        per_layer = layout == "per-layer"
        model = build_model(qcfg, "bfloat16", "cudnn", backend="gpu", per_layer=per_layer)
        shapes = stored_shapes(qcfg, per_layer)
        params = abstract(shapes, sharding.param_shardings(plan, mesh, qcfg, per_layer=per_layer))
        weight_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
        weights += [f"{mode} {weight_bytes / 1e9:.2f} GB"] if layout == layouts[0] else []
        layer = stored_shapes(qcfg, True)["layers_0"]
        sizes = {math.prod(s.shape) for s in jax.tree.leaves(layer) if math.prod(s.shape) >= 2**19}  # not norms
        steps, scalar = 64, jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
        programs = [
            (f"prefill 1x{prompt}", generate.prefill,
             (model, params, jax.ShapeDtypeStruct((1, prompt), jnp.int32, sharding=one), vec(1, jnp.int32),
              vec(1, jnp.uint32)), dict(sampling=greedy, cache_len=prompt + 1, cache_dtype=dt)),
        ]  # fmt: skip
        for b in batches:
            programs.append(
                (f"decode loop b{b}", generate.decode,
                 (model, params, vec(b, jnp.int32), cache(b, context + steps, per_layer), vec(b, jnp.int32), keys(b),
                  vec(b, jnp.bool_), jax.ShapeDtypeStruct((1,), jnp.int32, sharding=one)),
                 dict(sampling=greedy, max_new=steps))
            )  # fmt: skip
            programs.append(
                (f"decode step b{b}", generate.decode_step,
                 (model, params, cache(b, context + steps, per_layer), vec(b, jnp.int32), vec(b, jnp.int32),
                  scalar, keys(b), scalar), dict(sampling=greedy))
            )  # fmt: skip
        for label, fn, args, kwargs in programs:
            lowered = fn.lower(*args, **kwargs)
            for gemm in gemms.split(","):
                options = GEMM_MODES[gemm]
                compiled = lowered.compile(compiler_options=options)
                m = compiled.memory_analysis()
                peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
                c = kernel_costs(compiled.as_text(), sizes)
                step, once = (c["loop"], c["once"]) if c["has_loop"] else (c["once"], 0.0)
                rows.append({
                    "weights": mode, "layout": layout, "GEMMs": gemm, "program": label,
                    "peak GiB": f"{peak / 2**30:.2f}", "fits": "yes" if peak <= memory else "NO",
                    "kernels": f"{c['kernels']:,}",
                    "non-GEMM GB/step": f"{step / 1e9:.2f}", "% of weights": f"{100 * step / weight_bytes:.1f}%",
                    "once per call GB": f"{once / 1e9:.2f}", "weight copies": str(c["copies"]),
                })  # fmt: skip
                print(f"compiled {mode} {layout} {gemm} {label}", file=sys.stderr, flush=True)
    print(f"{name} (compiled without a device, {memory / 2**30:.1f} GiB); {cfg.num_params / 1e9:.2f}B params")
    print(f"weights as stored: {', '.join(weights)}")
    print(f"decode: context {context} tokens + {steps} steps; a loop's body is one step, the rest once per call\n")
    print_table(rows)
    return rows
