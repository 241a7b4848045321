"""A training run's directory, the state a run starts from, and what every run does around its loop
(checkpoints, metrics, a SIGTERM, the final sample).

OUT holds config.json (the model's LlamaConfig), train_config.toml (the resolved training
configuration), the tokenizer, metrics.jsonl, tensorboard/, lora.json for a LoRA run and
checkpoints/: an Orbax CheckpointManager root whose step directories hold the items `params` (or
`adapters` for a LoRA run), `opt_state`, `data` (every data stream's iterator state) and `meta`
(step, rng). Process 0 writes the files; checkpoints are written collectively.
"""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from llama_jax import batches, hosts, lora, sharding
from llama_jax.chat import encode_dialog
from llama_jax.config import LlamaConfig, get_preset
from llama_jax.convert import open_checkpoint, read_checkpoint
from llama_jax.convert.source import Source
from llama_jax.documents import Corpus, document_lines, load_corpus
from llama_jax.errors import UserError
from llama_jax.examples import Examples, load_examples
from llama_jax.generate import Sampling, generate
from llama_jax.load import load
from llama_jax.model import with_head
from llama_jax.rl.prompts import PromptSet, load_prompt_set
from llama_jax.step import TrainState, TrainStep, Tuning, init_state, shardings_of
from llama_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_sentencepiece
from llama_jax.train_config import RESUME_FIXED, RL_STAGES, TrainConfig, load_toml

TOKENIZER_LINES = 2_000_000  # lines of training text a tokenizer is trained on, at most


@dataclass
class Run:
    """What a run trains on, all checked before anything was written."""

    out: Path
    model_cfg: LlamaConfig
    tokenizer: Path  # the run's own copy
    items: Corpus | Examples | PromptSet  # documents (pretrain), examples (sft, dpo, reward), prompts (ppo, grpo)
    init: Source | None  # the --init-from checkpoint, opened once


def tokenizer_in(directory: Path) -> Path | None:
    return next((directory / n for n in ("tokenizer.model", "tokenizer.json") if (directory / n).is_file()), None)


def prepare(cfg: TrainConfig) -> Run:
    """Check the inputs, then write config.json, train_config.toml, lora.json and the tokenizer to
    the run directory, so that bad input leaves nothing behind."""
    out = Path(cfg.out).absolute()
    tokenizer_src = Path(cfg.tokenizer) if cfg.tokenizer else None
    init = open_checkpoint(cfg.init_from) if cfg.init_from else None
    if init and init.config.quantization != "none":
        raise UserError(
            f"{cfg.init_from} is quantized ({init.config.quantization}) for inference; train from its original"
        )
    model_cfg = init.config if init else get_preset(cfg.model)
    if tokenizer_src is None and init and init.tokenizer_files:
        tokenizer_src = init.tokenizer_files[0]
    if cfg.stage == "reward" and model_cfg.head != "score":  # a fresh scalar head replaces the output layer
        if tokenizer_src is None and tokenizer_in(out) is None:
            raise UserError("--stage reward needs a chat tokenizer: --tokenizer, or --init-from a model with one")
        model_cfg = model_cfg.replace(head="score", pad_id=classifier_pad_id(load_tokenizer(tokenizer_src or out)))
    if cfg.stage != "reward" and model_cfg.head != "lm":
        raise UserError(f"{cfg.init_from} is a reward model; --stage {cfg.stage} trains a language model")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise UserError(f"seq-len {cfg.seq_len} exceeds the model's context of {model_cfg.max_seq_len}")
    batches.local_streams(cfg.data_streams, jax.process_index(), jax.process_count())
    if (out / "config.json").exists():
        if json.loads((out / "config.json").read_text()) != model_cfg.to_dict():
            raise UserError(f"{out} holds a run of another model; choose another --out")
        previous = load_toml(out / "train_config.toml")
        changed = [f"--{k.replace('_', '-')}" for k in RESUME_FIXED if previous.get(k) != getattr(cfg, k)]
        if changed:
            raise UserError(f"{out} was trained with other {', '.join(changed)}; resume with the same values")
    saved = tokenizer_in(out)
    if tokenizer_src is not None:
        vocab = load_tokenizer(tokenizer_src).vocab_size
        if vocab > model_cfg.vocab_size:
            raise UserError(f"the tokenizer has {vocab} tokens, the model only {model_cfg.vocab_size}")
        tokenizer_src = tokenizer_in(tokenizer_src) if tokenizer_src.is_dir() else tokenizer_src
        if saved is not None and saved.read_bytes() != tokenizer_src.read_bytes():
            raise UserError(f"{out} was trained with another tokenizer, {saved}")
    if cfg.stage == "pretrain":
        items = load_corpus(cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.data_format, cfg.data_field, cfg.seed)
    else:  # every example is read and checked before anything is written
        if tokenizer_src is None and saved is None:
            raise UserError(f"--stage {cfg.stage} needs a chat tokenizer: --tokenizer, or --init-from a model with one")
        tokenizer = load_tokenizer(tokenizer_src or saved)
        if cfg.stage in RL_STAGES:
            items = load_prompt_set(cfg.data, tokenizer, cfg.seq_len - cfg.max_new_tokens)
        else:
            items = load_examples(
                cfg.stage, cfg.data, cfg.eval_data, cfg.eval_fraction, tokenizer, cfg.seq_len, cfg.seed,
                cfg.skip_bad_examples,
            )  # fmt: skip

    hosts.barrier("run directory checked")  # every process has read the run directory before it changes
    if jax.process_index() == 0:  # one process writes the run directory; the others then read it
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
        (out / "train_config.toml").write_text(cfg.to_toml())
        if saved is None and tokenizer_src is not None:
            name = "tokenizer.json" if tokenizer_src.suffix == ".json" else "tokenizer.model"
            shutil.copyfile(tokenizer_src, out / name)
        elif saved is None:
            print(f"training a {model_cfg.vocab_size}-token SentencePiece BPE tokenizer on the training documents")
            lines = document_lines(items.train, TOKENIZER_LINES)
            train_sentencepiece(lines, out / "tokenizer.tmp", model_cfg.vocab_size).rename(out / "tokenizer.model")
            (out / "tokenizer.tmp.vocab").unlink(missing_ok=True)
        tuning = Tuning.from_config(cfg)
        if tuning.lora is not None:
            lora.save_run_config(out, tuning.lora, cfg.init_from)
    print(f"configuration (saved to {out / 'train_config.toml'}):\n{cfg.to_toml()}", end="")
    hosts.barrier("run directory written")
    return Run(out, model_cfg, tokenizer_in(out), items, init)


