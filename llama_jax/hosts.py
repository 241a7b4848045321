"""Several processes (hosts) running one program: start-up, and the collectives that move host data
between them. Every function is also correct, and free, in a one-process run."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from llama_jax.errors import UserError


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Start jax.distributed when running on several hosts.

    Explicit arguments (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) win;
    otherwise JAX's own detection runs on TPU pods and SLURM/MPI clusters of more than one
    task; a plain single machine stays single-process."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UserError("multi-host needs all of --coordinator, --num-processes and --process-id")
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    tasks = max(int(os.environ.get(v, "1") or 1) for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if "," in hosts or tasks > 1:
        jax.distributed.initialize()


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_json(obj: dict[str, Any]) -> dict[str, Any]:
    """The union of every process's JSON object, on every process (a collective). The object is
    serialised at once, so later changes to it (an iterator going on) do not leak in."""
    encoded = json.dumps(obj)
    if jax.process_count() == 1:
        return json.loads(encoded)
    from jax.experimental import multihost_utils

    raw = np.frombuffer(encoded.encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.int32(raw.size)).max())
    gathered = multihost_utils.process_allgather(np.pad(raw, (0, size - raw.size)))
    return {k: v for row in gathered for k, v in json.loads(bytes(row).rstrip(b"\0")).items()}


def global_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a batch array, in process order, on every process (a collective)."""
    if jax.process_count() == 1:
        return np.ascontiguousarray(local)
    from jax.experimental import multihost_utils

    return np.ascontiguousarray(multihost_utils.process_allgather(local, tiled=True))


def local_rows(batch: dict, process_index: int | None = None, process_count: int | None = None) -> dict:
    """This process's contiguous block of a global batch's rows."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    rows = len(next(iter(batch.values()))) // count
    return {k: v[index * rows : (index + 1) * rows] for k, v in batch.items()}


def global_batch(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """This process's rows -> global arrays (each process holds its share of the batch)."""
    return {k: jax.make_array_from_process_local_data(s, np.asarray(local[k])) for k, s in shardings.items()}
