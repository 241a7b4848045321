"""Ahead-of-time compilation for TPU topologies on any machine (libtpu from the `tpu` extra):
find compile failures and out-of-memory before a pod is allocated."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import jax

# HBM per chip (bytes) and whether `-N` in a slice name counts TensorCores (2 per chip) or chips.
TPU_CHIPS = {
    "v4": (32 * 2**30, 2, 3),
    "v5p": (95 * 2**30, 2, 3),
    "v5e": (16 * 2**30, 1, 2),
    "v6e": (32 * 2**30, 1, 2),
}  # generation: (HBM bytes, cores per count unit, torus dimensions)


@dataclass(frozen=True)
class Topology:
    generation: str
    shape: tuple[int, ...]  # chips along each torus dimension

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_bytes(self) -> int:
        return TPU_CHIPS[self.generation][0]


def parse_topology(spec: str) -> Topology:
    """`v5p-256` (TensorCores, as Cloud TPU names slices; chips for v5e/v6e) or `v5p:4x4x8`."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", spec.strip().lower())
    if not m:
        raise ValueError(f"unknown TPU topology {spec!r}; use e.g. v5p-256, v5e-16 or v5p:4x4x8")
    gen, count, dims = m.groups()
    _, per_chip, ndim = TPU_CHIPS[gen]
    if dims:
        return Topology(gen, tuple(int(d) for d in dims.split("x")))
    chips = int(count) // per_chip
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{spec}: slice size must be a power of two")
    if ndim == 3 and chips == 4:
        return Topology(gen, (2, 2, 1))
    shape = [1] * ndim
    for i in range(int(math.log2(chips))):
        shape[i % ndim] *= 2
    return Topology(gen, tuple(sorted(shape)))


def topology_devices(topology: Topology) -> list:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology.name, platform="tpu")
    except Exception as e:  # libtpu missing or the topology unknown to it
        raise ValueError(
            f"cannot describe TPU topology {topology.name} ({str(e).splitlines()[0]}); "
            "is libtpu installed (pip install 'llama-jax[tpu]')?"
        ) from None
    return list(desc.devices)


def compile_report(label: str, fn: Callable, args: tuple, kwargs: dict, topology: Topology) -> dict:
    """Compile fn (a jitted function) for abstract args carrying shardings; return a row of
    per-chip memory and cost numbers."""
    row = {
        "step": label,
        "topology": topology.name,
        "chips": math.prod(topology.shape),
        "hbm_gib": topology.hbm_bytes / 2**30,
    }
    try:
        compiled = fn.lower(*args, **kwargs).compile()
    except Exception as e:  # XLA refuses programs that cannot fit: report it as a row
        needed = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)G\) exceeds available HBM", str(e))
        if needed is None:
            raise
        nan = float("nan")
        gib = float(needed.group(1))  # XLA's "G" here is GiB (it reports v5p's 95.74G available)
        return row | dict(arguments_gib=nan, temporaries_gib=gib, total_gib=gib, fits=False,
                          tflops_per_chip=nan, hbm_gb_accessed=nan)  # fmt: skip
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    return row | {
        "arguments_gib": mem.argument_size_in_bytes / 2**30,
        "temporaries_gib": mem.temp_size_in_bytes / 2**30,
        "total_gib": total / 2**30,
        "fits": total <= topology.hbm_bytes,
        "tflops_per_chip": cost.get("flops", float("nan")) / 1e12,
        "hbm_gb_accessed": cost.get("bytes accessed", float("nan")) / 1e9,
    }


def format_report(rows: list[dict]) -> str:
    head = (
        "| step | topology | chips | args GiB/chip | temps GiB/chip | total GiB/chip | HBM GiB | fits "
        "| TFLOP/chip | GB accessed/chip |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['topology']} | {r['chips']} | {r['arguments_gib']:.2f} | {r['temporaries_gib']:.2f} "
            f"| {r['total_gib']:.2f} | {r['hbm_gib']:.0f} | {'yes' if r['fits'] else 'NO'} "
            f"| {r['tflops_per_chip']:.3f} | {r['hbm_gb_accessed']:.2f} |"
        )
    return "\n".join(lines)


def abstract(tree, shardings_tree):
    """ShapeDtypeStructs carrying the given shardings (nothing allocated)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings_tree)