def classifier_pad_id(tokenizer: Tokenizer) -> int:
    """The pad token of a reward model in HF's LlamaForSequenceClassification, which reads the score
    at the last token that is not it: the tokenizer's pad token, else <unk>, else the last id; never
    a token that ends a sequence."""
    try:
        unk = tokenizer.special("<unk>")
    except TokenizerError:
        unk = -1
    ends = (*tokenizer.stop_ids, tokenizer.eos_id, tokenizer.bos_id)
    return next(i for i in (tokenizer.pad_id, unk, tokenizer.vocab_size - 1) if i >= 0 and i not in ends)


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class Checkpoints:
    """The run's Orbax CheckpointManager. Saves are asynchronous and each is reported on stdout
    once complete; a step directory only appears complete (Orbax renames a temporary directory),
    and temporary directories left by a killed save are deleted when the next run starts.

    `item` names what state.params is saved as: "params", or "adapters" (LoRA). With `parts` (an
    RL run), state.params is a dict and each of its parts is its own item: {"policy": "params",
    "value": "value"}, so that the policy reads as any run's weights."""

    def __init__(self, run_dir: Path, keep: int, item: str = "params", parts: dict[str, str] | None = None):
        self.parts = parts or {"": item}  # key of state.params ("": all of it) -> item name
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
        )
        self.mngr = ocp.CheckpointManager(run_dir / "checkpoints", options=options)
        self.pending: int | None = None  # a step being saved, not yet reported

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, state: TrainState, data_iter: batches.Streams, rng: jax.Array) -> None:
        self.report(wait=True)
        self.pending = step = int(state.step)
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                **{item: ocp.args.StandardSave(self._part(state.params, key)) for key, item in self.parts.items()},
                opt_state=ocp.args.StandardSave(state.opt_state),
                # Every process's streams, serialised now: the iterators go on while Orbax writes.
                data=ocp.args.JsonSave(hosts.gather_json(data_iter.get_state())),
                meta=ocp.args.JsonSave({"step": step, "rng": jax.random.key_data(rng).tolist()}),
            ),
        )

    def restore(self, step: int, abstract: TrainState, data_iter: batches.Streams) -> TrainState:
        """The train state of `step`; `data_iter`'s streams are moved to where they were then."""
        parts = {item: ocp.args.StandardRestore(self._part(abstract.params, key)) for key, item in self.parts.items()}
        parts |= {"opt_state": ocp.args.StandardRestore(abstract.opt_state), "data": ocp.args.JsonRestore()}
        restored = self.mngr.restore(step, args=ocp.args.Composite(**parts))
        data_iter.set_state(restored.data)
        params = {key: restored[item] for key, item in self.parts.items()}
        params = params.get("", params)
        return TrainState(sharding.put(np.int32(step), abstract.step.sharding), params, restored.opt_state)

    @staticmethod
    def _part(params, key: str):
        return params if key == "" else params[key]

    def report(self, wait: bool) -> None:
        """Print "checkpoint saved: step N" once the pending save is complete (`wait`: block)."""
        if self.pending is not None and (wait or not self.mngr.is_saving_in_progress()):
            self.mngr.wait_until_finished()
            print(f"checkpoint saved: step {self.pending}", flush=True)
            self.pending = None

    def close(self) -> None:
        self.report(wait=True)
        self.mngr.close()


