"""Peak memory of llama-jax-convert on a synthetic multi-GB checkpoint.

Builds a random bfloat16 Hugging Face checkpoint with a llama-like shape (written one tensor at a
time), runs conversions to each target format in subprocesses, and prints each run's peak
resident set size (the child's ru_maxrss from wait4) against the target of
1 GB + a quarter of the checkpoint size. GB here means 1e9 bytes.

The children run with torch and transformers hidden (tests/no_torch), as on a machine without them.

A child's ru_maxrss also counts the parent's resident set at the fork (the kernel carries the
old address space's high-water mark over exec), so this process stays small: the synthetic
checkpoint is generated in a child as well.

    python benchmarks/convert_memory.py [--layers 36] [--workdir /tmp]

About 3.5 GB per checkpoint copy with the default 36 layers; at most three copies exist at once,
and the work directory is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.convert import save_checkpoint
from llama_jax.convert.layout import BY_KEY

GB = 1e9
BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "no_torch"), str(ROOT)])}


class RandomSource:
    """A checkpoint made up on the fly: each tensor is seeded by its name, so nothing is held."""

    format = "random"
    tokenizer_files: list[Path] = []

    def __init__(self, config: LlamaConfig):
        self.config = config

    def read(self, key: str, layer: int | None = None) -> np.ndarray:
        t = BY_KEY[key]
        rng = np.random.default_rng(zlib.crc32(f"{key}/{layer}".encode()))
        if key.endswith("scale"):
            return (1 + 0.1 * rng.standard_normal(t.shape(self.config), np.float32)).astype(BF16)
        return (0.02 * rng.standard_normal(t.shape(self.config), np.float32)).astype(BF16)

    def dtype(self, key: str) -> np.dtype:
        return BF16


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of `llama-jax-convert argv` in a fresh process."""
    start = time.time()
    child = subprocess.Popen(
        [sys.executable, "-m", "llama_jax.convert", *argv], stdout=subprocess.DEVNULL, env=NO_TORCH
    )
    _, status, usage = os.wait4(child.pid, 0)  # the rusage of this child alone
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"llama-jax-convert {' '.join(argv)} failed with status {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss * 1024, time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--workdir", default=None, help="where to put the temporary checkpoints")
    p.add_argument("--make", default=None, help=argparse.SUPPRESS)  # internal: write the synthetic checkpoint
    args = p.parse_args()
    if args.make:
        cfg = LlamaConfig(dim=2048, n_layers=args.layers, n_heads=16, n_kv_heads=4, vocab_size=32000, ffn_dim=5632)
        save_checkpoint(RandomSource(cfg), args.make, "hf", max_shard_bytes=2 * 10**9)
        return
    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    try:
        hf = work / "hf"
        start = time.time()
        make = [sys.executable, __file__, "--make", str(hf), "--layers", str(args.layers)]
        subprocess.run(make, check=True, env=NO_TORCH)
        print(f"synthetic checkpoint: {dir_bytes(hf) / GB:.2f} GB in {time.time() - start:.0f} s", file=sys.stderr)
        # (source directory, target format, extra arguments); run i writes "{target}-{i}".
        runs = [
            ("hf", "orbax", []),
            ("orbax-0", "hf", []),
            ("hf", "meta", ["--model-parallel", "2"]),
            ("meta-2", "orbax", []),
            ("hf", "hf", []),
        ]
        rows = []
        for i, (src, to, extra) in enumerate(runs):
            size = dir_bytes(work / src)
            peak, seconds = run([str(work / src), str(work / f"{to}-{i}"), "--to", to, *extra])
            direction = f"{src.split('-')[0]} -> {to}"
            rows.append((direction, size, peak, GB + size / 4, seconds))
            print(f"{direction}: {peak / GB:.2f} GB peak in {seconds:.0f} s", file=sys.stderr)
            for d in set(work.iterdir()) - {work / s for s, _, _ in runs[i + 1 :]}:
                shutil.rmtree(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'direction':<16} {'ckpt GB':>8} {'peak RSS GB':>12} {'ratio':>6} {'target GB':>10} {'time s':>7}  result")
    for name, size, peak, target, seconds in rows:
        verdict = "pass" if peak <= target else "FAIL"
        cells = f"{size / GB:>8.2f} {peak / GB:>12.2f} {peak / size:>6.2f} {target / GB:>10.2f} {seconds:>7.0f}"
        print(f"{name:<16} {cells}  {verdict}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    print(f"(this benchmark process peaked at {own:.2f} GB, a floor under each child's figure)")
    if any(peak > target for _, _, peak, target, _ in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
