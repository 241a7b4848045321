"""`infer.py serve` end to end, through the real `openai` client and raw HTTP on 127.0.0.1:
outputs equal `infer.py generate`, continuous batching under load and disconnects, the prefix
cache, and every bad input's status code and OpenAI error object."""

import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from serving_helpers import Server, make_checkpoint

from llama_jax import infer
from llama_jax.config import LlamaConfig, get_preset
from llama_jax.serving import detokenizer
from llama_jax.serving.engine import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
CFG = LlamaConfig(64, 2, 4, 2, vocab_size=320, ffn_dim=176, max_seq_len=128, family="llama2")
# One decoding-row bucket and one page-table bucket: 4 forward programs to compile.
ENGINE = EngineConfig(max_num_seqs=8, page_size=16, prefill_chunk=64, max_prefill_seqs=4, max_queue=64, min_rows=8,
                      min_pages=8)  # fmt: skip
PROMPTS = [
    "The quick brown",
    "Pack my box with five dozen",
    "fox",
    "The lazy dog 12345. Pack my box with five dozen liquor jugs! The quick brown fox jumps",
    "jugs! é ü",
    "dozen liquor",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"), CFG)


@pytest.fixture(scope="module")
def server(checkpoint):
    with Server(checkpoint, ENGINE, api_key="sekret") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="sekret", max_retries=0)


def generate_cli(checkpoint, prompts, capsys, *extra: str) -> list[dict]:
    args = ["generate", "--checkpoint", str(checkpoint), "--json", "--max-new-tokens", "20", *extra]
    for p in prompts:
        args += ["--prompt", p]
    capsys.readouterr()
    assert infer.main(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_greedy_equals_generate_whatever_the_concurrency_and_order(server, client, checkpoint, capsys):
    expected = generate_cli(checkpoint, PROMPTS, capsys, "--temperature", "0")
    assert len({r["completion"] for r in expected}) == len(PROMPTS)
    rng = random.Random(0)
    for concurrency in (1, 3, len(PROMPTS)):
        order = list(range(len(PROMPTS)))
        rng.shuffle(order)
        got: dict[int, object] = {}

        def one(i: int, got=got) -> None:
            got[i] = client.completions.create(
                model="tiny", prompt=PROMPTS[i], max_tokens=20, temperature=0, logprobs=0
            )

        for start in range(0, len(order), concurrency):
            threads = [threading.Thread(target=one, args=(i,)) for i in order[start : start + concurrency]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for i, r in enumerate(expected):
            choice = got[i].choices[0]
            assert choice.text == r["completion"], (concurrency, i)
            assert got[i].usage.completion_tokens == len(r["completion_tokens"])
            assert choice.logprobs.tokens == [server.lm.tokenizer.decode([t]) for t in r["completion_tokens"]]
            assert choice.finish_reason == r["finish_reason"]


def test_streaming_equals_non_streaming_completions_and_chat(client, server, checkpoint, capsys):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    pieces = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))  # fmt: skip
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    # The chat prompt is the model's Llama 2 format: the same as `infer.py generate` of these messages.
    path = checkpoint.parent / "messages.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    capsys.readouterr()
    assert infer.main(["generate", "--checkpoint", str(checkpoint), "--prompt-file", str(path), "--json",
                       "--max-new-tokens", "16", "--temperature", "0"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["completion"] == chat.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_seeded_sample_alone_or_among_31_others(client):
    kw = dict(model="tiny", max_tokens=16, temperature=0.9, top_p=0.8)
    alone = client.completions.create(prompt=PROMPTS[0], seed=1234, **kw).choices[0].text
    results: dict[int, str] = {}

    def one(i: int) -> None:
        prompt, seed = (PROMPTS[0], 1234) if i == 13 else (PROMPTS[i % len(PROMPTS)], i)
        results[i] = client.completions.create(prompt=prompt, seed=seed, **kw).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[13] == alone
    assert len(set(results.values())) > 16  # the others really are sampled
    again = client.completions.create(prompt=PROMPTS[0], seed=99, **kw).choices[0].text
    assert again != alone
    n = client.completions.create(prompt=PROMPTS[0], seed=1234, n=3, **kw)
    assert n.choices[0].text == alone and len({c.text for c in n.choices}) == 3


def test_bad_requests_get_their_status_and_openai_error(server):
    good = {"model": "tiny", "prompt": "The quick", "max_tokens": 4}
    cases = [
        (b'{"prompt": "The quick", "max_tokens": ', 400, None),  # malformed JSON
        (good | {"max_tokens": "four"}, 400, "max_tokens"),
        (good | {"temperature": "hot"}, 400, "temperature"),
        (good | {"temperature": -0.5}, 400, "temperature"),
        (good | {"top_p": 0}, 400, "top_p"),
        (good | {"top_p": 1.5}, 400, "top_p"),
        (good | {"max_tokens": 125}, 400, "max_tokens"),  # prompt + max_tokens > 128
        (good | {"prompt": [1, 2, 99999]}, 400, "prompt"),
        (good | {"logprobs": 9}, 400, "logprobs"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]},
            400,
            "messages",
        ),  # fmt: skip
    ]
    for body, status, param in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        code, reply = server.raw("POST", path, body)
        assert code == status, (body, code, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
        assert reply["error"]["param"] == param, (body, reply)
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        code, reply = server.raw("POST", "/v1/completions", good, headers)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
    assert server.raw("GET", "/health", headers={"Authorization": ""})[0] == 200  # health needs no key
    assert server.raw("POST", "/v1/completions", good)[0] == 200  # and the server keeps serving


def test_an_internal_error_fails_that_request_only(server, client, monkeypatch):
    add = detokenizer.Detokenizer.add

    def failing(self, token):
        if "FAIL" in self.stop:
            raise RuntimeError("injected")
        return add(self, token)

    monkeypatch.setattr(detokenizer.Detokenizer, "add", failing)
    results = {}

    def one(i: int) -> None:
        try:
            stop = ["FAIL"] if i == 2 else None
            results[i] = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12, temperature=0,
                                                   stop=stop, extra_body={"ignore_eos": True})  # fmt: skip
        except openai.InternalServerError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[2], openai.InternalServerError) and results[2].status_code == 500
    assert "injected" in results[2].body["message"]
    assert all(results[i].usage.completion_tokens == 12 for i in (0, 1, 3))
    assert server.wait_idle()["pages_in_use"] == 0


