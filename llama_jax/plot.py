"""`python -m llama_jax.plot RUN [RUN ...]`: the curves of train.py runs.

A supervised run (pretrain, sft, dpo, reward) -> RUN/loss.png: the training and held-out loss. An RL
run (ppo, grpo) -> RUN/rl.png: reward, KL to the reference, entropy, response length, the losses,
clip fraction and explained variance per iteration. Several runs are drawn over each other (labelled
by directory, e.g. one per --kl-beta) into --out (default: the first run's directory, compare.png).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llama_jax.errors import ArgumentParser, UserError, run_cli

RL_PANELS = (
    ("reward", "mean reward"),
    ("kl", "KL to the reference (nats per response)"),
    ("entropy", "entropy (nats per token)"),
    ("response_length", "response length (tokens)"),
    ("policy_loss", "policy loss"),
    ("value_loss", "value loss"),
    ("clip_fraction", "clip fraction"),
    ("explained_variance", "explained variance"),
)


def metrics(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        raise UserError(f"no metrics.jsonl in {run_dir}") from None


def plot(*run_dirs: str | Path, out: str | Path | None = None) -> Path:
    """Draw the runs' curves; returns the image's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(r): metrics(Path(r)) for r in run_dirs}
    first = next(iter(runs))
    rl = any("reward" in r and "kl" in r for rows in runs.values() for r in rows)
    if rl:
        panels = [(k, title) for k, title in RL_PANELS if any(k in r for rows in runs.values() for r in rows)]
        fig, axes = plt.subplots((len(panels) + 1) // 2, 2, figsize=(11, 2.6 * ((len(panels) + 1) // 2)), squeeze=False)
        for ax, (key, title) in zip(axes.flat, panels, strict=False):
            for run_dir, rows in runs.items():
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), label=run_dir.name)
            ax.set(title=title, xlabel="iteration")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        axes.flat[0].legend()
        fig.tight_layout()
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
        for run_dir, rows in runs.items():
            prefix = f"{run_dir.name}: " if len(runs) > 1 else ""
            for key, label in (("loss", "training loss"), ("eval_loss", "held-out loss")):
                points = [(r["step"], r[key]) for r in rows if key in r]
                marker = "o" if key == "eval_loss" else None
                if points:
                    ax.plot(*zip(*points, strict=True), marker=marker, label=prefix + label)
        entropy = next((r["unigram_entropy"] for r in runs[first] if "unigram_entropy" in r), None)
        if entropy is not None:
            ax.axhline(entropy, color="gray", linestyle="--", label="held-out unigram entropy")
        ax.set(xlabel="step", ylabel="nats per token", title=first.name)
        ax.grid(alpha=0.3)
        ax.legend()
    path = Path(out) if out else first / ("compare.png" if len(runs) > 1 else "rl.png" if rl else "loss.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m llama_jax.plot", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN", help="train.py run directories (--out)")
    parser.add_argument("--out", default=None, help="the image to write (default: in the first run's directory)")
    args = parser.parse_args(argv)
    print(plot(*args.run_dirs, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
