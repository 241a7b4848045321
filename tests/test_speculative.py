"""Speculative decoding: greedy gives `generate`'s tokens whatever the draft, sampling follows the
target's distribution (a chi-squared test), stop tokens and max_new, and `infer.py --draft`."""

import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import chi2

from llama_jax import infer, speculative
from llama_jax.config import LlamaConfig
from llama_jax.convert import Checkpoint, save_checkpoint
from llama_jax.generate import Sampling, generate
from llama_jax.model import Llama, init_params
from llama_jax.tokenizer import train_sentencepiece

CFG = LlamaConfig(32, 2, 2, 1, vocab_size=64, ffn_dim=64, max_seq_len=128)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36]]
GREEDY = Sampling(temperature=0.0)
K, MAX_NEW = 3, 20  # with every draft token accepted a round emits K + 1 = 4: 1 + 4 * 5 = 21, the last round cut


@pytest.fixture(scope="module")
def tiny():
    model = Llama(CFG)
    return model, init_params(CFG, jax.random.key(0)), init_params(CFG, jax.random.key(1))


@pytest.fixture(scope="module")
def reference(tiny):
    model, target, _ = tiny
    return generate(model, target, PROMPTS, MAX_NEW, GREEDY)


def test_greedy_with_itself_as_draft_is_generate_and_accepts_everything(tiny, reference):
    model, target, _ = tiny
    out, stats = speculative.generate(model, target, model, target, PROMPTS, MAX_NEW, GREEDY, k=K)
    assert [c.tokens for c in out] == [c.tokens for c in reference]
    assert all(c.finish_reason == "length" and len(c.tokens) == MAX_NEW for c in out)
    assert [(s.rate, s.rounds) for s in stats] == [(1.0, 5)] * len(PROMPTS)  # ceil((20 - 1) / 4) rounds


def test_greedy_with_an_unrelated_draft_is_generate(tiny, reference):
    model, target, unrelated = tiny
    out, stats = speculative.generate(model, target, model, unrelated, PROMPTS, MAX_NEW, GREEDY, k=K)
    assert [c.tokens for c in out] == [c.tokens for c in reference]
    # Two independently drawn models agree on the next token's argmax about 1 time in 64 (the
    # vocabulary); 0.3 leaves room for the runs of repeated tokens small random models fall into.
    assert speculative.total(stats).rate < 0.3


def test_one_row_stops_at_a_stop_token_inside_a_round(tiny, reference):
    model, target, unrelated = tiny
    row = reference[0].tokens
    # the first new token, from the sixth on, that has not come before: it stops the row there
    at = next(i for i in range(5, MAX_NEW) if row[i] not in row[:i])
    for draft in (target, unrelated):  # all accepted: round 2 emits tokens 5-8 and is cut at `at`
        out, _ = speculative.generate(model, target, model, draft, PROMPTS[:1], MAX_NEW, GREEDY, [row[at]], k=K)
        assert out[0].finish_reason == "stop" and out[0].tokens == row[:at]


# -- sampling: a chi-squared goodness-of-fit test on a 10-token vocabulary ---------------------
SMALL = LlamaConfig(32, 1, 2, 1, vocab_size=10, ffn_dim=64, max_seq_len=64)
HOT = Sampling(temperature=0.9, top_p=0.95, top_k=6, vocab_limit=9)  # every filter on
ROWS = 8000


def sharp_params(seed: int) -> dict:
    """Random parameters with the output scaled up: next-token distributions far from uniform."""
    params = init_params(SMALL, jax.random.key(seed))
    return {**params, "output": {"kernel": params["output"]["kernel"] * 5.0}}


