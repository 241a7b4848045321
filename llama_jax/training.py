"""`train.py`: the training loop of every stage (pretrain, sft, dpo, reward; LoRA or all weights).

prepare the run directory (llama_jax/run_dir.py), build the step (llama_jax/step.py), start or
resume the state, then loop: a batch, a step, and on their schedules a metrics line, a held-out
evaluation and a checkpoint; a SIGTERM saves the current step and stops. At the end, a sample from
the saved checkpoint, read back as infer.py reads it.
"""

from __future__ import annotations

import math
import os
import sys
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax import batches, hosts, run_dir, sharding
from llama_jax.config import flops_per_token
from llama_jax.step import TrainStep, Tuning, build, shardings_of
from llama_jax.train_config import RL_STAGES, TrainConfig, parse_args


def train(cfg: TrainConfig) -> None:
    """Run, or resume, the training that `cfg` describes: to the last step, or until a SIGTERM,
    which saves the current step. Raises Diverged on a NaN or infinite loss."""
    run = run_dir.prepare(cfg)
    tuning = Tuning.from_config(cfg)
    data_iter, eval_set, entropy = data_for(cfg, run)
    step = build(cfg, run.model_cfg, tuning)
    print(f"sharding plan {step.plan.name}: mesh {dict(step.mesh.shape)} over {jax.device_count()} devices")
    checkpoints = run_dir.Checkpoints(run.out, cfg.keep, "params" if tuning.lora is None else "adapters")
    rng, batch_sh = jax.random.key(cfg.seed), shardings_of(step.batch)
    with sharding.activate(step.plan, step.mesh):
        state, start = run_dir.start_state(step, tuning, checkpoints, data_iter, run.init, rng)
    eval_set = [hosts.global_batch(hosts.local_rows(b), batch_sh) for b in eval_set]  # the same in any process count
    log, meter, preemption = run_dir.MetricsLog(run.out, start), Meter(cfg, step, tuning), run_dir.Preemption()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=None, dynamic_ncols=True)
    with sharding.activate(step.plan, step.mesh):
        try:
            for n in range(start + 1, cfg.steps + 1):
                batch = next(data_iter)
                state, metrics = step.run(state, hosts.global_batch(batch, batch_sh))
                metrics = finite({k: float(v) for k, v in jax.device_get(metrics).items()}, n, checkpoints)
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
                meter.add(metrics["loss"])
                logged = n % cfg.log_every == 0 or n == cfg.steps
                if logged:
                    log.write(n, meter.line(n, metrics, batch))
                evaluated = cfg.eval_every and n % cfg.eval_every == 0 and n != cfg.steps
                if evaluated:
                    evaluate(cfg, step, state, eval_set, log, n, entropy)
                if n % cfg.save_every == 0 or n == cfg.steps or preemption.requested:
                    checkpoints.save(state, data_iter, rng)
                if n == start + 1 or logged or evaluated:
                    meter.restart()  # rates exclude compiling and evaluating
                checkpoints.report(wait=preemption.requested)
                if preemption.requested:
                    print(f"SIGTERM: stopped after saving step {n}")
                    return
            if start < cfg.steps:
                evaluate(cfg, step, state, eval_set, log, cfg.steps, entropy)
        finally:
            bar.close()
            preemption.restore()
            checkpoints.close()
            log.close()
            data_iter.close()
    if cfg.sample_tokens:
        run_dir.sample(cfg, run)


def data_for(cfg: TrainConfig, run: run_dir.Run) -> tuple[batches.Streams, list[batches.Batch], float]:
    """This process's training batches, the held-out batches (global rows) and their unigram entropy."""
    items, tokenizer = run.items, str(run.tokenizer)
    if cfg.stage == "pretrain":
        pack = batches.documents_packer(tokenizer, cfg.seq_len, cfg.workers, cfg.shuffle_window, cfg.seed)
        pack_eval, what = batches.documents_packer(tokenizer, cfg.seq_len), "documents"
    else:
        pack = pack_eval = batches.examples_packer(cfg.stage, cfg.seq_len)
        what = f"{cfg.stage} examples"
    processes = (jax.process_index(), jax.process_count())
    data_iter = batches.train_batches(items.train, pack, cfg.batch_size, cfg.seed, cfg.data_streams, *processes)
    eval_set = batches.eval_batches(items.eval, pack_eval, cfg.batch_size, cfg.eval_batches)
    counts = f"{len(items.train)} training and {len(items.eval)} held-out {what}"
    if getattr(items, "skipped", 0):
        counts += f" ({items.skipped} bad ones skipped; the first: {items.first_skipped})"
    entropy = batches.unigram_entropy(eval_set, run.model_cfg.vocab_size)
    tokens = sum(int(b["loss_mask"].sum()) for b in eval_set)
    if cfg.stage != "reward":  # a reward pair's targets are not next tokens
        counts += f"; held-out unigram entropy {entropy:.3f} nats/token over {tokens} tokens"
    print(counts)
    return data_iter, eval_set, entropy