def test_full_queue_is_429_at_once(checkpoint):
    one_slot = dataclasses.replace(ENGINE, max_num_seqs=1, max_queue=1, num_pages=65)  # ENGINE's programs
    with Server(checkpoint, one_slot) as s:
        body = {"model": "tiny", "prompt": "The quick", "max_tokens": 60, "stream": True}
        clients = [openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0) for _ in range(2)]
        first = clients[0].completions.create(**body, extra_body={"ignore_eos": True})  # running
        next(iter(first))
        second = clients[1].completions.create(**body, extra_body={"ignore_eos": True})  # waiting
        code, reply = s.raw("POST", "/v1/completions", body | {"ignore_eos": True})
        assert code == 429 and reply["error"]["code"] == "queue_full"
        first.close()
        second.close()
        stats = s.wait_idle()
        assert stats["pages_in_use"] == 0


def test_prefix_cache_prefills_a_shared_system_prompt_once(tmp_path_factory, capsys):
    cfg = CFG.replace(max_seq_len=512)
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("prefix"), cfg)
    engine = EngineConfig(
        max_num_seqs=16, page_size=16, prefill_chunk=128, max_prefill_seqs=4, min_rows=16, min_pages=32
    )
    rng = random.Random(1)
    system = [1] + [rng.randrange(3, 300) for _ in range(255)]  # 256 tokens: 16 whole pages
    prompts = [system + [rng.randrange(3, 300) for _ in range(3 + i % 5)] for i in range(16)]
    with Server(checkpoint, engine) as s:
        client = openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0)

        async def run():
            calls = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0) for p in prompts]
            return await asyncio.gather(*calls)

        replies = asyncio.run(run())
        m = s.metrics()
        own = sum(len(p) - 256 for p in prompts)
        assert m["llama_jax_prompt_tokens_total"] == 16 * 256 + own
        assert m["llama_jax_prefill_tokens_total"] == 256 + own  # the system prompt once
        assert m["llama_jax_prefix_cache_hits_total"] == 15 * 256
        assert m["llama_jax_prefix_cache_hit_rate"] == pytest.approx(15 * 256 / (16 * 256 + own))
    lm = s.lm
    from llama_jax.generate import Sampling, generate

    uncached = generate(lm.model, lm.params, prompts, 8, Sampling(0.0, vocab_limit=lm.tokenizer.vocab_size),
                        lm.tokenizer.stop_ids)  # fmt: skip
    assert [r.choices[0].text for r in replies] == [lm.tokenizer.decode(c.tokens) for c in uncached]


