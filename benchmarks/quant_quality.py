"""Quality of weight-only quantization (quant.py) on held-out text: per mode, the share of next-token
argmaxes that agree with the unquantized model's, perplexity, its change, and weight bytes against
the model in bfloat16 (all weights, and the quantized linear kernels alone).

    python train.py --out /tmp/qrun --steps 300
    python benchmarks/quant_quality.py --checkpoint /tmp/qrun            # the run's held-out documents
    python benchmarks/quant_quality.py --checkpoint DIR --text FILE.txt  # any checkpoint and text

The unquantized reference computes in the load's dtype (float32 on CPUs, else bfloat16). Targets:
int8 top-1 >= 99% and perplexity within 1%; int4 perplexity within 3%.
"""

from __future__ import annotations

import functools
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import batches, quant
from llama_jax.documents import load_corpus
from llama_jax.errors import ArgumentParser, UserError, run_cli
from llama_jax.load import load
from llama_jax.run_dir import tokenizer_in
from llama_jax.train_config import TrainConfig, load_toml

TARGETS = {"int8": (0.99, 0.01), "int4": (None, 0.03)}  # (top-1 agreement at least, |rel. change in ppl| at most)


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, params, batch):
    """Per position: the target's negative log-likelihood and the argmax token."""
    logits, _ = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked, jnp.argmax(logits, axis=-1)


def held_out(checkpoint: Path, text: str | None, seq_len: int | None, batch_size: int, count: int) -> list:
    """Batches of the text file, else of the documents the run at `checkpoint` held out."""
    tokenizer = tokenizer_in(checkpoint)
    if tokenizer is None:
        raise UserError(f"{checkpoint} has no tokenizer.model or tokenizer.json")
    if text:
        docs, length = grain.MapDataset.source([Path(text).read_text()]), seq_len or 128
    else:
        if not (checkpoint / "train_config.toml").is_file():
            raise UserError(f"{checkpoint} is not a train.py run directory: give --text FILE")
        cfg = TrainConfig(**load_toml(checkpoint / "train_config.toml"))
        docs = load_corpus(cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.data_format, cfg.data_field, cfg.seed).eval
        length = seq_len or cfg.seq_len
    return batches.eval_batches(docs, batches.documents_packer(str(tokenizer), length), batch_size, count)


def main(argv: list[str] | None = None) -> int:
    def run(argv: list[str]) -> None:
        p = ArgumentParser(prog="quant_quality.py", description=__doc__.splitlines()[0])
        p.add_argument("--checkpoint", required=True, help="a train.py run directory or any checkpoint with --text")
        p.add_argument("--text", default=None, help="held-out text file (default: the run's held-out documents)")
        p.add_argument("--seq-len", type=int, default=None, help="default: the run's (128 with --text)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--batches", type=int, default=16, help="held-out batches to evaluate")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--modes", default="int8,int4")
        p.add_argument("--debug", action="store_true")
        args = p.parse_args(argv)
        data = held_out(Path(args.checkpoint), args.text, args.seq_len, args.batch_size, args.batches)
        tokens = sum(int(b["loss_mask"].sum()) for b in data)
        rows, ref_argmax, ref = [], [], None
        for mode in ["none", *args.modes.split(",")]:
            lm = load(args.checkpoint, args.dtype, quantize=mode)
            nll, agree = 0.0, 0
            for i, b in enumerate(data):
                losses, argmax = jax.device_get(_predict(lm.model, lm.params, jax.tree.map(jnp.asarray, b)))
                mask = b["loss_mask"] > 0
                nll += float(np.sum(losses[mask], dtype=np.float64))
                if mode == "none":
                    ref_argmax.append(argmax)
                agree += int(np.sum(argmax[mask] == ref_argmax[i][mask]))
            ppl = float(np.exp(nll / tokens))
            weights, kernels = quant.weight_bytes(lm.params), quant.linear_bytes(lm.params)
            ref = ref or (ppl, weights, kernels)
            rows.append((mode, agree / tokens, ppl, ppl / ref[0] - 1, weights / ref[1], kernels / ref[2]))
            del lm
        print(f"{args.checkpoint}: {tokens} held-out tokens, {jax.devices()[0].platform}")
        print("| mode | top-1 agreement | perplexity | rel. change | bytes/bf16 all | bytes/bf16 linear | target |")
        print("|---|---|---|---|---|---|---|")
        for mode, top1, ppl, rel, weights, kernels in rows:
            verdict = "reference"
            if mode in TARGETS:
                least, most = TARGETS[mode]
                ok = (least is None or top1 >= least) and abs(rel) <= most
                verdict = "pass" if ok else "FAIL"
            print(
                f"| {mode} | {top1:.2%} | {ppl:.3f} | {rel:+.2%} | {weights:.3f} | {kernels:.3f} | {verdict} |",
                flush=True,
            )

    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
