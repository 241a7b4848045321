"""Ahead-of-time compilation for TPU topologies on any machine (libtpu from the `tpu` extra):
find compile failures and out-of-memory before a pod is allocated. Every `--compile-only` path
(the train step, prefill and decode) is here, compiling the same jitted functions that run."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import sharding
from llama_jax.buckets import bucket
from llama_jax.errors import UserError

if TYPE_CHECKING:
    from llama_jax.generate import Sampling
    from llama_jax.train_config import TrainConfig

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
    cost = (cost[0] if isinstance(cost, list) else cost) or {}  # none for a GPU compiled without a device
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


def inference_model(cfg, dtype: str, plan: sharding.Plan, mesh) -> tuple:
    """The TPU inference model and its abstract parameters in the per-layer layout `load()` gives,
    placed as the plan says."""
    from llama_jax.model import build_model, param_shapes

    model = build_model(cfg, dtype, backend="tpu", per_layer=True)
    shapes = param_shapes(cfg, model.dtype, per_layer=True)
    return model, abstract(shapes, sharding.param_shardings(plan, mesh, cfg, per_layer=True))


def compile_train(cfg: TrainConfig) -> None:
    """Compile the real train step (forward, backward, AdamW) for `cfg.topology` and print per-chip
    memory and XLA's cost estimate."""
    from llama_jax.config import get_preset
    from llama_jax.convert import open_checkpoint
    from llama_jax.step import Tuning, build

    if not cfg.topology:
        raise UserError("--compile-only needs --topology (e.g. v5p-8, v5p-256 or v5p:2x2x1)")
    topology = parse_topology(cfg.topology)
    if cfg.stage in ("ppo", "grpo"):
        print(format_report(compile_rl(cfg, topology_devices(topology), topology)))
        return
    model_cfg = open_checkpoint(cfg.init_from).config if cfg.init_from else get_preset(cfg.model)
    step = build(cfg, model_cfg, Tuning.from_config(cfg), topology_devices(topology))
    with sharding.activate(step.plan, step.mesh):
        row = compile_report("train step", step.run, (step.state, step.batch), {}, topology)
    model = step.model
    print(
        f"model {cfg.model} ({model_cfg.num_params / 1e9:.2f}B), batch {cfg.batch_size} x {cfg.seq_len}, "
        f"compute {jnp.dtype(model.dtype).name}, remat {cfg.remat}, attention {model.attention_impl}, "
        f"plan {step.plan.name} {dict(step.mesh.shape)}"
    )
    print(format_report([row]))


def compile_generate(
    preset: str, topology_name: str, plan_name: str, dtype: str, batch_size: int, prompt_len: int, max_new: int,
    sampling: Sampling,
) -> None:  # fmt: skip
    """Compile prefill and the decode loop for a TPU topology; print per-chip memory."""
    from llama_jax import generate
    from llama_jax.config import get_preset
    from llama_jax.model import init_cache

    topology = parse_topology(topology_name)
    cfg = get_preset(preset)
    plan = sharding.load_plan(plan_name)
    mesh = sharding.build_mesh(plan, topology_devices(topology))
    model, params = inference_model(cfg, dtype, plan, mesh)
    dt = model.dtype
    multiple = sharding.batch_parallelism(plan, mesh)
    b = -(-batch_size // multiple) * multiple
    p = bucket(prompt_len)
    row = sharding.batch_sharding(plan, mesh, (b, p))
    rows_1d = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(row.spec[0]))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    vec = lambda dtype: jax.ShapeDtypeStruct((b,), dtype, sharding=rows_1d)  # noqa: E731
    cache = jax.eval_shape(lambda: init_cache(cfg, b, p + max_new, dt, per_layer=True))
    cache = abstract(cache, sharding.cache_shardings(plan, mesh, cache))
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((b,), jnp.uint32)))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows_1d)
    tokens = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=row)
    stop_ids = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)
    with sharding.activate(plan, mesh):
        rows = [
            compile_report(
                f"prefill {b}x{p}",
                generate.prefill,
                (model, params, tokens, vec(jnp.int32), vec(jnp.uint32)),
                dict(sampling=sampling, cache_len=p + max_new, cache_dtype=dt),
                topology,
            ),
            compile_report(
                f"decode {b}x{max_new}",
                generate.decode,
                (model, params, vec(jnp.int32), cache, vec(jnp.int32), keys, vec(jnp.bool_)),
                dict(stop_ids=stop_ids, sampling=sampling, max_new=max_new),
                topology,
            ),
        ]
    print(f"model {preset} ({cfg.num_params / 1e9:.2f}B), {jnp.dtype(dt).name}, plan {plan.name} {dict(mesh.shape)}")
    print(format_report(rows))


