"""Sharding plans: declarative TOML files in `sharding/` that map the model's logical axis
names onto a device mesh. The model never sees the mesh; everything here is data.

A plan has a `[mesh]` (axis names, sizes with -1 filling the remaining devices, optional
`dcn` sizes for multi-slice TPU pods, optional `devices` to use only the first N devices)
and four rule tables, logical axis -> mesh axis (a name, a list of names, or "" for
replicated): `[params]`, `[activations]`, `[cache]` (KV cache) and `[batch]` (input batches).
Rules apply in file order; an array never uses a mesh axis twice (the first rule wins).
"""

from __future__ import annotations

import contextlib
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PLANS_DIR = Path(__file__).resolve().parent.parent / "sharding"
LOGICAL_AXES = {
    "batch", "length", "vocab", "embed", "heads", "kv_heads", "head_dim",
    "mlp", "norm", "layers", "cache_length", "qkv",
}  # fmt: skip
RULE_TABLES = ("params", "activations", "cache", "batch")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


class ShardingError(ValueError):
    """A plan that cannot be parsed or does not fit the devices or the model."""


@dataclass(frozen=True)
class Plan:
    name: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dcn: tuple[int, ...] | None
    devices: int | None
    rules: dict[str, Rules]

    @property
    def context_rules(self) -> Rules:
        """Rules active while tracing the model: activations, then cache and batch names."""
        return self.rules["activations"] + self.rules["cache"] + self.rules["batch"]


def resolve_plan_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PLANS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PLANS_DIR.glob("*.toml")))
        raise ShardingError(f"no sharding plan {name_or_path!r} (known: {known}; or give a .toml path)")
    return path