def start_state(
    step: TrainStep, tuning: Tuning, checkpoints: Checkpoints, data_iter: batches.Streams, init: Source | None, rng
) -> tuple[TrainState, int]:
    """(the state to train from, its step): the latest checkpoint restored straight into this run's
    shardings (whatever mesh saved it), else the --init-from weights, else random weights or fresh
    LoRA adapters created already sharded; plus the frozen inputs (LoRA base, DPO reference)."""
    start = checkpoints.latest_step() or 0
    sh = shardings_of(step.state)
    start_params = None  # the --init-from weights: where training starts, or the LoRA base / DPO reference
    if init and (not start or step.state.frozen is not None):
        start_params = read_checkpoint(init, np.float32 if tuning.lora is None else step.model.dtype).params
        start_params = with_head(start_params, step.model.cfg, jax.random.fold_in(rng, 1))
    if start:
        state = checkpoints.restore(start, step.state, data_iter)
        print(f"resumed from the checkpoint at step {start}")
    elif init and tuning.lora is None:
        params = sharding.put(start_params, sh.params)
        opt_state = jax.jit(step.optimizer.init, out_shardings=sh.opt_state)(params)
        state = TrainState(sharding.put(np.int32(0), sh.step), params, opt_state)
        print(f"starting from the weights of {init.path}")
    else:
        init_fn = partial(init_state, step.model.cfg, step.optimizer, lora_cfg=tuning.lora)
        state = jax.jit(init_fn, out_shardings=sh.replace(frozen=None))(rng)
        if tuning.lora is not None and "score" in state.params:  # the head of --init-from (or drawn for it)
            head = jax.tree.map(lambda x: x.astype(np.float32), start_params["score"])
            state = state.replace(params={**state.params, "score": sharding.put(head, sh.params["score"])})
    if sh.frozen is not None:  # the LoRA base as loaded; a DPO reference as a copy in the compute dtype
        fixed = start_params if tuning.lora else jax.tree.map(lambda x: x.astype(step.model.dtype), start_params)
        state = state.replace(frozen=sharding.put(tuning.frozen(fixed), sh.frozen))
        if tuning.lora is not None:
            print(f"training rank-{tuning.lora.rank} LoRA adapters of {', '.join(tuning.lora.targets)}")
    return state, start


class MetricsLog:
    """metrics.jsonl lines and TensorBoard scalars. Lines past `start_step` (left by a run that
    was killed after its last checkpoint) are dropped, and TensorBoard purges those steps."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0  # one process writes for the run
        if not self.enabled:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            self.path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= start_step))
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for name, value in values.items():
            if isinstance(value, float):  # not the token count and the batch checksum
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


class Preemption:
    """Remembers a SIGTERM so the loop can save the current step and exit cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def sample(cfg: TrainConfig, run: Run) -> None:
    """A sample from the run's last checkpoint, loaded as infer.py loads it; a chat reply after sft/dpo
    (a reward model generates nothing)."""
    if cfg.stage == "reward":
        return
    lm = load(str(run.out), cfg.dtype, str(run.tokenizer), need_tokenizer=True)
    tokenizer = lm.tokenizer
    chat = cfg.stage != "pretrain"
    prompt = tokenizer.encode(cfg.sample_prompt, bos=True)
    if chat:
        prompt = encode_dialog(tokenizer, [{"role": "user", "content": cfg.sample_prompt}])
    sample_len = min(cfg.sample_tokens, run.model_cfg.max_seq_len - len(prompt))
    completion = generate(lm.model, lm.params, [prompt], sample_len, Sampling(), tokenizer.stop_ids, cfg.seed)[0]
    text = tokenizer.decode(prompt[1:] + completion.tokens)
    if chat:
        text = f"{cfg.sample_prompt}\n> {tokenizer.decode(completion.tokens)}"
    print(f"sample from the checkpoint at step {cfg.steps}:\n{text}")
