"""Supervised fine-tuning: chat examples -> packed rows weighted on assistant tokens only; a tiny
model learns a fixed answer through train.py --stage sft; bad data -> one error line naming the
file and line, or a counted skip."""

import itertools
import json
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import batches
from llama_jax.chat import encode_dialog, encode_dialog_with_mask
from llama_jax.config import LlamaConfig
from llama_jax.convert import Checkpoint, load_checkpoint, save_checkpoint
from llama_jax.errors import run_cli
from llama_jax.examples import read_examples
from llama_jax.generate import Sampling, generate
from llama_jax.loss import output_kernel, token_losses
from llama_jax.model import Llama, init_params
from llama_jax.step import Tuning, objective
from llama_jax.tokenizer import TiktokenTokenizer, load_tokenizer, train_sentencepiece
from llama_jax.training import main

CFG = LlamaConfig(64, 2, 4, 2, vocab_size=320, ffn_dim=176, max_seq_len=128, family="llama2")
WORDS = "apple river stone cloud green quiet music window paper orange silver forest".split()
ANSWER = "It is 42."


def packed(examples, stage, seq_len, batch_size, seed=0):
    """Training batches of read examples, one data stream."""
    pack = batches.examples_packer(stage, seq_len)
    return batches.train_batches(grain.MapDataset.source(examples), pack, batch_size, seed)


def question(rng) -> str:
    return f"Tell me about {' '.join(rng.choice(WORDS, rng.integers(1, 4)))}."


def dialogs(n: int, seed: int = 0, multi_turn: bool = True) -> list[list[dict]]:
    """Chats, multi-turn ones and some with a system message too; every answer is ANSWER."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": "Be brief."}] if multi_turn and i % 3 == 0 else []
        for _ in range(1 + (multi_turn and i % 4 == 1)):
            turns += [{"role": "user", "content": question(rng)}, {"role": "assistant", "content": ANSWER}]
        out.append(turns)
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A SentencePiece tokenizer (Llama 2 chat format) and a random tiny model that has it."""
    root = tmp_path_factory.mktemp("sft")
    text = [m["content"] for d in dialogs(40) for m in d]
    tokenizer = train_sentencepiece(iter(text * 3 + ["[INST] [/INST] <<SYS>>"] * 5), root / "tok", 300)
    params = jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0)))
    save_checkpoint(Checkpoint(CFG, params, [], "orbax"), root / "base", "orbax")
    shutil.copy(tokenizer, root / "base" / "tokenizer.model")
    return {"root": root, "tokenizer": str(tokenizer), "base": str(root / "base")}


@pytest.mark.parametrize("chat_format", ["llama2", "llama3"])
def test_packed_rows_weight_exactly_the_assistant_tokens(files, tmp_path, chat_format):
    """Each packed example is whole, has its own segment and positions from 0, and its loss weight
    is the chat module's assistant mask, shifted onto the targets; padding weighs nothing."""
    tok = (
        load_tokenizer(files["tokenizer"])
        if chat_format == "llama2"
        else TiktokenTokenizer({bytes([b]): b for b in range(256)})
    )
    chats = dialogs(12)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": d} for d in chats])
    examples, skipped, _ = read_examples([path], "sft", tok, seq_len=200, skip_bad=False)
    assert skipped == 0 and len(examples) == len(chats)
    expected = {tuple(ids[:-1]): (ids[1:], mask[1:]) for ids, mask in (encode_dialog_with_mask(tok, d) for d in chats)}
    seen, packed_rows = 0, 0
    for batch in itertools.islice(packed(examples, "sft", 200, 2), 6):
        for row in range(2):
            segments = batch["segment_ids"][row]
            assert not batch["loss_mask"][row][segments == 0].any()
            packed_rows += len(set(segments[segments > 0])) > 1
            for s in set(segments[segments > 0]):
                at = segments == s
                ids, mask = expected[tuple(batch["tokens"][row][at])]  # a whole example
                np.testing.assert_array_equal(batch["targets"][row][at], ids)
                np.testing.assert_array_equal(batch["loss_mask"][row][at], mask)
                np.testing.assert_array_equal(batch["positions"][row][at], np.arange(at.sum()))
                seen += 1
    assert seen >= len(chats) and packed_rows > 0
    if chat_format == "llama3":  # the weighted targets are exactly the answers and their <|eot_id|>
        ids, mask = encode_dialog_with_mask(tok, chats[0])
        weighted = [i for i, m in zip(ids[1:], mask[1:], strict=True) if m]
        assert tok.decode(weighted) == ANSWER + "<|eot_id|>"


