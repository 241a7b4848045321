"""Sharding plans on 8 simulated CPU devices (set in conftest), two processes x 4 devices,
and ahead-of-time compilation for a TPU topology."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import infer, sharding
from llama_jax.config import LlamaConfig
from llama_jax.convert import Checkpoint, save_checkpoint
from llama_jax.generate import Sampling, generate
from llama_jax.load import load
from llama_jax.model import init_params
from llama_jax.per_layer import stack_layers
from llama_jax.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
# Every sharded dimension divides 8: heads = kv heads = 8, mlp 176, vocab 320, embed 64.
CFG = LlamaConfig(64, 2, 8, 8, vocab_size=320, ffn_dim=176, max_seq_len=256, family="llama2")
PLANS_ON_8 = ["single", "dp", "fsdp", "fsdp_tp", "tp"]
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 40

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8 simulated devices from conftest")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    tok = train_sentencepiece([corpus], str(root / "tok"), vocab_size=300)
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    save_checkpoint(Checkpoint(CFG, params, [Path(tok)], "orbax"), root / "model", "orbax")
    (root / "model" / Path(tok).name).rename(root / "model" / "tokenizer.model")
    with open(root / "input.jsonl", "w") as f:
        for i, n in enumerate([5, 17, 40, 9, 3]):
            f.write(json.dumps({"tokens": np.random.RandomState(i).randint(0, 320, size=n).tolist()}) + "\n")
    return root


def score_with(root: Path, plan: str, name: str, checkpoint: str = "model") -> list[list[float]]:
    out = root / f"{name}.jsonl"
    assert infer.main(["score", "--checkpoint", str(root / checkpoint), "--input", str(root / "input.jsonl"),
                       "--output", str(out), "--sharding", plan]) == 0  # fmt: skip
    return [json.loads(line)["logprobs"] for line in out.read_text().splitlines()]


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(float(np.max(np.abs(np.subtract(x, y)))) for x, y in zip(a, b, strict=True) if x)


@pytest.fixture(scope="module")
def reference(model_dir) -> list[list[float]]:
    return score_with(model_dir, "single", "single")


@pytest.mark.parametrize("plan", PLANS_ON_8[1:])
def test_infer_score_matches_one_device(model_dir, reference, plan):
    # float32 on CPU: sharded matmuls only reorder sums (observed <= 1e-6).
    assert max_diff(score_with(model_dir, plan, plan), reference) <= 1e-5


EXPECTED = {  # parameter (as loaded for inference: per layer, fused wqkv) -> plan -> mesh axes per dimension
    "layers_0/attention/wqkv/kernel": {
        "dp": P(None, None, None, None), "fsdp": P("fsdp", None, None, None),
        "fsdp_tp": P("fsdp", "tensor", None, None), "tp": P(None, "tensor", None, None),
    },
    "layers_1/feed_forward/w2/kernel": {
        "dp": P(None, None), "fsdp": P(None, "fsdp"), "fsdp_tp": P("tensor", "fsdp"), "tp": P("tensor", None),
    },
    "tok_embeddings/embedding": {
        "dp": P(None, None), "fsdp": P(None, "fsdp"), "fsdp_tp": P("tensor", "fsdp"), "tp": P("tensor", None),
    },
    "norm/scale": {"dp": P(None), "fsdp": P(None), "fsdp_tp": P(None), "tp": P(None)},
}  # fmt: skip


@pytest.mark.parametrize("plan", ["dp", "fsdp", "fsdp_tp", "tp"])
def test_parameters_are_sharded_as_the_plan_says(model_dir, plan):
    lm = load(str(model_dir / "model"), plan=plan)
    for key, by_plan in EXPECTED.items():
        leaf = lm.params
        for part in key.split("/"):
            leaf = leaf[part]
        assert leaf.sharding.spec == by_plan[plan], (key, leaf.sharding.spec)
    total = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    device = jax.devices()[0]
    on_device = sum(
        s.data.nbytes for x in jax.tree.leaves(lm.params) for s in x.addressable_shards if s.device == device
    )
    split = lm.mesh.shape["fsdp"] * lm.mesh.shape["tensor"]
    # Only the norm scales (1.2% of the bytes here) stay replicated.
    assert total / split <= on_device <= total / split * 1.15, (on_device, total, split)


def test_tp_greedy_generation_equals_one_device(model_dir):
    prompts = [[1, 5, 9, 22, 7], [1, 3], [1] + list(range(10, 40))]
    outputs = {}
    for plan in ("single", "tp"):
        lm = load(str(model_dir / "model"), plan=plan)
        with sharding.activate(lm.plan, lm.mesh):
            done = generate(lm.model, lm.params, prompts, 12, Sampling(temperature=0), batch_multiple=lm.batch_multiple)
        outputs[plan] = [c.tokens for c in done]
    assert outputs["tp"] == outputs["single"]
    assert all(len(t) == 12 for t in outputs["tp"])


@pytest.fixture(scope="module")
def gqa_dir(model_dir) -> Path:
    """A model with 2 kv heads (8 query heads) beside the first, with its tokenizer."""
    cfg = CFG.replace(n_kv_heads=2)
    params = jax.tree.map(lambda x: np.asarray(x * 4 if x.ndim > 1 else x), init_params(cfg, jax.random.key(1)))
    save_checkpoint(Checkpoint(cfg, params, [], "orbax"), model_dir / "gqa", "orbax")
    (model_dir / "gqa" / "tokenizer.model").write_bytes((model_dir / "model" / "tokenizer.model").read_bytes())
    return model_dir


@pytest.mark.parametrize("plan,replicas", [("tp", 4), ("fsdp_tp", 2)])
def test_kv_heads_are_replicated_over_a_larger_tensor_axis(gqa_dir, plan, replicas):
    # 2 kv heads on a tensor axis of 8 (tp) or 4 (fsdp_tp): each device holds a copy of one.
    lm = load(str(gqa_dir / "gqa"), plan=plan)
    wqkv = lm.params["layers_0"]["attention"]["wqkv"]["kernel"]  # [embed, kv_heads, group + 2, head_dim]
    assert lm.cfg.n_kv_heads == 2 * replicas and wqkv.shape[1:3] == (2 * replicas, 8 // (2 * replicas) + 2)
    assert wqkv.sharding.spec[1] == "tensor"
    reference = score_with(gqa_dir, "single", "gqa-single", "gqa")
    assert max_diff(score_with(gqa_dir, plan, f"gqa-{plan}", "gqa"), reference) <= 1e-5


def test_tp_generation_and_serving_with_2_kv_heads_equal_one_device(gqa_dir):
    from llama_jax.serving.engine import Engine, EngineConfig, Finish, Output
    from llama_jax.serving.scheduler import Sequence

    prompts = [[1, 5, 9, 22, 7], [1, 3], [1] + list(range(10, 40))]
    outputs = {}
    for plan in ("single", "tp"):
        lm = load(str(gqa_dir / "gqa"), plan=plan)
        greedy = Sampling(temperature=0, vocab_limit=lm.tokenizer.vocab_size)
        with sharding.activate(lm.plan, lm.mesh):
            done = generate(lm.model, lm.params, prompts, 12, greedy, batch_multiple=lm.batch_multiple)
        outputs[plan] = [c.tokens for c in done]
    assert outputs["tp"] == outputs["single"] and all(len(t) == 12 for t in outputs["tp"])
    # The engine under tp: page pools split over the (replicated) kv heads.
    config = EngineConfig(max_num_seqs=4, page_size=8, prefill_chunk=16, min_rows=4, min_pages=8)
    engine = Engine(
        lm.model, lm.params, lm.tokenizer.vocab_size, config, pool_sharding=sharding.pool_sharding(lm.plan, lm.mesh),
        context=lambda: sharding.activate(lm.plan, lm.mesh),
    )  # fmt: skip
    assert engine.k.sharding.spec[1] == "tensor"  # [layers, kv_heads, pages, page_size, head_dim]
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished = threading.Semaphore(0)

    def collect(i: int):
        def emit(event):
            tokens[i].extend(getattr(event, "tokens", []))
            if isinstance(event, Finish):
                finished.release()

        return emit

    engine.start()
    try:
        engine.submit([Sequence(p, 12, owner=Output(lm.tokenizer, collect(i), 12)) for i, p in enumerate(prompts)])
        assert all(finished.acquire(timeout=300) for _ in prompts)
    finally:
        engine.stop()
    assert [tokens[i] for i in range(len(prompts))] == outputs["single"]


def test_checkpoint_saved_under_fsdp_restores_under_tp_and_one_device(model_dir, reference):
    import orbax.checkpoint as ocp

    lm = load(str(model_dir / "model"), plan="fsdp")
    saved = model_dir / "fsdp-saved"
    saved.mkdir()
    (saved / "config.json").write_text((model_dir / "model" / "config.json").read_text())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((saved / "params").absolute(), stack_layers(lm.params))  # the canonical layout
    checkpointer.wait_until_finished()
    assert lm.params["layers_0"]["attention"]["wqkv"]["kernel"].sharding.spec == P("fsdp", None, None, None)
    for plan in ("tp", "single"):
        restored = load(str(saved), plan=plan)
        wqkv = restored.params["layers_0"]["attention"]["wqkv"]["kernel"]
        assert wqkv.sharding.spec == (P(None, "tensor", None, None) if plan == "tp" else P(None, None, None, None))
        assert max_diff(score_with(model_dir, plan, f"restored-{plan}", "fsdp-saved"), reference) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(model_dir, reference):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    prompt_file = model_dir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def add", "class Po", "x"]))
    gen_args = ["generate", "--checkpoint", str(model_dir / "model"), "--prompt-file", str(prompt_file), "--json",
                "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "3"]  # fmt: skip

    def launch(args: list[str], plan: str, out: str | None = None) -> list[subprocess.Popen]:
        procs = []
        for pid in range(2):
            extra = ["--output", str(model_dir / f"{out}-{pid}.jsonl")] if out else []
            dist = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "infer.py"), *args, "--sharding", plan, *dist, *extra],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))  # fmt: skip
        return procs

    score_args = ["score", "--checkpoint", str(model_dir / "model"), "--input", str(model_dir / "input.jsonl")]
    procs = launch(score_args, "fsdp", "two-proc")
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    two = [json.loads(line)["logprobs"] for line in (model_dir / "two-proc-0.jsonl").read_text().splitlines()]
    assert not (model_dir / "two-proc-1.jsonl").exists()  # only process 0 writes
    one = score_with(model_dir, "fsdp", "one-proc-fsdp")
    assert max_diff(two, one) <= 1e-6 and max_diff(two, reference) <= 1e-5

    port = _free_port()
    procs = launch(gen_args, "tp")
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    json_lines = lambda out: [json.loads(x) for x in out.splitlines() if x.startswith("{")]  # noqa: E731 (gloo logs to stdout)
    assert json_lines(results[1][0]) == []  # only process 0 prints results
    one_proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), *gen_args, "--sharding", "tp"],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one_proc.returncode == 0, one_proc.stderr[-2000:]
    two_lines = json_lines(results[0][0])
    assert len(two_lines) == 3
    assert [x["completion_tokens"] for x in two_lines] == [x["completion_tokens"] for x in json_lines(one_proc.stdout)]


def test_compile_only_for_a_tpu_topology(capsys):
    argv = ["generate", "--compile-only", "--model", "tiny-llama3", "--topology", "v5p:2x2x1", "--sharding", "fsdp",
            "--batch-size", "4", "--prompt-len", "32", "--max-new-tokens", "16"]  # fmt: skip
    assert infer.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| prefill", "| decode"))]
    assert len(rows) == 2 and all("| v5p:2x2x1 | 4 |" in r and "| yes |" in r for r in rows), out


@pytest.mark.parametrize(
    "plan_text,message",
    [
        ('[mesh]\naxes = ["data"]\nshape = [3]\n', "has 3 devices, but there are 8"),
        ('[mesh]\naxes = ["data", "fsdp"]\nshape = [1, -1]\n[params]\nembeddings = "fsdp"\n', "unknown logical axis"),
        ('[mesh]\naxes = ["data"]\nshape = [-1]\n[params]\nembed = "model"\n', "unknown mesh axis 'model'"),
        ("[mesh\naxes = 3", "not valid TOML"),
    ],
)
def test_bad_plans_are_clear_errors(tmp_path, plan_text, message):
    path = tmp_path / "bad.toml"
    path.write_text(plan_text)
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.build_mesh(sharding.load_plan(str(path)))


def test_multislice_plan_without_slices_is_one_error_line(tmp_path, capfd):
    argv = ["score", "--checkpoint", str(tmp_path), "--input", "x", "--sharding", "v5p_multislice"]
    assert infer.main(argv) == 2  # the mesh is built before the checkpoint is read
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "error: plan v5p_multislice spans 2 slices over the data-centre network (dcn = [2, 1, 1]): it needs a "
        "multi-slice TPU pod of 2 slices; these devices are in no slices (cpu devices)"
    ], err


def test_indivisible_dimension_names_parameter_dimension_and_axis():
    # fsdp_tp's tensor axis is 4 on 8 devices; 6 kv heads do not divide by 4.
    cfg = CFG.replace(n_heads=12, n_kv_heads=6, head_dim=16)
    plan = sharding.load_plan("fsdp_tp")
    with pytest.raises(sharding.ShardingError, match=r"parameter layers/attention/wk/kernel: dimension 2 \(6\) "
                       r"is not divisible by mesh axis tensor \(4\)"):  # fmt: skip
        sharding.param_shardings(plan, sharding.build_mesh(plan), cfg)
