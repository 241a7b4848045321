"""The training configuration: one flat, typed dataclass.

Values come from the defaults below, then a TOML file (`--config run.toml`, flat `key = value`
lines named like the fields), then command-line flags (`--batch-size 8` sets `batch_size`).
The defaults train the `tiny` preset on the embedded Python-standard-library corpus in a few
minutes on a laptop CPU; Llama's own recipe (reference section 8) is noted where it differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from llama_jax.attention import IMPLEMENTATIONS
from llama_jax.config import ConfigError, get_preset
from llama_jax.dtypes import DTYPES
from llama_jax.errors import ArgumentParser
from llama_jax.lora import TARGETS
from llama_jax.model import REMAT_POLICIES

DATA_FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord")
COMPUTE_DTYPES = ("auto", *(d for d in DTYPES if d != "float16"))  # float16 would need loss scaling
ATTENTION = ("auto", *IMPLEMENTATIONS)
STAGES = ("pretrain", "sft", "dpo", "reward", "ppo", "grpo")
RL_STAGES = ("ppo", "grpo")
# Llama 2's PPO settings (reference: the Llama 2 paper, section 3.2.3): a constant learning rate of
# 1e-6, batches of 512 prompts, minibatches of 64 with one step each; the AdamW settings above stand.
STAGE_DEFAULTS = {
    stage: {"lr": 1e-6, "warmup_steps": 0, "min_lr_ratio": 1.0, "batch_size": 512, "minibatch_size": 64}
    for stage in RL_STAGES
}
LORA_TARGETS = tuple(TARGETS)
# Options a resumed run must keep: they decide the data order the checkpointed iterator is in.
RESUME_FIXED = (
    "data", "data_format", "data_field", "eval_data", "eval_fraction", "seed", "seq_len", "batch_size",
    "data_streams", "workers", "shuffle_window",
    # ... and what the checkpoints hold and are relative to.
    "stage", "init_from", "lora_rank", "lora_alpha", "lora_targets", "skip_bad_examples",
    "reward_model", "reward", "value_from", "group_size", "max_new_tokens",
)  # fmt: skip


def _opt(default, help: str, choices: tuple = ()):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    # What to train on, and where to write.
    model: str = _opt("tiny", "model preset (see llama_jax.config.PRESETS; --init-from sets the model instead)")
    data: str = _opt("", "comma-separated file globs; empty: the Python standard library of this interpreter")
    data_format: str = _opt("auto", "how to read --data ('auto': by file extension)", DATA_FORMATS)
    data_field: str = _opt("text", "the JSONL field / Parquet column holding each document's text")
    eval_data: str = _opt("", "held-out file globs; empty: hold out --eval-fraction of the documents")
    eval_fraction: float = _opt(0.02, "share of the documents held out for evaluation when --eval-data is empty")
    tokenizer: str = _opt("", "tokenizer file or directory; empty: train a SentencePiece BPE on the training data")
    out: str = _opt("runs/pretrain", "run directory; a run already there is resumed from its latest checkpoint")
    init_from: str = _opt("", "start from the weights of any checkpoint infer.py can load (sets the model)")
    stage: str = _opt(
        "pretrain", "pretrain on documents; sft on chat JSONL; dpo, or reward (a reward model), on preference JSONL",
        STAGES,
    )  # fmt: skip
    shuffle_window: int = _opt(1024, "packed rows shuffled together (a long document fills many rows)")
    data_streams: int = _opt(
        0,
        "independent data streams, each giving batch-size / data-streams rows of every batch: the data order depends "
        "on this and never on the process count, so a run resumes on any process count dividing it "
        "(0: the largest of 8, 4, 2, 1 that divides --batch-size)",
    )
    workers: int = _opt(0, "grain worker processes per data stream that read and tokenize (0: in the main process)")
    # Post-training (llama_jax/examples.py, llama_jax/step.py, llama_jax/lora.py).
    dpo_beta: float = _opt(0.1, "DPO beta: how strongly the policy is held to the reference (the --init-from weights)")
    lora_rank: int = _opt(0, "LoRA rank: train only low-rank adapters, any stage, from --init-from (0: all weights)")
    lora_alpha: float = _opt(16.0, "LoRA alpha: the adapters' output is scaled by alpha / rank")
    lora_dropout: float = _opt(0.0, "LoRA dropout on the adapters' inputs")
    lora_targets: tuple[str, ...] = _opt(LORA_TARGETS, "comma-separated projections that get LoRA adapters")
    skip_bad_examples: bool = _opt(False, "sft/dpo: skip and count bad examples instead of stopping at the first")
    # Reinforcement learning (llama_jax/rl/): --data holds {"prompt"} or {"messages"} lines.
    reward_model: str = _opt("", "ppo/grpo: the reward model, a checkpoint of train.py --stage reward (or HF's)")
    reward: str = _opt("", "ppo/grpo: instead, a reward FUNCTION(prompt, completion) -> float in MODULE or FILE.py")
    value_from: str = _opt(
        "reward",
        "ppo: the value model starts as the reward model, or as the policy with a fresh head",
        ("reward", "policy"),
    )
    kl_beta: float = _opt(
        0.01, "ppo/grpo: weight of the KL penalty to the reference (Llama 2: 0.01 at 7B/13B, 0.005 at 34B/70B)"
    )
    gamma: float = _opt(1.0, "ppo: discount of GAE")
    lam: float = _opt(0.95, "ppo: lambda of GAE")
    ppo_epochs: int = _opt(1, "ppo/grpo: passes over each batch of rollouts, a step per minibatch")
    minibatch_size: int = _opt(8, "ppo/grpo: rollouts per optimizer step (Llama 2: 64 of 512)")
    clip_ratio: float = _opt(0.2, "ppo/grpo: clip of the probability ratio in the surrogate objective")
    clip_value: float = _opt(0.2, "ppo: clip of the value change in the value loss")
    vf_coef: float = _opt(0.1, "ppo: weight of the value loss")
    group_size: int = _opt(4, "grpo: completions per prompt; --batch-size counts completions")
    max_new_tokens: int = _opt(32, "ppo/grpo: response tokens sampled per prompt; prompts get --seq-len minus these")
    temperature: float = _opt(
        1.0, "ppo/grpo: sampling temperature of the rollouts (also applied to their log-probabilities)"
    )
    top_p: float = _opt(1.0, "ppo/grpo: nucleus sampling of the rollouts (1: off)")
    top_k: int = _opt(0, "ppo/grpo: top-k sampling of the rollouts (0: off)")
    # Steps and batch.
    steps: int = _opt(300, "optimizer steps (ppo/grpo: iterations, each a batch of rollouts)")
    batch_size: int = _opt(8, "sequences per optimizer step (across all processes)")
    seq_len: int = _opt(128, "tokens per packed sequence")
    grad_accum: int = _opt(1, "micro-batches per step (the batch, or an RL minibatch, is split; gradients are summed)")
    seed: int = _opt(0, "seed for initialization, data order and the final sample")
    # Optimizer: AdamW, warmup + cosine (reference section 8; Llama: lr 3e-4 at 7B-8B, 2000 warmup steps).
    lr: float = _opt(2e-3, "peak learning rate")
    warmup_steps: int = _opt(30, "linear warmup steps from 0 to --lr")
    min_lr_ratio: float = _opt(0.1, "cosine decay ends at this fraction of --lr")
    b1: float = _opt(0.9, "AdamW beta1")
    b2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-5, "AdamW epsilon")
    weight_decay: float = _opt(0.1, "AdamW decoupled weight decay")
    no_decay: tuple[str, ...] = _opt(
        ("norm", "tok_embeddings"), "comma-separated regexes of parameter paths without weight decay"
    )
    clip_norm: float = _opt(1.0, "clip gradients to this global norm (0: off)")
    z_loss: float = _opt(0.0, "weight of the z-loss, mean of log(Z)^2 (PaLM uses 1e-4; 0: off)")
    # Compute.
    dtype: str = _opt("auto", "compute dtype ('auto': bfloat16 on accelerators, float32 on CPU)", COMPUTE_DTYPES)
    remat: str = _opt("none", "activation rematerialization policy per layer", tuple(REMAT_POLICIES))
    attention: str = _opt(
        "auto", "attention kernel ('auto': Pallas splash on TPUs, cuDNN on GPUs, else XLA)", ATTENTION
    )
    loss_chunk: int = _opt(512, "sequence positions per chunk of output logits in the loss")
    scan_unroll: int = _opt(
        0, "layers per iteration of the loop over layers (0: auto, all on GPUs without remat, else 1)"
    )
    # Scale-out.
    sharding: str = _opt("fsdp", "sharding plan: a name in sharding/ or a .toml path")
    coordinator: str = _opt("", "multi-host: HOST:PORT of process 0 (pods and SLURM are detected without it)")
    num_processes: int = _opt(0, "multi-host: number of processes (with --coordinator)")
    process_id: int = _opt(-1, "multi-host: this process's index (with --coordinator)")
    compile_only: bool = _opt(False, "compile the train step for --topology, print per-chip memory, and exit")
    topology: str = _opt("", "TPU slice for --compile-only, e.g. v5p-256 or v5p:4x4x8")
    # Logging, evaluation, checkpoints.
    log_every: int = _opt(10, "steps between metrics lines (their loss is the mean over these steps)")
    eval_every: int = _opt(50, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = _opt(8, "held-out batches per evaluation")
    save_every: int = _opt(100, "steps between checkpoints (also saved at the end and on SIGTERM)")
    keep: int = _opt(3, "checkpoints kept")
    sample_tokens: int = _opt(64, "tokens sampled from the final checkpoint (0: no sample)")
    sample_prompt: str = _opt("    def __init__(self", "prompt of the final sample")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ConfigError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        positive = (
            "steps batch_size seq_len grad_accum shuffle_window log_every eval_batches save_every keep loss_chunk"
        )
        for name in positive.split():
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in "warmup_steps eval_every workers sample_tokens lr weight_decay z_loss scan_unroll".split():
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.data_streams < 0:
            raise ConfigError(f"data-streams must not be negative, got {self.data_streams}")
        rows = self.batch_size // self.group_size if self.stage == "grpo" else self.batch_size  # prompts per batch
        if self.stage == "grpo" and (self.group_size < 2 or self.batch_size % self.group_size):
            raise ConfigError(f"grpo needs a group-size >= 2 dividing batch-size {self.batch_size}: {self.group_size}")
        if self.data_streams == 0:  # frozen: set the resolved default once, so it is saved and printed
            object.__setattr__(self, "data_streams", math.gcd(rows, 8))
        if rows % self.data_streams:
            raise ConfigError(
                f"batch-size {self.batch_size} is not divisible by data-streams {self.data_streams}"
                + (f" x group-size {self.group_size}" if self.stage == "grpo" else "")
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch-size {self.batch_size} is not divisible by grad-accum {self.grad_accum}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.stage != "pretrain" and not self.data and not self.compile_only:
            kind = {"sft": "chat", "ppo": "prompt", "grpo": "prompt"}.get(self.stage, "preference")
            raise ConfigError(f"--stage {self.stage} needs --data: JSONL files of {kind} examples")
        if self.stage != "pretrain" and self.data_format not in ("auto", "jsonl"):
            raise ConfigError(f"--stage {self.stage} reads JSONL data, not --data-format {self.data_format}")
        if (self.stage == "dpo" or self.lora_rank) and not self.init_from and not self.compile_only:
            raise ConfigError("DPO and LoRA need --init-from: the checkpoint that is the reference / the base")
        if not self.dpo_beta > 0 or self.lora_rank < 0 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("need dpo-beta > 0, lora-rank >= 0, lora-alpha > 0 and lora-dropout in [0, 1)")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown or not self.lora_targets:
            raise ConfigError(f"lora-targets must name some of {', '.join(LORA_TARGETS)}; got {self.lora_targets}")
        if not self.init_from:
            get_preset(self.model)
        if self.stage in RL_STAGES:
            self._check_rl()

    def _check_rl(self) -> None:
        if not self.init_from and not self.compile_only:
            raise ConfigError(f"--stage {self.stage} needs --init-from: the policy to start from (an SFT model)")
        if bool(self.reward_model) == bool(self.reward) and not (self.compile_only and not self.reward):
            raise ConfigError(f"--stage {self.stage} needs one of --reward-model CHECKPOINT, --reward MODULE:FUNCTION")
        if self.stage == "ppo" and self.value_from == "reward" and self.reward:
            raise ConfigError("--value-from reward needs --reward-model; with --reward pass --value-from policy")
        if not 0 < self.max_new_tokens < self.seq_len:
            raise ConfigError(f"max-new-tokens must be in [1, seq-len {self.seq_len}), got {self.max_new_tokens}")
        if self.minibatch_size <= 0 or self.batch_size % self.minibatch_size or self.minibatch_size % self.grad_accum:
            raise ConfigError(
                f"minibatch-size {self.minibatch_size} must divide batch-size {self.batch_size} and be divisible "
                f"by grad-accum {self.grad_accum}"
            )
        if self.ppo_epochs < 1 or self.kl_beta < 0 or not self.temperature > 0:
            raise ConfigError("need ppo-epochs >= 1, kl-beta >= 0 and temperature > 0 (rollouts are sampled)")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and self.clip_ratio > 0 and self.clip_value > 0):
            raise ConfigError("need gamma and lam in [0, 1], clip-ratio > 0 and clip-value > 0")

    def to_toml(self) -> str:
        """Flat TOML that `--config` reads back (JSON scalars, strings and arrays are valid TOML)."""
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in dataclasses.asdict(self).items())


_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value):
    """A TOML value -> the field's type (ints are accepted for floats, lists for tuples)."""
    hint = _HINTS[name]
    if hint == tuple[str, ...] and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not hint:
        raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}")
    return value