def finite(metrics: dict[str, float], n: int, checkpoints: run_dir.Checkpoints) -> dict[str, float]:
    """The step's metrics; run_dir.Diverged when the loss or the gradient norm is not finite."""
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        last = checkpoints.latest_step()
        raise run_dir.Diverged(
            f"loss {metrics['loss']}, gradient norm {metrics['grad_norm']} at step {n}; "
            + (f"the last good checkpoint is step {last}" if last else "no checkpoint was saved")
        )
    return metrics


class Meter:
    """Metrics lines: the mean loss over the steps since the last line, tokens/s and MFU over the
    steps since the clock last restarted (after compiling, logging and evaluating)."""

    def __init__(self, cfg: TrainConfig, step: TrainStep, tuning: Tuning):
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        model_cfg = step.model.cfg
        lora_run, dpo = tuning.lora is not None, int(tuning.stage == "dpo")
        self.flops = self.tokens_per_step * flops_per_token(model_cfg, cfg.seq_len, not lora_run, dpo)
        self.peak = matmul_flops_per_s(step.model.dtype) * jax.device_count()
        self.mark, self.steps, self.losses = time.perf_counter(), 0, []
        print(
            f"model {model_cfg.num_params / 1e6:.1f}M parameters, {self.tokens_per_step} tokens per step, "
            f"on a {jax.devices()[0].device_kind} ({jax.default_backend()}), compute {jnp.dtype(step.model.dtype).name}"
        )

    def add(self, loss: float) -> None:
        self.steps += 1
        self.losses.append(loss)

    def line(self, n: int, metrics: dict[str, float], batch: batches.Batch) -> dict[str, Any]:
        """The metrics of a logged step, printed too."""
        seconds = time.perf_counter() - self.mark
        metrics = metrics | {
            "loss": sum(self.losses) / len(self.losses),
            "tokens_per_s": self.steps * self.tokens_per_step / seconds,
            "mfu": self.steps * self.flops / seconds / self.peak,
            "tokens": n * self.tokens_per_step,
            "data_crc": zlib.crc32(hosts.global_rows(batch["tokens"]).tobytes()),
        }
        self.losses = []
        tqdm.write(
            f"step {n:6d} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"grad norm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:,.0f} tok/s | mfu {metrics['mfu']:.1%}"
        )
        return metrics

    def restart(self) -> None:
        self.mark, self.steps = time.perf_counter(), 0


def evaluate(cfg, step: TrainStep, state, eval_set: list, log: run_dir.MetricsLog, n: int, entropy: float) -> None:
    """Held-out metric means (nats per token, or DPO loss per pair), logged and printed."""
    sums = [jax.device_get(step.evaluate(state.params, state.frozen, b)) for b in eval_set]
    totals = {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) for k in sums[0]}
    count = max(totals.pop("count"), 1)
    means = {k: v / count for k, v in totals.items()}
    loss = means.pop("loss")
    if cfg.stage in ("dpo", "reward"):
        log.write(n, {"eval_loss": loss, **{f"eval_{k}": v for k, v in means.items()}})
        accuracy, margin = means["reward_accuracy"], means["reward_margin"]
        tqdm.write(
            f"step {n:6d} | held-out {cfg.stage} loss {loss:.4f}, accuracy {accuracy:.3f}, margin {margin:.3f} "
            f"(chosen {means['chosen_reward']:.3f}, rejected {means['rejected_reward']:.3f})"
        )
        return
    log.write(n, {"eval_loss": loss, "eval_ppl": math.exp(loss), "unigram_entropy": entropy})
    tqdm.write(f"step {n:6d} | held-out loss {loss:.4f} (ppl {math.exp(loss):.1f}, unigram {entropy:.3f})")


def matmul_flops_per_s(dtype: Any) -> float:
    """This device's square-matmul rate in FLOP/s: the median of five timings of ten back-to-back
    products of random matrices (queued without waiting, so dispatch overhead stays hidden)."""
    n = 1024 if jax.default_backend() == "cpu" else 8192
    a, b = (jax.random.normal(key, (n, n), dtype) for key in jax.random.split(jax.random.key(0)))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready([matmul(a, b) for _ in range(10)])
        times.append((time.perf_counter() - start) / 10)
    return 2 * n**3 / float(np.median(times))


def main(argv: list[str]) -> int:
    """`train.py`: parse the options and train; exit code 1 when the loss diverges."""
    cfg = parse_args(argv)
    if cfg.compile_only:
        from llama_jax import aot

        aot.compile_train(cfg)
        return 0
    hosts.initialize_distributed(
        cfg.coordinator or None, cfg.num_processes or None, cfg.process_id if cfg.process_id >= 0 else None
    )
    if jax.process_index() != 0:  # one process speaks for the run
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        if cfg.stage in RL_STAGES:
            from llama_jax.rl.loop import train_rl

            train_rl(cfg)
        else:
            train(cfg)
    except run_dir.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
