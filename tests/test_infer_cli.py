"""infer.py end to end: generate/chat/score outputs and every bad input as one `error:` line."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax import infer
from llama_jax.config import LlamaConfig
from llama_jax.convert import Checkpoint, save_checkpoint
from llama_jax.model import init_params
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
CFG = LlamaConfig(64, 2, 4, 2, vocab_size=320, ffn_dim=176, max_seq_len=64, family="llama2")
TEXT = "The quick brown fox jumps over the lazy dog 12345.\nPack my box with five dozen liquor jugs!\n" * 50


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT)
    small = Path(train_sentencepiece([root / "corpus.txt"], str(root / "small"), vocab_size=300))
    big = Path(train_sentencepiece([root / "corpus.txt"], str(root / "big"), vocab_size=400))
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    out = {}
    for name, tok in [("model", small), ("bigvocab", big), ("notok", None)]:
        save_checkpoint(Checkpoint(CFG, params, [], "orbax"), root / name, "orbax")
        if tok:
            (root / name / "tokenizer.model").write_bytes(tok.read_bytes())
        out[name] = root / name
    out["root"] = root
    return out


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(("WARNING", "E0000", "W0000"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_generate_json_stream_and_defaults(dirs):
    model = str(dirs["model"])
    common = ["generate", "--checkpoint", model, "--max-new-tokens", "10", "--temperature", "0"]
    js = run(*common, "--prompt", "The quick", "--prompt", "Pack my box with", "--json")
    assert js.returncode == 0, js.stderr
    rows = [json.loads(x) for x in js.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["The quick", "Pack my box with"]
    tok = load_tokenizer(dirs["model"])
    for r in rows:
        assert set(r) == {"prompt", "completion", "completion_tokens", "finish_reason"}
        assert r["finish_reason"] in ("stop", "length") and len(r["completion_tokens"]) <= 10
        assert r["completion"] == tok.decode(r["completion_tokens"])
        assert all(t < tok.vocab_size for t in r["completion_tokens"])
    streamed = run(*common, "--prompt", "The quick", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == rows[0]["completion"] + "\n"


def test_chat_keeps_history_and_prompt_file_messages(dirs, tmp_path):
    proc = run("chat", "--checkpoint", str(dirs["model"]), "--max-new-tokens", "4", "--temperature", "0",
               stdin="hello there\nand again\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") == 3  # two turns answered, then EOF at the third prompt
    # The second turn is conditioned on the first: same as a two-turn messages prompt.
    replies = [x.split("> ", 1)[-1] for x in proc.stdout.split("\n") if x][:2]
    tok = load_tokenizer(dirs["model"])
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "and again"}]  # fmt: skip
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": messages}) + "\n")
    gen = run("generate", "--checkpoint", str(dirs["model"]), "--prompt-file", str(prompts), "--json",
              "--max-new-tokens", "4", "--temperature", "0")  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert tok.decode(json.loads(gen.stdout)["completion_tokens"]) == replies[1]


def test_truncate_left_fits_long_prompts(dirs):
    long = "The quick brown fox jumps over the lazy dog. " * 20  # > 64 tokens
    proc = run("generate", "--checkpoint", str(dirs["model"]), "--prompt", long, "--max-new-tokens", "8",
               "--truncate", "left", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["completion_tokens"]) <= 8


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--top-p", "0"], ["top_p must be in (0, 1]"]),
        (["--top-p", "1.5"], ["top_p must be in (0, 1]"]),
        (["--temperature", "-0.1"], ["temperature must be >= 0"]),
        (["--top-k", "-3"], ["top_k must be >= 0"]),
        (["--prompt", "The quick brown fox jumps over the lazy dog. " * 20], ["does not fit the context of 64"]),
    ],
)
def test_generate_bad_input(dirs, args, fragments):
    base = ["generate", "--checkpoint", str(dirs["model"])]
    if "--prompt" not in args:
        base += ["--prompt", "hi"]
    assert_one_error_line(run(*base, *args), *fragments)


def test_tokenizer_larger_than_embedding_names_both_sizes(dirs):
    proc = run("generate", "--checkpoint", str(dirs["bigvocab"]), "--prompt", "hi")
    assert_one_error_line(proc, "tokenizer vocabulary (400)", "embedding (320)")


def test_no_tokenizer_says_where_it_looked(dirs):
    proc = run("generate", "--checkpoint", str(dirs["notok"]), "--prompt", "hi")
    assert_one_error_line(proc, "no tokenizer found", str(dirs["notok"]))


def test_score_outputs_and_bad_lines(dirs, tmp_path):
    good = tmp_path / "in.jsonl"
    good.write_text(json.dumps({"tokens": [1, 5, 7, 9]}) + "\n" + json.dumps({"text": "The quick brown fox"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert infer.main(["score", "--checkpoint", str(dirs["model"]), "--input", str(good), "--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    tok = load_tokenizer(dirs["model"])
    assert rows[0]["tokens"] == [1, 5, 7, 9] and len(rows[0]["logprobs"]) == 3
    assert rows[1]["tokens"] == tok.encode("The quick brown fox", bos=True)
    for r in rows:
        assert len(r["logprobs"]) == len(r["tokens"]) - 1 and all(x <= 0 for x in r["logprobs"])
        assert r["sum_logprob"] == pytest.approx(sum(r["logprobs"]), abs=1e-4)
    for content, fragment in [
        ('{"tokens": [1, 2]}\nnot json\n', ":2: not valid JSON"),
        ('{"tokens": [1, 999]}\n', ":1: token 999 is outside the vocabulary [0, 320)"),
        ('{"words": "x"}\n', ":1: expected"),
        (json.dumps({"tokens": list(range(1, 70))}) + "\n", ":1: 69 tokens exceed the context of 64"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        dst = tmp_path / "never.jsonl"
        proc = run("score", "--checkpoint", str(dirs["model"]), "--input", str(bad), "--output", str(dst))
        assert_one_error_line(proc, fragment)
        assert not dst.exists()
