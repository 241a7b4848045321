"""Where the time of a profiled run goes, from a `jax.profiler` trace: device kernels summed by name
and by kind (matmul, attention, copy, reduction, other fusion), as a table.

A device session brings back a few small files, not a trace directory: this turns the trace into
the table that names the kernels to remove. On a GPU the kernels are the events of the
`/device:GPU:N` processes; without a device (a CPU rehearsal) the XLA CPU threads' ops stand in.

    python benchmarks/profile_summary.py /tmp/gpu/profile --steps 2
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

KINDS = (  # the first pattern that matches a kernel's name gives its kind
    ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|matmul|\bdot|triton_gemm"),
    ("attention", r"cudnn|flash|fmha|attention|mosaic|splash|tokamax"),
    ("copy", r"copy|memcpy|memset|dynamic[-_]update[-_]slice|dynamic[-_]slice|transpose"),
    ("reduction", r"reduce|reduction|scatter|sort"),
    ("collective", r"all-reduce|all-gather|reduce-scatter|nccl|collective"),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other fusion")


def device_events(trace_dir: Path) -> tuple[str, list[dict]]:
    """(where the events ran, the complete events of the device's kernels) of the newest trace."""
    files = sorted(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"error: no *.trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    gpus = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
    if gpus:
        return "GPU", [e for e in events if e.get("ph") == "X" and e["pid"] in gpus]
    eigen = {key for key, name in threads.items() if name.startswith("tf_XLAEigen")}
    outer = ("ThunkExecutor",)  # CPU events that enclose the ops they run
    return "CPU (no device kernels in the trace)", [
        e
        for e in events
        if e.get("ph") == "X" and (e["pid"], e.get("tid")) in eigen and not e["name"].startswith(outer)
    ]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir", type=Path, help="the directory given to jax.profiler.trace")
    ap.add_argument("--steps", type=int, default=1, help="steps traced: times are per step")
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    args = ap.parse_args(argv)
    where, events = device_events(args.trace_dir)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        by_name[re.sub(r"\.\d+$", "", e["name"])].append(float(e.get("dur", 0.0)))
    total = sum(map(sum, by_name.values())) or 1.0
    by_kind = collections.Counter()
    for name, durations in by_name.items():
        by_kind[kind_of(name)] += sum(durations)
    per_step = lambda us: f"{us / args.steps / 1e3:,.2f}"  # noqa: E731
    print(f"{where}: {len(events)} kernel events, {per_step(total)} ms per step over {args.steps} step(s)")
    print("| kind | ms/step | share |\n|---|---|---|")
    for kind, us in by_kind.most_common():
        print(f"| {kind} | {per_step(us)} | {us / total:.1%} |")
    print(f"\n| kernel (top {args.top}) | kind | calls/step | ms/step | share |\n|---|---|---|---|---|")
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]
    for name, durations in ranked:
        calls, us = len(durations) / args.steps, sum(durations)
        print(f"| {name[:80]} | {kind_of(name)} | {calls:g} | {per_step(us)} | {us / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