def load_plan(name_or_path: str) -> Plan:
    """Parse and validate a plan: a name in sharding/ or a path to a .toml file."""
    path = resolve_plan_path(name_or_path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ShardingError(f"{path}: not valid TOML ({e})") from None
    try:
        mesh = doc["mesh"]
        axes = tuple(mesh["axes"])
        shape = tuple(int(s) for s in mesh["shape"])
        dcn = tuple(int(s) for s in mesh["dcn"]) if "dcn" in mesh else None
        devices = int(mesh["devices"]) if "devices" in mesh else None
    except (KeyError, TypeError, ValueError) as e:
        raise ShardingError(f"{path}: [mesh] needs axes = [...] and shape = [...] ({e})") from None
    if len(shape) != len(axes) or (dcn is not None and len(dcn) != len(axes)):
        raise ShardingError(f"{path}: mesh axes {axes}, shape {shape} and dcn {dcn} differ in length")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ShardingError(f"{path}: mesh shape {shape} may hold positive sizes and at most one -1")
    rules = {}
    for table in RULE_TABLES:
        entries = []
        for logical, mesh_axes in doc.get(table, {}).items():
            if logical not in LOGICAL_AXES:
                raise ShardingError(f"{path}: [{table}] unknown logical axis {logical!r}")
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            names = tuple(n for n in names if n)
            unknown = [n for n in names if n not in axes]
            if unknown:
                raise ShardingError(f"{path}: [{table}] {logical} -> unknown mesh axis {unknown[0]!r}")
            entries.append((logical, names[0] if len(names) == 1 else (names or None)))
        rules[table] = tuple(entries)
    unknown_tables = set(doc) - {"mesh", *RULE_TABLES}
    if unknown_tables:
        raise ShardingError(f"{path}: unknown tables {sorted(unknown_tables)}")
    return Plan(path.stem, axes, shape, dcn, devices, rules)


def _fill(shape: tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ShardingError(f"{what} {shape}: {n} devices are not divisible by {known}")
        shape = tuple(n // known if s == -1 else s for s in shape)
    if math.prod(shape) != n:
        raise ShardingError(f"{what} {shape} has {math.prod(shape)} devices, but there are {n}")
    return shape


def build_mesh(plan: Plan, devices: list | None = None) -> Mesh:
    """The device mesh of a plan: hybrid ICI x DCN for multi-slice pods."""
    devices = list(jax.devices() if devices is None else devices)
    if plan.devices is not None:
        if plan.devices > len(devices):
            raise ShardingError(f"plan {plan.name} wants {plan.devices} devices, there are {len(devices)}")
        devices = devices[: plan.devices]
    types = (jax.sharding.AxisType.Auto,) * len(plan.axes)
    if plan.dcn is not None:
        from jax.experimental import mesh_utils

        slices = math.prod(plan.dcn)
        found = {getattr(d, "slice_index", None) for d in devices}
        if None in found or len(found) != slices:
            where = f"{len(found)} slice(s)" if None not in found else f"no slices ({devices[0].platform} devices)"
            raise ShardingError(
                f"plan {plan.name} spans {slices} slices over the data-centre network (dcn = {list(plan.dcn)}): "
                f"it needs a multi-slice TPU pod of {slices} slices; these devices are in {where}"
            )
        ici = _fill(plan.shape, len(devices) // slices, f"plan {plan.name}: per-slice mesh shape")
        arr = mesh_utils.create_hybrid_device_mesh(ici, plan.dcn, devices)
        return Mesh(arr, plan.axes, axis_types=types)
    shape = _fill(plan.shape, len(devices), f"plan {plan.name}: mesh shape")
    return Mesh(np.asarray(devices).reshape(shape), plan.axes, axis_types=types)


def _spec(logical: PartitionSpec | tuple, rules: Rules) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def shardings(
    mesh: Mesh, logical_tree, rules: Rules, shapes=None, what: str = "array"
) -> dict:  # a pytree like logical_tree
    """NamedShardings for a pytree of logical PartitionSpecs. With `shapes` (a matching
    pytree of arrays or ShapeDtypeStructs) every sharded dimension is checked to divide."""
    is_spec = lambda x: isinstance(x, PartitionSpec | tuple) and all(isinstance(a, str | None) for a in x)
    specs = jax.tree.map(lambda s: _spec(s, rules), logical_tree, is_leaf=is_spec)
    if shapes is not None:
        flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        flat_shapes = jax.tree.leaves(shapes)
        for (path, spec), shaped in zip(flat_specs, flat_shapes, strict=True):
            for dim, (size, mesh_axes) in enumerate(zip(shaped.shape, spec, strict=False)):
                names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
                parts = math.prod(mesh.shape[n] for n in names)
                if size % parts:
                    raise ShardingError(
                        f"{what} {jax.tree_util.keystr(path, simple=True, separator='/')}: dimension {dim} "
                        f"({size}) is not divisible by mesh axis {'x'.join(names)} ({parts})"
                    )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(plan: Plan, mesh: Mesh, cfg, split_kv_heads: bool = True, per_layer: bool = False) -> dict:
    """Shardings of the parameters, canonical or per layer (checked to divide); with
    split_kv_heads False, wk and wv keep their kv heads whole (to be replicated first, see
    kv_head_replicas)."""
    from llama_jax.model import param_logical_axes, param_shapes
    from llama_jax.quant import is_scale

    rules = plan.rules["params"]
    if not split_kv_heads:
        rules = tuple((logical, axes) for logical, axes in rules if logical != "kv_heads")
    shapes = param_shapes(cfg, per_layer=per_layer)

    def unsplit(path, logical: PartitionSpec, shape: jax.ShapeDtypeStruct) -> PartitionSpec:
        # An int4 scale's group axis is named as its kernel's rows, but fewer groups than shards
        # do not split: that axis of the scale (at most 1/64 of the kernel) is then replicated.
        if not is_scale(path):
            return logical
        spec = _spec(logical, rules)
        parts = [math.prod(mesh.shape[n] for n in ((a,) if isinstance(a, str) else a or ())) for a in spec]
        kept = zip(logical, shape.shape, parts, strict=True)
        return PartitionSpec(*(name if size % p == 0 else None for name, size, p in kept))

    is_spec = lambda x: isinstance(x, PartitionSpec)
    logical = jax.tree_util.tree_map_with_path(unsplit, param_logical_axes(cfg, per_layer), shapes, is_leaf=is_spec)
    return shardings(mesh, logical, rules, shapes, "parameter")


def kv_head_replicas(plan: Plan, mesh: Mesh, cfg) -> int:
    """How many copies of each kv head the plan needs: when the mesh axes that split kv heads
    outnumber them (tensor parallelism over 8 devices, 2 kv heads), each kv head is repeated so
    that every device holds one, as vLLM and Meta's reshard_mp do; 1 otherwise."""
    spec = _spec(("kv_heads",), plan.rules["params"])[0]
    parts = math.prod(mesh.shape[n] for n in ((spec,) if isinstance(spec, str) else tuple(spec or ())))
    kv = cfg.n_kv_heads
    if parts > kv and parts % kv == 0 and cfg.n_heads % parts == 0:
        return parts // kv
    return 1


def batch_sharding(plan: Plan, mesh: Mesh, shape: tuple[int, int]) -> NamedSharding:
    """Sharding of a [batch, length] input array (checked to divide)."""
    spec = jax.ShapeDtypeStruct(shape, np.int32)
    return shardings(mesh, ("batch", "length"), plan.rules["batch"], spec, "batch")


@contextlib.contextmanager
def activate(plan: Plan, mesh: Mesh) -> Iterator[None]:
    """Make the mesh and the activation rules current while tracing/running the model."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(plan.context_rules):
        yield


def put(tree, shardings_tree):
    """Place host arrays (numpy, identical on every process) onto their shardings; each
    process only copies the shards it holds."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings_tree)


def batch_parallelism(plan: Plan, mesh: Mesh) -> int:
    """How many ways the batch dimension is split: batches are padded to a multiple."""
    spec = _spec(("batch",), plan.rules["batch"])[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[n] for n in names)


def cache_shardings(plan: Plan, mesh: Mesh, cache_shapes: dict) -> dict:
    """Shardings of a KV cache (see model.init_cache; stacked or per layer), checked to divide."""
    from llama_jax.model import cache_axes

    return shardings(
        mesh, cache_axes(cache_shapes), plan.rules["cache"] + plan.rules["batch"], cache_shapes, "KV cache"
    )


def pool_sharding(plan: Plan, mesh: Mesh) -> NamedSharding:
    """Sharding of the serving page pools (`paged.POOL_AXES`): kv heads as the [cache] rules say."""
    from llama_jax.paged import POOL_AXES

    return NamedSharding(mesh, _spec(POOL_AXES, plan.rules["cache"]))
