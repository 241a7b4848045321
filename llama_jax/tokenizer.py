"""Tokenizers behind one interface: Llama 1/2 SentencePiece, Llama 3 tiktoken BPE and, as a
fallback, a Hugging Face `tokenizer.json`; plus a trainer for Llama-2-style SentencePiece models.

Text that looks like a special token (`<s>`, `<|eot_id|>`) is always encoded as plain text, as
Meta's reference code does: special ids only enter a sequence through `bos`/`eos` or `special()`."""

from __future__ import annotations

import base64
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm
import tiktoken


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or read, or a token it does not have."""


class Tokenizer(ABC):
    """What the rest of the code base uses of a tokenizer.

    `pad_id` is -1 when the vocabulary has none (Llama 1/2). `stop_ids` end generation.
    `chat_format` names the layout `llama_jax.chat` applies: "llama2", "llama3", or None."""

    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]
    vocab_size: int
    chat_format: str | None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        for wanted, token_id, name in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if wanted and token_id < 0:
                raise TokenizerError(f"this tokenizer has no {name} token")
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def special(self, name: str) -> int:
        """The id of a special token by its text, e.g. "<|eot_id|>"."""
        token_id = self._special_id(name)
        if token_id is None:
            raise TokenizerError(f"the tokenizer has no token {name!r}")
        return token_id

    @abstractmethod
    def _special_id(self, name: str) -> int | None: ...

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of every special token (control and unknown pieces, Llama 3's specials, a
        tokenizer.json's added special tokens): those Hugging Face tokenizers match in input text
        and drop when decoding with skip_special_tokens."""


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 `tokenizer.model`: a SentencePiece protobuf."""

    chat_format = "llama2"

    def __init__(self, model_proto: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self.sp.vocab_size() == 0:
            raise ValueError("empty SentencePiece model")
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.vocab_size = self.sp.vocab_size()
        self.stop_ids = (self.eos_id,)

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def _special_id(self, name: str) -> int | None:
        token_id = self.sp.piece_to_id(name)
        return token_id if self.sp.id_to_piece(token_id) == name else None

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        ids = (i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i))
        return {self.sp.id_to_piece(i): i for i in ids}


LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_LLAMA3_SPECIALS = 256
# Meta's llama-models (Llama 3.1) list; the remaining ids are <|reserved_special_token_{2 + i}|>.
# Reserved-token names differ between releases (Llama 3.0 had no pad/eom/python_tag, HF files name
# 128005 a reserved token); the ids of the named tokens do not.
_LLAMA3_NAMED = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
# A vocabulary with these (and BOS) gets the Llama 3 chat format.
_LLAMA3_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Meta's chunking before the tiktoken call: at most 400k characters, and runs of whitespace or
# non-whitespace cut every 25k characters (longer runs make tiktoken very slow or panic).
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, numbered from the number of BPE ranks (128000 in Meta's file)."""
    reserved = (f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_LLAMA3_SPECIALS - len(_LLAMA3_NAMED)))
    return {name: num_base_tokens + i for i, name in enumerate((*_LLAMA3_NAMED, *reserved))}


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> list[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`: cut `text` inside each run of whitespace or
    non-whitespace longer than `max_run`, every `max_run` characters from the run's start.
    Same cuts as Meta's per-character loop, found with a regex (str.isspace == re's \\s)."""
    cuts = [
        cut
        for run in re.finditer(rf"\s{{{max_run + 1},}}|\S{{{max_run + 1},}}", text)
        for cut in range(run.start() + max_run, run.end(), max_run)
    ]
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


class TiktokenTokenizer(Tokenizer):
    """Llama 3 `tokenizer.model`: `base64(token) rank` lines read by tiktoken, Meta's specials."""

    chat_format = "llama3"

    def __init__(self, ranks: dict[bytes, int], name: str = "llama3"):
        self.specials = llama3_special_tokens(len(ranks))
        self.model = tiktoken.Encoding(
            name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.specials
        )
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_id = self.specials["<|end_of_text|>"]
        self.pad_id = self.specials["<|finetune_right_pad_id|>"]
        self.stop_ids = tuple(self.specials[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
        self.vocab_size = len(ranks) + len(self.specials)

    def _encode(self, text: str) -> list[int]:
        return [
            token_id
            for start in range(0, len(text), MAX_ENCODE_CHARS)
            for piece in split_long_runs(text[start : start + MAX_ENCODE_CHARS])
            for token_id in self.model.encode(piece, allowed_special=set(), disallowed_special=())
        ]

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def _special_id(self, name: str) -> int | None:
        return self.specials.get(name)

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.specials)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; BOS/EOS/pad come from tokenizer_config.json or
    special_tokens_map.json beside it, else from the usual Llama token names."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as e:
            raise TokenizerError(f"{path}: reading tokenizer.json needs the `tokenizers` package") from e
        try:
            self.hf = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception
            raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        # Added special tokens typed in the input are tokenized as text, not matched.
        self.hf.encode_special_tokens = True
        names = _hf_special_token_names(path.parent)
        self.bos_id = self._first_id(names.get("bos_token"), "<|begin_of_text|>", "<s>")
        self.eos_id = self._first_id(names.get("eos_token"), "<|end_of_text|>", "</s>")
        self.pad_id = self._first_id(names.get("pad_token"))
        stops = (self.eos_id, *(self._first_id(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")))
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i >= 0))
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        if self.bos_id >= 0 and all(self._first_id(t) >= 0 for t in _LLAMA3_CHAT_TOKENS):
            self.chat_format = "llama3"
        elif self.bos_id >= 0 and self.eos_id >= 0:
            self.chat_format = "llama2"
        else:
            self.chat_format = None

    def _first_id(self, *names: str | None) -> int:
        """The id of the first of `names` in the vocabulary, -1 when none is."""
        ids = (self.hf.token_to_id(n) for n in names if n)
        return next((i for i in ids if i is not None), -1)

    def _encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def _special_id(self, name: str) -> int | None:
        return self.hf.token_to_id(name)

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}


def _hf_special_token_names(directory: Path) -> dict[str, str]:
    """bos/eos/pad token texts from special_tokens_map.json, overridden by tokenizer_config.json."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            config = json.loads((directory / file).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{directory / file}: unreadable ({e})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names


def _read_tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """`base64(token) rank` lines -> ranks; None when `data` is not in that format.

    Parsed here rather than with tiktoken.load, which caches files under a key made from the path."""
    try:
        pairs = [line.split() for line in data.decode("ascii").splitlines() if line.strip()]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in pairs}
    except ValueError:  # also UnicodeDecodeError, binascii.Error and a line that is not two fields
        return None
    return ranks or None


def _load_file(path: Path) -> Tokenizer:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    if data.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    ranks = _read_tiktoken_ranks(data)
    if ranks is not None:
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise TokenizerError(f"{path}: tiktoken BPE ranks are not 0..{len(ranks) - 1}, each once")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise TokenizerError(f"{path}: tiktoken BPE file lacks some of the 256 single-byte tokens")
        return TiktokenTokenizer(ranks, name=path.name)
    try:
        return SentencePieceTokenizer(data)
    except (RuntimeError, ValueError):
        raise TokenizerError(
            f"{path}: not a SentencePiece model, a tiktoken BPE file (`base64(token) rank` lines) "
            "or a Hugging Face tokenizer.json"
        ) from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a tokenizer file, or from a model directory holding tokenizer.model
    (SentencePiece or tiktoken, told apart by content) or else tokenizer.json."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return _load_file(path / name)
        raise TokenizerError(f"no tokenizer.model or tokenizer.json in directory {path}")
    if not path.is_file():
        raise TokenizerError(f"tokenizer path {path} does not exist (expected a tokenizer file or a model directory)")
    return _load_file(path)


def train_sentencepiece(
    source: str | os.PathLike | Iterable[str | os.PathLike] | Iterator[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    max_sentences: int = 1_000_000,
) -> Path:
    """Train a SentencePiece model with Llama 2's trainer settings; returns `{out_prefix}.model`.

    `source` is a text file, a collection of text files, or an iterator of lines (sentences).
    At most `max_sentences` lines, sampled at random, are used, which bounds the training time.
    Settings follow the trainer_spec/normalizer_spec stored in Llama 2's tokenizer.model."""
    if isinstance(source, Iterator):
        inputs = {"sentence_iterator": source}
    else:
        files = [source] if isinstance(source, str | os.PathLike) else list(source)
        inputs = {"input": [os.fspath(f) for f in files]}
    spm.SentencePieceTrainer.train(
        **inputs,
        model_prefix=os.fspath(out_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=4192,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return Path(f"{os.fspath(out_prefix)}.model")