@pytest.mark.parametrize("disconnect", [False, True])
def test_64_streaming_clients_mixed_lengths(tmp_path_factory, disconnect):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("tiny"), get_preset("tiny"), scale=1.0)
    engine = EngineConfig(
        max_num_seqs=32, page_size=16, prefill_chunk=128, max_prefill_seqs=4, max_queue=64, min_rows=32, min_pages=16
    )
    rng = random.Random(2)
    words = "the quick brown fox jumps over the lazy dog pack my box with five dozen liquor jugs".split()
    jobs = [(" ".join(rng.choices(words, k=rng.randrange(1, 40))), rng.randrange(1, 32)) for _ in range(64)]
    with Server(checkpoint, engine) as s:
        client = openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0)

        async def one(i: int, prompt: str, max_tokens: int):
            stream = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=1.0, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                if disconnect and i % 2 and len(chunks) == max_tokens // 2 + 1:
                    await stream.close()  # the client goes away mid-stream
                    return None
            return chunks

        async def run():
            return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs)))

        results = asyncio.run(run())
        stats = s.wait_idle()
        for (_, max_tokens), chunks in zip(jobs, results, strict=True):
            if chunks is None:
                continue
            assert chunks[-1].usage.completion_tokens == max_tokens
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert sum(r is None for r in results) == (32 if disconnect else 0)
        assert stats["pages_in_use"] == 0 and stats["references"] == 0 and stats["pages_pending"] == 0
        assert stats["pages_free"] + stats["pages_cached"] == stats["pages_total"]
        assert stats["hashed_pages"] == stats["pages_cached"]
        s.engine.pool.check()
        m = s.metrics()
        assert m["llama_jax_kv_pages_used"] == 0 and m["llama_jax_requests_running"] == 0
        finished = sum(v for k, v in m.items() if k.startswith("llama_jax_requests_finished_total"))
        assert finished == 64
        if disconnect:
            assert m['llama_jax_requests_finished_total{reason="cancelled"}'] >= 1


def test_sigterm_drains_running_requests_then_exits_0_without_torch(checkpoint):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "infer.py"), "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--max-num-seqs", "4", "--prefill-chunk", "64", "--drain-timeout", "120"]  # fmt: skip
    # As a user runs it: one CPU device, and torch and transformers hidden (tests/no_torch).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = f"{ROOT / 'tests' / 'no_torch'}{os.pathsep}{ROOT}"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.5)
        stream = client.completions.create(
            model=str(checkpoint), prompt="The quick", max_tokens=40, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(openai.APIConnectionError):  # no longer accepting
            client.models.list()
        rest = list(chunks)  # the running request finishes
        assert rest[-1].usage.completion_tokens == 40 and first.choices
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_compile_only_serve_step_for_a_tpu_topology(capsys):
    argv = ["serve", "--compile-only", "--model", "tiny-llama3", "--topology", "v5e-8", "--sharding", "fsdp_tp",
            "--max-num-seqs", "8", "--prefill-chunk", "64"]  # fmt: skip
    assert infer.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| serve", "| sample"))]
    assert len(rows) == 3 and all("| v5e:2x4 | 8 |" in r and "| yes |" in r for r in rows), out
    assert "4 kv heads" in out  # 2 kv heads replicated over the tensor axis of 4