def load_toml(path: str | Path) -> dict:
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = set(data) - set(_HINTS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    return {k: _coerce(k, v) for k, v in data.items()}


def _parse_tuple(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.split(",") if s)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="train.py",
        description="Train a Llama model (pretrain, SFT, DPO; LoRA). Precedence: defaults < --config TOML < flags.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="TOML file of options (flat keys named like the fields)")
    parser.add_argument("--debug", action="store_true", help="show a traceback for errors")
    for f in dataclasses.fields(TrainConfig):
        hint = _HINTS[f.name]
        default = ",".join(f.default) if hint == tuple[str, ...] else f.default
        if hint is bool:
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, action="store_true", help=f"{f.metadata['help']} (default: {f.default!r})")
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_parse_tuple if hint == tuple[str, ...] else hint,
            choices=f.metadata["choices"] or None,
            metavar=None if f.metadata["choices"] else f.name.upper(),
            help=f"{f.metadata['help']} (default: {default!r})",
        )
    return parser


def parse_args(argv: list[str]) -> TrainConfig:
    """Defaults (the stage's own, STAGE_DEFAULTS, over the common ones), then the --config TOML,
    then the flags given on the command line."""
    args = vars(build_parser().parse_args(argv))
    args.pop("debug", None)
    values = load_toml(args.pop("config")) if "config" in args else {}
    stage = args.get("stage", values.get("stage", "pretrain"))
    return TrainConfig(**{**STAGE_DEFAULTS.get(stage, {}), **values, **args})