def second_and_third(model: Llama, params: dict, prompt: list[int]) -> np.ndarray:
    """The exact distribution [V * V] of new tokens 2 and 3 (the first round decides them), summed
    over token 1, from the model's logits after HOT's processing."""
    v, n = SMALL.vocab_size, len(prompt)
    seqs = jnp.asarray([prompt + [a, b] for a in range(v) for b in range(v)], jnp.int32)
    logits, _ = jax.jit(model.apply)({"params": params}, seqs)
    probs = np.asarray(jax.nn.softmax(speculative.processed(logits, HOT), -1), np.float64).reshape(v, v, n + 2, v)
    first, second, third = probs[0, 0, n - 1], probs[:, 0, n], probs[:, :, n + 1]
    return np.einsum("a,ab,abc->bc", first, second, third).ravel()


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of counts against probabilities: cells expecting < 5 (but > 0) pooled into one
    (the chi-squared approximation needs about 5 a cell); a count where p = 0 rejects outright."""
    if counts[probs == 0].sum():
        return 0.0
    expected = probs * counts.sum()
    big, small = expected >= 5, (expected < 5) & (probs > 0)
    obs, exp = np.append(counts[big], counts[small].sum()), np.append(expected[big], expected[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]  # no pooled cell when none is small
    stat = np.sum((obs - exp) ** 2 / exp)
    return float(chi2.sf(stat, len(obs) - 1))


def test_sampled_tokens_follow_the_target_not_the_draft():
    model, target = Llama(SMALL), sharp_params(0)
    draft = jax.tree.map(lambda t, o: t + 0.7 * (o - t), target, sharp_params(1))  # 70% of the way to another model
    prompt = [1, 2, 3, 4, 5]
    out, stats = speculative.generate(model, target, model, draft, [prompt] * ROWS, 3, HOT, k=2)
    v = SMALL.vocab_size
    counts = np.bincount([c.tokens[1] * v + c.tokens[2] for c in out], minlength=v * v).astype(np.float64)
    # Both branches of the rule ran often: accepted draft tokens and corrections from the residual.
    assert 0.1 < speculative.total(stats).rate < 0.9
    # A sound sampler fails this 1 time in 1000; the seeds are fixed, so the outcome is too.
    assert chi2_pvalue(counts, second_and_third(model, target, prompt)) > 1e-3
    # The negative control: the same counts are far from what the draft alone would sample, even
    # over the cells the draft allows (its distribution renormalised there): a rejection by the statistic.
    alone = second_and_third(model, draft, prompt)
    allowed = alone > 0
    assert chi2_pvalue(counts[allowed], alone[allowed] / alone[allowed].sum()) < 1e-6


# -- infer.py --draft ------------------------------------------------------------------------
TINY = LlamaConfig(64, 2, 4, 2, vocab_size=320, ffn_dim=176, max_seq_len=64, family="llama2")
TEXT = "The quick brown fox jumps over the lazy dog 12345.\nPack my box with five dozen liquor jugs!\n" * 50
OTHER = "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!\n" * 50


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    (root / "a.txt").write_text(TEXT)
    (root / "b.txt").write_text(OTHER)
    tok = Path(train_sentencepiece([root / "a.txt"], str(root / "tok"), vocab_size=300))
    other = Path(train_sentencepiece([root / "b.txt"], str(root / "other"), vocab_size=300))
    wide = TINY.replace(vocab_size=352)
    out = {}
    for name, cfg, seed, tokenizer in [
        ("model", TINY, 0, tok),
        ("draft", TINY, 1, tok),
        ("othertok", TINY, 1, other),
        ("othervocab", wide, 1, tok),
    ]:
        params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))
        save_checkpoint(Checkpoint(cfg, params, [], "orbax"), root / name, "orbax")
        (root / name / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        out[name] = root / name
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = infer.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_with_a_draft_prints_generates_tokens_and_the_acceptance(checkpoints, capsys):
    common = ["generate", "--checkpoint", str(checkpoints["model"]), "--temperature", "0", "--max-new-tokens", "12"]
    common += ["--prompt", "The quick", "--prompt", "Pack my box with", "--json"]
    code, plain, err = cli(capsys, *common)
    assert code == 0, err
    code, spec, err = cli(capsys, *common, "--draft", str(checkpoints["draft"]), "--draft-tokens", "3")
    assert code == 0, err
    rows, spec_rows = [json.loads(x) for x in plain.splitlines()], [json.loads(x) for x in spec.splitlines()]
    assert [r["completion_tokens"] for r in spec_rows] == [r["completion_tokens"] for r in rows]
    assert all(0 <= r["acceptance"] <= 1 for r in spec_rows)
    assert re.search(r"^speculative: acceptance \d\.\d\d \(K=3, \d+ rounds\)$", err, re.M), err


def test_cli_chat_with_a_draft_replies_as_without(checkpoints, capsys, monkeypatch):
    replies = []
    for extra in ([], ["--draft", str(checkpoints["draft"])]):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
        code, out, err = cli(capsys, "chat", "--checkpoint", str(checkpoints["model"]), "--max-new-tokens", "5",
                             "--temperature", "0", *extra)  # fmt: skip
        assert code == 0, err
        replies.append(out)
    assert replies[0] == replies[1] and replies[0].count("> ") == 2


@pytest.mark.parametrize(
    "draft, extra, fragment",
    [
        ("othertok", [], "another tokenizer"),
        ("othervocab", [], "vocabulary (352) differs from the model's (320)"),
        ("draft", ["--draft-tokens", "0"], "--draft-tokens must be at least 1"),
    ],
)
def test_cli_bad_draft_is_one_error_line(checkpoints, capsys, draft, extra, fragment):
    args = ["generate", "--checkpoint", str(checkpoints["model"]), "--prompt", "hi", "--draft", str(checkpoints[draft])]
    code, _, err = cli(capsys, *args, *extra)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
