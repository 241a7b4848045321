"""`python -m llama_jax.plot OUT`: the training and held-out loss of a run -> OUT/loss.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llama_jax.errors import ArgumentParser, UserError, run_cli


def plot(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        raise UserError(f"no metrics.jsonl in {run_dir}") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in (("loss", "training loss"), ("eval_loss", "held-out loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    entropy = next((r["unigram_entropy"] for r in rows if "unigram_entropy" in r), None)
    if entropy is not None:
        ax.axhline(entropy, color="gray", linestyle="--", label="held-out unigram entropy")
    ax.set(xlabel="step", ylabel="nats per token", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m llama_jax.plot", description=__doc__)
    parser.add_argument("run_dir", help="a train.py run directory (--out)")
    print(plot(parser.parse_args(argv).run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
