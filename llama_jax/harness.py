"""lm-evaluation-harness backend `llama-jax`: any checkpoint `infer.py` loads, scored and sampled
by this project's forward, with requests tokenized as lm-eval's Hugging Face backend (`hf`,
lm_eval/models/huggingface.py, 0.4.13) tokenizes them, so both give the same numbers on one model.

Followed from HFLM: BOS per `add_bos_token` (None: the tokenizer's own default, BOS for every
Llama tokenizer; none for text that already starts with the BOS text); special-token texts in the
input read as those tokens, as HF tokenizers do; the context/continuation split of
TemplateLM._encode_pair; a context + continuation longer than max_length + 1 tokens cut on the
left (counted: `truncated` and the results' config); rolling windows from lm-eval's
get_rolling_token_windows + make_disjoint_window; generation contexts cut to max_length -
max_gen_toks, special tokens dropped from the decoded text and the text cut at the first stop
string. Requests with the same model input (one-token answers to one question) share one row,
as HFLM's logits cache does. Generation stops once every row has stopped or met a stop string.

lm-eval 0.4.13 has no plugin discovery: importing this module registers the backend, which
`llama-jax-lm-eval` (lm-eval's own command line, this module imported first) relies on.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  lm-eval's own backends; its registry imports them only while empty
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from llama_jax import sharding
from llama_jax.chat import encode_dialog
from llama_jax.errors import UserError
from llama_jax.generate import Sampling, stream
from llama_jax.load import load
from llama_jax.scoring import score_targets
from llama_jax.tokenizer import HFTokenizer, Tokenizer

log = logging.getLogger(__name__)
SAMPLING_KWARGS = {"do_sample", "temperature", "top_p", "top_k"}


class HFTextCodec:
    """Text <-> token ids as lm-eval's HF backend does it with an HF tokenizer of this vocabulary:
    BOS per `add_bos_token` (None: what the tokenizer does by itself: a tokenizer.json's
    post-processor says, Meta's SentencePiece and tiktoken tokenizers add it), special-token texts
    in the text read as those tokens, special tokens dropped from decoded text."""

    def __init__(self, tok: Tokenizer, add_bos_token: bool | None = None):
        self.tok = tok
        if add_bos_token is None:
            own = tok.hf.encode("a").ids[:1] == [tok.bos_id] if isinstance(tok, HFTokenizer) else True
            add_bos_token = own and tok.bos_id >= 0
        self.add_bos_token = add_bos_token
        self.texts = {i: text for text, i in tok.special_tokens.items()}
        names = sorted(tok.special_tokens, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`, special-token texts read as those tokens; no BOS added."""
        if self.pattern is None:
            return self.tok.encode(text)
        ids: list[int] = []
        for n, part in enumerate(self.pattern.split(text)):  # the odd parts are special-token texts
            ids += [self.tok.special_tokens[part]] if n % 2 else self.tok.encode(part) if part else []
        return ids

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM.tok_encode: text already starting with the BOS text gets no second BOS."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos_text = self.texts.get(self.tok.bos_id)
        if add_special_tokens is None and bos_text and text.startswith(bos_text):
            add = False
        return [self.tok.bos_id] * bool(add and self.tok.bos_id >= 0) + self.encode_text(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without their special tokens (HF's skip_special_tokens)."""
        return self.tok.decode([i for i in ids if i not in self.texts])

    def render(self, ids: Sequence[int]) -> str:
        """The text `encode` reads back as `ids`: special tokens written as their texts."""
        pieces, run = [], []
        for i in ids:
            if i in self.texts:
                pieces += [self.tok.decode(run), self.texts[i]]
                run = []
            else:
                run.append(i)
        return "".join(pieces) + self.tok.decode(run)

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The dialog in the tokenizer's Llama 2 / Llama 3 chat format (llama_jax.chat) as text.
        Without add_generation_prompt the final assistant message is continued (a task's gen_prefix)."""
        messages, prefix = list(messages), ""
        if not add_generation_prompt:
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError("continuing a chat needs a final assistant message")
            prefix = messages.pop()["content"].strip()
            prefix = " " + prefix if self.tok.chat_format == "llama2" else prefix
        return self.render(encode_dialog(self.tok, messages)) + prefix


@register_model("llama-jax")
class LlamaJaxLM(TemplateLM):
    """`--model llama-jax --model_args checkpoint=DIR[,dtype=bfloat16,sharding=fsdp,...]`.

    `pretrained` is accepted for `checkpoint`, as `hf` names it; `device` is ignored (JAX places
    the model as `sharding` says)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        pretrained: str | None = None,
        dtype: str = "auto",
        sharding: str = "single",
        tokenizer: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        seed: int = 0,
        device: str | None = None,
        max_batch_size: int | None = None,
    ):
        super().__init__()
        # lm-eval bootstraps some metrics' stderr in forked processes: a fork of a running JAX
        # process can deadlock; this makes it bootstrap in the process itself.
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        path = checkpoint or pretrained
        if not path:
            raise UserError("the llama-jax backend needs checkpoint=DIR")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"llama-jax: batch_size must be a positive integer, got {batch_size!r}")
        self.checkpoint = str(path)
        self.lm = load(self.checkpoint, dtype, tokenizer, need_tokenizer=True, plan=sharding)
        self.tok: Tokenizer = self.lm.tokenizer
        self.codec = HFTextCodec(self.tok, add_bos_token)
        multiple = self.lm.batch_multiple
        self._batch_size = -(-int(batch_size) // multiple) * multiple
        self._max_length = int(max_length or self.lm.cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.truncated = {"loglikelihood": 0, "generate_until": 0}  # requests cut on the left to fit

    # -- what lm-eval asks of a model ----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:  # fingerprints lm-eval's request cache
        return f"llama-jax-{self.tok.chat_format}-{self.tok.vocab_size}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_format if chat_template else None

    def get_model_info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "dtype": jnp.dtype(self.lm.model.dtype).name,
            "sharding": self.lm.plan.name,
            "max_length": self.max_length,
            "truncated_requests": dict(self.truncated),
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.codec.encode(string, add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.codec.chat(chat_history, add_generation_prompt)

    # -- scoring -------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is greedy) for (key, context ids, continuation ids)."""
        rows: dict[tuple[int, ...], list[int]] = {}  # model input -> the requests it serves
        truncated = 0
        for n, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens (the context holds {self.max_length})")
            whole = [*context, *continuation]
            truncated += len(whole) > self.max_length + 1
            rows.setdefault(tuple(whole[-(self.max_length + 1) : -1]), []).append(n)
        self.truncated["loglikelihood"] += truncated
        order = sorted(rows, key=lambda row: (-len(row), row))  # longest first, as HFLM
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(
            total=len(requests), desc="llama-jax loglikelihood", disable=disable_tqdm or jax.process_index() != 0
        )
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            targets = [np.array([[*row[1:], requests[n][2][-1]] for n in rows[row]], np.int32) for row in chunk]
            with sharding.activate(self.lm.plan, self.lm.mesh):
                scored = score_targets(
                    self.lm.model, self.lm.params, [list(r) for r in chunk], targets, self.batch_size
                )
            for row, (logp, greedy) in zip(chunk, scored, strict=True):
                for k, n in enumerate(rows[row]):
                    width = len(requests[n][2])
                    answer = (float(logp[k, -width:].sum(dtype=np.float64)), bool(greedy[k, -width:].all()))
                    results[n] = answer
                    if requests[n][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[n][0], answer)
                bar.update(len(rows[row]))
        bar.close()
        if truncated:
            log.warning(
                "llama-jax: %d of %d requests cut on the left to %d tokens", truncated, len(requests), self.max_length
            )
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log P over each document, in HFLM's disjoint windows of max_length tokens."""
        windows, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(text)
            for context, predicted in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1),
            ):
                windows.append((None, context, predicted))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += logp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------
    def sampling(self, kwargs: dict) -> Sampling:
        unknown = set(kwargs) - SAMPLING_KWARGS
        if unknown:
            known = ", ".join(sorted(SAMPLING_KWARGS))
            raise ValueError(f"llama-jax: unsupported generation arguments {sorted(unknown)} (known: {known}, until)")
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        return Sampling(temperature, float(kwargs.get("top_p", 1.0)), int(kwargs.get("top_k", 0)), self.tok.vocab_size)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation arguments run together
        for n, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(n)
        bar = tqdm(
            total=len(requests), desc="llama-jax generate_until", disable=disable_tqdm or jax.process_index() != 0
        )
        eos = self.codec.texts.get(self.tok.eos_id)
        for members in groups.values():
            kwargs = dict(normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            sampling = self.sampling(kwargs)
            keep = self.max_length - max_new
            if keep < 1:
                raise ValueError(
                    f"max_gen_toks {max_new} leaves no room for a prompt in the context of {self.max_length}"
                )
            prompts = {n: self.tok_encode(requests[n].args[0]) for n in members}
            self.truncated["generate_until"] += sum(len(p) > keep for p in prompts.values())
            ordered = sorted(members, key=lambda n: -len(prompts[n]))
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start : start + self.batch_size]
                texts = self.generate_batch([prompts[n][-keep:] for n in chunk], max_new, sampling, until)
                for n, text in zip(chunk, texts, strict=True):
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    def generate_batch(self, prompts: list[list[int]], max_new: int, sampling: Sampling, until: list[str]) -> list[str]:
        """Completions of a batch, each cut at its first stop string; decoding ends when every
        row has produced a stop token or a stop string."""
        tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stops = [s for s in until if s]
        with sharding.activate(self.lm.plan, self.lm.mesh):
            steps = stream(
                self.lm.model,
                self.lm.params,
                prompts,
                max_new,
                sampling,
                self.tok.stop_ids,
                self.seed,
                batch_multiple=self.lm.batch_multiple,
            )
            for step in steps:
                for i, token in enumerate(step):
                    if token is None or done[i]:
                        done[i] = True
                        continue
                    tokens[i].append(token)
                    done[i] = any(s in self.codec.decode(tokens[i]) for s in stops)
                if all(done):
                    break
        return [postprocess_generated_text(self.codec.decode(t), until, None) for t in tokens]


def lm_eval_main() -> None:
    """`llama-jax-lm-eval`: lm-eval's command line with the llama-jax backend registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