def test_non_assistant_positions_get_zero_gradient(files, tmp_path):
    """Changing every target that is not an assistant token leaves the loss and the gradient
    exactly as they were, and the loss's gradient at those positions is exactly zero."""
    tok = load_tokenizer(files["tokenizer"])
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": d} for d in dialogs(6)])
    examples, _, _ = read_examples([path], "sft", tok, seq_len=128, skip_bad=False)
    batch = {k: jnp.asarray(v) for k, v in next(iter(packed(examples, "sft", 128, 2))).items()}
    mask = batch["loss_mask"]
    assert 0 < int(mask.sum()) < int((batch["segment_ids"] > 0).sum())
    scrambled = {**batch, "targets": jnp.where(mask > 0, batch["targets"], (batch["targets"] * 7 + 11) % 320)}
    assert bool(jnp.any(scrambled["targets"] != batch["targets"]))

    model = Llama(CFG)
    params = load_checkpoint(files["base"]).params
    loss_and_grad = jax.jit(
        jax.value_and_grad(lambda p, b: objective(model, Tuning("sft"), 16, 0.0, p, None, b, None)[0])
    )
    (loss, grads), (loss2, grads2) = loss_and_grad(params, batch), loss_and_grad(params, scrambled)
    assert float(loss) == float(loss2)
    jax.tree.map(np.testing.assert_array_equal, grads, grads2)

    hidden = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True
    )[0]
    weighted_loss = lambda h: jnp.sum(token_losses(h, output_kernel(CFG, params), batch["targets"], 16)[0] * mask)  # noqa: E731
    per_position = jnp.abs(jax.jit(jax.grad(weighted_loss))(hidden)).sum(-1)
    assert not per_position[mask == 0].any() and per_position[mask > 0].all()


USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}
BAD_LINES = {
    "not JSON": ('{"messages": [', "not valid JSON"),
    "unknown role": (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "unknown role 'robot'"),
    "too long": (json.dumps({"messages": [{**USER, "content": "word " * 300}, ASSISTANT]}), "exceed --seq-len 128"),
    "ends with user": (json.dumps({"messages": [USER]}), "the last message must be from 'assistant'"),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_example_is_one_error_line_naming_file_and_line(files, tmp_path, capsys, name):
    good = [{"messages": d} for d in dialogs(4)]
    path = write_jsonl(tmp_path / "chat.jsonl", [*good[:2], BAD_LINES[name][0], *good[2:]])
    args = ["--stage", "sft", "--data", path, "--model", "tiny", "--tokenizer", files["tokenizer"]]
    assert run_cli(main, [*args, "--seq-len", "128", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(path)}:3: [^\n]*{re.escape(BAD_LINES[name][1])}[^\n]*\n", err), err
    assert not (tmp_path / "out").exists()


def test_sft_learns_a_fixed_answer_and_greedy_generation_reproduces_it(files, tmp_path, capsys):
    """train.py --stage sft from a random tiny model, with bad lines skipped and counted: greedy
    answers to new questions are the trained answer."""
    good = [{"messages": d} for d in dialogs(48, seed=1, multi_turn=False)]
    bad = [BAD_LINES[name][0] for name in ("not JSON", "unknown role", "too long")]
    path = write_jsonl(tmp_path / "chat.jsonl", [*good[:10], *bad, *good[10:]])
    run = tmp_path / "run"
    args = [
        "--stage", "sft", "--data", path, "--init-from", files["base"], "--out", str(run), "--skip-bad-examples",
        "--steps", "80", "--seq-len", "128", "--batch-size", "8", "--lr", "5e-3", "--warmup-steps", "5",
        "--eval-every", "0", "--log-every", "1", "--sample-tokens", "0", "--sharding", "single",
    ]  # fmt: skip
    assert run_cli(main, args) == 0
    out = capsys.readouterr().out
    assert f"47 training and 1 held-out sft examples (3 bad ones skipped; the first: {path}:11: not valid JSON" in out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # From about uniform over the 320 tokens (ln 320 = 5.77) to a held-out loss below 0.1 nats per token.
    assert metrics[0]["step"] == 1 and metrics[0]["loss"] > 5.5
    assert metrics[-1]["step"] == 80 and metrics[-1]["eval_loss"] < 0.1

    tok = load_tokenizer(run)
    rng = np.random.default_rng(99)
    prompts = [encode_dialog(tok, [{"role": "user", "content": question(rng)}]) for _ in range(8)]
    ckpt = load_checkpoint(run)
    replies = generate(Llama(ckpt.config), ckpt.params, prompts, 16, Sampling(0.0), tok.stop_ids)
    # (Llama 2's format ends an answer with a space before EOS, as Meta's reference code does.)
    assert [(tok.decode(r.tokens).strip(), r.finish_reason) for r in replies] == [(ANSWER, "stop")] * 8