def compile_serve(
    preset: str, topology_name: str, plan_name: str, dtype: str, config, kv_memory_gib: float | None
) -> None:
    """Compile the serving engine's step for a TPU topology (the decoding step with every slot
    full and page tables as wide as the context, the step with prefill chunks beside it, and the
    sampling step); print per-chip memory. config: a serving.engine.EngineConfig."""
    from llama_jax.config import get_preset
    from llama_jax.paged import pool_bytes_per_page, pool_shape
    from llama_jax.serving.scheduler import max_prefill_rows
    from llama_jax.serving.step import StepShape, forward_step, sample_specs, sample_step, step_specs

    topology = parse_topology(topology_name)
    cfg = get_preset(preset)
    plan = sharding.load_plan(plan_name)
    mesh = sharding.build_mesh(plan, topology_devices(topology))
    cfg = cfg.replace(n_kv_heads=cfg.n_kv_heads * sharding.kv_head_replicas(plan, mesh, cfg))
    model, params = inference_model(cfg, dtype, plan, mesh)
    dt = model.dtype
    pool = sharding.pool_sharding(plan, mesh)
    shards = math.prod(mesh.shape[n] for a in pool.spec for n in ((a,) if isinstance(a, str) else a or ()))
    pages_per_seq = -(-cfg.max_seq_len // config.page_size)
    if kv_memory_gib is None:
        num_pages = 1 + config.max_num_seqs * pages_per_seq
    else:
        num_pages = int(kv_memory_gib * 2**30 * shards // pool_bytes_per_page(cfg, config.page_size, dt))
    k = v = jax.ShapeDtypeStruct(pool_shape(cfg, num_pages, config.page_size), dt, sharding=pool)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows, table = bucket(config.max_num_seqs, config.min_rows), bucket(pages_per_seq, config.min_pages)
    prefill_rows = max_prefill_rows(config.max_prefill_seqs, config.prefill_chunk, config.page_size)
    width = config.prefill_chunk // prefill_rows
    decode = StepShape(rows, rows * table, table)  # every page live
    reports = []
    with sharding.activate(plan, mesh):
        for label, shape in [
            (f"serve decode {rows} rows x {table} pages", decode),
            (f"serve decode {rows} + prefill {prefill_rows}x{width}", replace(decode, prefill=(prefill_rows, width))),
        ]:
            args = (model, params, k, v, *step_specs(shape, replicated))
            reports.append(compile_report(label, forward_step, args, {}, topology))
        r = rows + prefill_rows
        logits = jax.ShapeDtypeStruct((r, cfg.vocab_size), jnp.float32, sharding=replicated)
        args = (logits, *sample_specs(r, replicated))
        reports.append(compile_report(f"sample {r} rows", sample_step, args, {"vocab_limit": cfg.vocab_size}, topology))
    kv_gib = num_pages * pool_bytes_per_page(cfg, config.page_size, dt) / shards / 2**30
    print(
        f"model {preset} ({cfg.num_params / 1e9:.2f}B), {jnp.dtype(dt).name}, plan {plan.name} {dict(mesh.shape)}, "
        f"{cfg.n_kv_heads} kv heads; KV cache {num_pages} pages of {config.page_size} tokens ({kv_gib:.2f} GiB/chip)"
    )
    print(format_report(reports))


def compile_rl(cfg: TrainConfig, devices: list, target) -> list[dict]:
    """Compile the programs of a PPO or GRPO iteration for `devices` (a TPU topology's, or a described
    GPU's; `target` has the name, shape and hbm_bytes of a Topology): a rollout chunk's prefill and
    decode loop (the policy, LoRA adapters applied), its scoring, and an optimizer step on a
    minibatch. Prints the setup; returns a report row per program. Without --reward-model or
    --reward the reward model is taken to be the policy's shape with a score head."""
    from llama_jax import generate, lora
    from llama_jax.config import get_preset
    from llama_jax.convert import open_checkpoint
    from llama_jax.model import init_cache
    from llama_jax.rl.setup import build, policy_params

    policy_cfg = open_checkpoint(cfg.init_from).config if cfg.init_from else get_preset(cfg.model)
    reward_cfg = open_checkpoint(cfg.reward_model).config if cfg.reward_model else None
    reward_cfg = reward_cfg or (None if cfg.reward else policy_cfg.replace(head="score", pad_id=0))
    step = build(cfg, policy_cfg, reward_cfg, devices)
    s, m, state, model = step.settings, step.rows, step.state, step.models.policy
    rows = sharding.batch_sharding(step.plan, step.mesh, (m, s.prompt_len))
    vec = lambda dtype: jax.ShapeDtypeStruct((m,), dtype, sharding=NamedSharding(step.mesh, P(rows.spec[0])))  # noqa: E731
    cache_len, dt = s.prompt_len + s.max_new, model.dtype
    cache = jax.eval_shape(lambda: init_cache(policy_cfg, m, cache_len, dt))
    cache = abstract(cache, sharding.cache_shardings(step.plan, step.mesh, cache))
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((m,), jnp.uint32)))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=vec(jnp.int32).sharding)
    stop_ids = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=NamedSharding(step.mesh, P()))
    tokens = jax.ShapeDtypeStruct((m, s.prompt_len), jnp.int32, sharding=rows)
    params = policy_params(s, state.params, state.frozen)
    chunk = {k: step.minibatch[k] for k in ("tokens", "positions", "segment_ids")}
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(step.mesh, P()))
    micro = f" ({cfg.grad_accum} micro-batches)" if cfg.grad_accum > 1 else ""
    programs = [  # label, function, arguments, static arguments
        (f"rollout prefill {m}x{s.prompt_len}", generate.prefill,
         (model, params, tokens, vec(jnp.int32), vec(jnp.uint32)),
         dict(sampling=step.sampling, cache_len=cache_len, cache_dtype=dt)),
        (f"rollout decode {m}x{s.max_new}", generate.decode,
         (model, params, vec(jnp.int32), cache, vec(jnp.int32), keys, vec(jnp.bool_), stop_ids),
         dict(sampling=step.sampling, max_new=s.max_new)),
        (f"score {m}x{cfg.seq_len}", step.score, (state.params, state.frozen, chunk), {}),
        (f"{s.stage} update {m}x{cfg.seq_len}{micro}", step.update, (state, step.minibatch, index), {}),
    ]  # fmt: skip
    with sharding.activate(step.plan, step.mesh), lora.intercept(s.lora):  # the policy samples with its adapters
        reports = [compile_report(label, fn, args, kw, target) for label, fn, args, kw in programs]
    lora_text = f"LoRA rank {s.lora.rank} (policy and value on frozen bases)" if s.lora else "all weights trained"
    print(
        f"{s.stage}: policy {cfg.model if not cfg.init_from else cfg.init_from} ({policy_cfg.num_params / 1e9:.2f}B), "
        f"reward model {'a function' if reward_cfg is None else f'{reward_cfg.num_params / 1e9:.2f}B'}, {lora_text}; "
        f"{cfg.batch_size} rollouts of {s.prompt_len} + {s.max_new} tokens, minibatch {m}, compute "
        f"{jnp.dtype(dt).name}, remat {cfg.remat}, attention {model.attention_impl}, plan {step.plan.name} "
        f"{dict(step.mesh.shape)}"
    )
    return reports
