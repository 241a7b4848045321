import base64
import inspect
import json
import textwrap

import pytest
import sentencepiece as spm
import tiktoken
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, pre_tokenizers, trainers

from llama_jax.tokenizer import (
    LLAMA3_PATTERN,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    llama3_special_tokens,
    load_tokenizer,
    split_long_runs,
    train_sentencepiece,
)

TEXTS = [
    "Hello, world!",
    "naïve café — Zürich, 東京, Ελληνικά",
    "12345 + 67890 = 80235; pi=3.14159",
    "emoji 🦙🎉 need byte fallback",
    "  leading,   inner   runs\n\n\ttabs\tand trailing   ",
    "<s> </s> <unk> <|eot_id|> [INST] look like special tokens",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]
CORPUS = inspect.getsource(textwrap).splitlines() + ["naïve café Zürich 東京 Ελληνικά 2024"] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(iter(CORPUS), tmp_path_factory.mktemp("sp") / "tokenizer", vocab_size=600)


def test_sentencepiece_matches_library_and_round_trips(sp_model):
    tok = load_tokenizer(sp_model)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, -1, (2,))
    assert (tok.vocab_size, tok.chat_format) == (600, "llama2")
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi", bos=True, eos=True) == [1, *ref.encode("hi"), 2]


def test_trained_sentencepiece_has_llama2_layout(sp_model):
    tok = load_tokenizer(sp_model.parent)  # the directory holding tokenizer.model
    pieces = [tok.sp.id_to_piece(i) for i in range(259)]
    assert pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert pieces[3:] == [f"<0x{b:02X}>" for b in range(256)]
    assert [tok.sp.id_to_piece(i) for i in tok.encode("2024")] == ["▁", "2", "0", "2", "4"]
    indent = [tok.sp.id_to_piece(i) for i in tok.encode("        return")]
    assert any(len(piece) > 1 and set(piece) == {"▁"} for piece in indent)  # whitespace-only pieces
    assert all(3 <= i < 259 for i in tok.encode("🦙")[1:])  # after the dummy-prefix "▁"
    assert 1 not in tok.encode("<s>") and 2 not in tok.encode("</s>")
    assert tok.special("</s>") == 2
    with pytest.raises(TokenizerError, match="no token"):
        tok.special("<|eot_id|>")


def byte_level_ranks(words: list[bytes]) -> dict[bytes, int]:
    """The 256 single bytes, then every prefix of each word: a tiny but valid BPE rank table."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in words:
        for end in range(2, len(word) + 1):
            ranks.setdefault(word[:end], len(ranks))
    return ranks


def write_tiktoken_file(path, ranks: dict[bytes, int]):
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))
    return path


RANKS = byte_level_ranks([b" the", b"the", b"ing", b" and", b"<|", b"|>", b"eot", b"_id", b"  ", b"    ", b"123"])


def test_tiktoken_file_gets_llama3_specials_at_meta_ids(tmp_path):
    tok = load_tokenizer(write_tiktoken_file(tmp_path / "tokenizer.model", RANKS))
    n = len(RANKS)
    assert isinstance(tok, TiktokenTokenizer) and tok.chat_format == "llama3"
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_1|>": 3,
        "<|finetune_right_pad_id|>": 4,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|eom_id|>": 8,
        "<|eot_id|>": 9,
        "<|python_tag|>": 10,
        "<|reserved_special_token_2|>": 11,
        "<|reserved_special_token_246|>": 255,
    }
    assert {name: tok.special(name) - n for name in expected} == expected
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 4)
    assert set(tok.stop_ids) == {n + 1, n + 8, n + 9}
    assert tok.vocab_size == n + 256
    assert len(set(llama3_special_tokens(n).values())) == 256


def test_tiktoken_matches_tiktoken_encoding_and_keeps_special_text_plain(tmp_path):
    tok = load_tokenizer(write_tiktoken_file(tmp_path / "tokenizer.model", RANKS))
    specials = llama3_special_tokens(len(RANKS))
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=RANKS, special_tokens=specials)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, allowed_special=set(), disallowed_special=())
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|eot_id|>")
    assert all(i < len(RANKS) for i in ids) and tok.decode(ids) == "<|eot_id|>"
    assert tok.encode("the", bos=True, eos=True) == [tok.bos_id, RANKS[b"the"], tok.eos_id]


def meta_split(s: str, max_len: int) -> list[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`, verbatim but for names."""
    out, run_len, run_is_space, start = [], 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        if run_is_space ^ ch.isspace():
            run_len, run_is_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_len:
                out.append(s[start:i])
                start, run_len = i, 1
    return [*out, s[start:]]


@pytest.mark.parametrize("text", ["", "a", "   ", "abcdefg hi" + "\u3000\x1c" * 4 + "x", "x" * 17 + " " * 9])
def test_split_long_runs_matches_meta(text):
    assert split_long_runs(text, 3) == meta_split(text, 3)


def test_long_runs_encode_in_chunks(tmp_path):
    tok = load_tokenizer(write_tiktoken_file(tmp_path / "tokenizer.model", RANKS))
    text = " " * 60_001 + "the" * 30_000
    assert tok.decode(tok.encode(text)) == text


def hf_tokenizer_json(special_tokens: list[str]) -> HFBackend:
    hf = HFBackend(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(CORPUS, trainer)
    return hf


def test_hf_tokenizer_json_fallback(tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    hf = hf_tokenizer_json(specials)
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.chat_format == "llama3"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 4, -1)
    assert set(tok.stop_ids) == {1, 4}
    assert tok.special("<|start_header_id|>") == 2
    hf.encode_special_tokens = True  # the plain library, told to leave special-token text alone
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    assert not set(tok.encode("<|eot_id|><|begin_of_text|>")) & {0, 1, 2, 3, 4}


def test_hf_without_config_uses_llama2_names(tmp_path):
    hf_tokenizer_json(["<unk>", "<s>", "</s>"]).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.chat_format) == (1, 2, (2,), "llama2")
    assert tok.encode("a", bos=True, eos=True)[::2] == [1, 2]


def test_hf_without_bos_has_no_chat_format(tmp_path):
    hf_tokenizer_json([]).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.chat_format) == (-1, -1, (), None)
    with pytest.raises(TokenizerError, match="no BOS"):
        tok.encode("a", bos=True)


def test_missing_and_unreadable_tokenizers(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match=f"no tokenizer.model or tokenizer.json in directory {tmp_path}"):
        load_tokenizer(tmp_path)
    for content in (b"", b"hello world\n", b"\x00\x01\x02garbage"):
        (tmp_path / "tokenizer.model").write_bytes(content)
        with pytest.raises(TokenizerError, match="not a SentencePiece model, a tiktoken BPE file"):
            load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)


def test_malformed_tiktoken_files(tmp_path):
    gap = {**RANKS, b"zz": len(RANKS) + 5}
    with pytest.raises(TokenizerError, match="ranks are not"):
        load_tokenizer(write_tiktoken_file(tmp_path / "gap.model", gap))
    no_bytes = {token: rank - 1 for token, rank in RANKS.items() if token != b"\x00"}
    with pytest.raises(TokenizerError, match="single-byte"):
        load_tokenizer(write_tiktoken_file(tmp_path / "no_bytes.model", no_bytes))
