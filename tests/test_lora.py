"""LoRA: adapters on the params pytree, their gradients, the optimizer state, and the merged export
of a LoRA run (random tiny HF model -> SFT with LoRA -> HF and Meta -> transformers)."""

import json
import re
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from llama_jax import lora, sharding
from llama_jax.config import get_preset
from llama_jax.convert import load_checkpoint
from llama_jax.convert.cli import main as convert_main
from llama_jax.errors import run_cli
from llama_jax.model import Llama, init_params
from llama_jax.optim import lr_schedule, make_optimizer
from llama_jax.step import (
    BATCH_KEYS,
    TrainState,
    Tuning,
    init_state,
    make_train_step,
    objective,
    shardings_of,
    state_layout,
)
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.training import main

CFG = get_preset("tiny-llama3")  # grouped-query attention: wk/wv narrower than wq
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)))


def random_adapters(lcfg: lora.LoraConfig, seed: int = 1):
    """Adapters with B drawn too, so that they change the model."""
    adapters = lora.init_adapters(CFG, lcfg, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if "lora_b" in str(p) else x,
        adapters,
    )


@partial(jax.jit, static_argnames="lcfg")
def logits(params, adapters=None, rng=None, lcfg=None):
    """The model's logits for TOKENS, with adapters (and dropout keys from rng) when given."""
    with lora.intercept(lcfg):
        tree = params if adapters is None else lora.combine(params, adapters, rng)
        return Llama(CFG).apply({"params": tree}, TOKENS)[0]


def node(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def merged(base, adapters, lcfg: lora.LoraConfig):
    """The base with every adapter merged in, layer by layer, as the converter exports a LoRA run."""
    params = jax.tree.map(np.array, base)
    for target in lcfg.targets:
        kernel, pair = node(params, lora.TARGETS[target]), node(adapters, lora.TARGETS[target])
        a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
        layers = [lora.merge_kernel(k, a[i], b[i], lcfg.scale) for i, k in enumerate(kernel["kernel"])]
        kernel["kernel"] = np.stack(layers)
    return params


@pytest.fixture(scope="module")
def base():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def test_zero_initialised_adapters_leave_the_logits_unchanged(base):
    lcfg = lora.LoraConfig(rank=4, dropout=0.5)
    adapters = lora.init_adapters(CFG, lcfg, jax.random.key(1))
    # With dropout too: 0 * anything is exactly 0.
    np.testing.assert_array_equal(logits(base, adapters, jax.random.key(2), lcfg=lcfg), logits(base))


@pytest.mark.parametrize("targets", [("wq", "wv"), tuple(lora.TARGETS)])
def test_merged_weights_equal_the_adapter_forward(base, targets):
    """float32: the two orders of summation differ by rounding only (logits are O(1))."""
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = random_adapters(lcfg)
    adapted = logits(base, adapters, lcfg=lcfg)
    np.testing.assert_allclose(logits(merged(base, adapters, lcfg)), adapted, atol=1e-5, rtol=0)
    assert float(jnp.abs(adapted - logits(base)).max()) > 0.05  # and the adapters do change the model


def test_dropout_draws_a_mask_per_layer_and_projection(base):
    lcfg = lora.LoraConfig(rank=4, dropout=0.5)
    tree = lora.combine(base, lora.init_adapters(CFG, lcfg, jax.random.key(1)), jax.random.key(2))
    keys = [np.asarray(tree["layers"][m][p]["lora_key"]) for m, p in (("attention", "wq"), ("feed_forward", "w2"))]
    assert keys[0].shape == (CFG.n_layers, 2)
    assert len({tuple(k) for keys_of_target in keys for k in keys_of_target}) == 2 * CFG.n_layers  # all differ
    adapters = random_adapters(lcfg)
    dropped = [logits(base, adapters, jax.random.key(s), lcfg=lcfg) for s in (2, 3)]
    assert not np.allclose(dropped[0], dropped[1])  # the masks change with the key
    assert not np.allclose(dropped[0], logits(base, adapters, lcfg=lcfg))  # and act


def test_only_adapters_are_trained_and_their_gradient_is_the_merged_models(base):
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    model = Llama(CFG)
    schedule = lr_schedule(1e-2, 0, 10, 0.1)
    optimizer = make_optimizer(schedule)
    tuning = Tuning("sft", lcfg)
    state = init_state(CFG, optimizer, jax.random.key(1), lcfg)
    state = state.replace(params=random_adapters(lcfg), frozen=tuning.frozen(base))
    # The optimizer state holds the adapters' moments and scalars, nothing of the base's size.
    leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert {x.shape for x in leaves} == set(lora.adapter_shapes(CFG, lcfg).values())
    assert sum(x.size for x in leaves) == 2 * sum(x.size for x in jax.tree.leaves(state.params))  # Adam's mu, nu

    rng = np.random.default_rng(3)
    batch = {
        "tokens": rng.integers(0, CFG.vocab_size, (2, 16)),
        "targets": rng.integers(0, CFG.vocab_size, (2, 16)),
        "positions": np.tile(np.arange(16), (2, 1)),
        "segment_ids": np.ones((2, 16)),
        "loss_mask": rng.integers(0, 2, (2, 16)),
    }
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}

    def merged_loss(adapters):
        """The mean loss of the merged model, autodiff through the merge."""
        params = jax.tree.map(lambda x: x, base)
        for target in lcfg.targets:
            kernel, pair = node(params, lora.TARGETS[target]), node(adapters, lora.TARGETS[target])
            delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, 1))(pair["lora_a"], pair["lora_b"])
            kernel["kernel"] = kernel["kernel"] + lcfg.scale * delta
        logp = jax.nn.log_softmax(model.apply({"params": params}, batch["tokens"])[0])
        xent = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(xent * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    def adapter_loss(adapters):
        """The mean loss as the train step computes it: x @ A @ B beside the frozen kernels."""
        _, sums = objective(model, tuning, 8, 0.0, adapters, state.frozen, batch, None)
        return sums["loss"] / sums["count"]

    # float32: the same function summed in another order.
    expected, got = jax.jit(jax.grad(merged_loss))(state.params), jax.jit(jax.grad(adapter_loss))(state.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), got, expected)

    new_state, metrics = jax.jit(make_train_step(model, optimizer, schedule, loss_chunk=8, tuning=tuning))(state, batch)
    np.testing.assert_allclose(metrics["loss"], merged_loss(state.params), rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(expected), rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, new_state.frozen, state.frozen)  # the base stays put
    moved = jax.tree.map(lambda x, y: bool(jnp.any(x != y)), new_state.params, state.params)
    assert all(jax.tree.leaves(moved))  # every adapter


# -- end to end --------------------------------------------------------------------------------

WORDS = "apple river stone cloud green quiet music window paper orange silver forest".split()


def chat_data(path, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            question = " ".join(rng.choice(WORDS, rng.integers(1, 4)))
            messages = [{"role": "user", "content": f"Tell me about {question}."}]
            f.write(json.dumps({"messages": [*messages, {"role": "assistant", "content": "It is 42."}]}) + "\n")
    return str(path)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_hf_model_sft_then_export_to_hf_matches_transformers(tmp_path, capsys, make_hf_llama, mode):
    """Random tiny HF model -> (LoRA: converted to Meta first) -> SFT 20 steps -> llama-jax-convert
    to HF and to Meta. transformers' logits of the export equal ours (for LoRA: the adapter forward
    of the run, base + x @ A @ B) within 1e-4 (float32, logits of magnitude ~10)."""
    chat_data(tmp_path / "sft.jsonl", 40)
    lines = [json.loads(line)["messages"][0]["content"] for line in open(tmp_path / "sft.jsonl")]
    tokenizer = train_sentencepiece(iter(lines * 3 + ["It is 42."] * 20), tmp_path / "tok", 300)
    hf = make_hf_llama(seed=3, vocab_size=320)
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(tokenizer, tmp_path / "hf" / "tokenizer.model")
    start = tmp_path / "hf"
    extra = []
    if mode == "lora":
        assert convert_main([str(start), str(tmp_path / "meta"), "--to", "meta"]) == 0
        start, extra = tmp_path / "meta", ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2"]
    run = tmp_path / "run"
    args = [
        "--stage", "sft", "--data", str(tmp_path / "sft.jsonl"), "--init-from", str(start), "--out", str(run),
        "--steps", "20", "--seq-len", "128", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
        "--eval-every", "0", "--log-every", "5", "--sample-tokens", "0", "--sharding", "single", *extra,
    ]  # fmt: skip
    assert run_cli(main, args) == 0
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    step_dir = run / "checkpoints" / "20"
    assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == (
        ["adapters", "data", "meta", "opt_state"] if mode == "lora" else ["data", "meta", "opt_state", "params"]
    )

    assert convert_main([str(run), str(tmp_path / "export_hf"), "--to", "hf"]) == 0
    assert convert_main([str(run), str(tmp_path / "export_meta"), "--to", "meta"]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export_hf").eval()
    tokens = np.random.default_rng(4).integers(0, 320, (2, 24))
    with torch.no_grad():
        theirs = exported(torch.tensor(tokens)).logits.numpy()

    model = Llama(load_checkpoint(run).config)
    if mode == "lora":
        lcfg, base_dir = lora.load_run_config(run)
        assert base_dir == tmp_path / "meta"
        adapters = ocp.StandardCheckpointer().restore(step_dir / "adapters")
        with lora.intercept(lcfg):
            params = lora.combine(load_checkpoint(base_dir).params, adapters)
            ours = model.apply({"params": params}, jnp.asarray(tokens))[0]
    else:
        ours = model.apply({"params": load_checkpoint(run).params}, jnp.asarray(tokens))[0]
    assert np.abs(theirs).max() > 1
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    if mode == "lora":  # training moved the model away from its base
        base_logits = model.apply({"params": load_checkpoint(tmp_path / "meta").params}, jnp.asarray(tokens))[0]
        assert np.abs(np.asarray(ours) - np.asarray(base_logits)).max() > 1e-2
    merged, meta = load_checkpoint(run).params, load_checkpoint(tmp_path / "export_meta").params
    jax.tree.map(np.testing.assert_array_equal, meta, merged)

    if mode == "lora":  # without its base, a LoRA run cannot be read: one error line, nothing written
        shutil.rmtree(tmp_path / "meta")
        capsys.readouterr()
        assert convert_main([str(run), str(tmp_path / "again"), "--to", "hf"]) == 2
        missing = r"error: the base checkpoint of LoRA run \S+, \S+ \(see lora.json\), is missing\n"
        assert re.fullmatch(missing, capsys.readouterr().err)
        assert not (tmp_path / "again").exists()


def test_lora_dpo_step_sharded_over_8_devices_equals_one_device(base):
    """Adapters and their moments sharded like their kernels (fsdp: the embed axis over 8 devices),
    the frozen base like the model: the same step as on one device, up to float32 reduction order."""
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    tuning = Tuning("dpo", lcfg, dpo_beta=0.5, seed=7)
    schedule = lr_schedule(1e-2, 0, 10, 0.1)
    optimizer = make_optimizer(schedule)
    rng = np.random.default_rng(5)
    segments = np.repeat([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 0, 0]], 8, axis=0)
    batch = {
        "tokens": rng.integers(0, CFG.vocab_size, (8, 16)),
        "targets": rng.integers(0, CFG.vocab_size, (8, 16)),
        "positions": np.tile([0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 0], (8, 1)),
        "segment_ids": segments,
        "loss_mask": (segments > 0) * rng.integers(0, 2, (8, 16)),
    }
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    adapters = jax.tree.map(np.asarray, random_adapters(lcfg))
    results = []
    for plan_name in ("single", "fsdp"):
        plan = sharding.load_plan(plan_name)
        mesh = sharding.build_mesh(plan)
        state_sh = shardings_of(state_layout(CFG, optimizer, tuning, plan, mesh, jnp.float32))
        batch_sh = dict.fromkeys(BATCH_KEYS, sharding.batch_sharding(plan, mesh, (8, 16)))
        state = TrainState(np.int32(0), adapters, jax.tree.map(np.asarray, optimizer.init(adapters)))
        state = sharding.put(state.replace(frozen=tuning.frozen(jax.tree.map(np.asarray, base))), state_sh)
        step = jax.jit(
            make_train_step(Llama(CFG), optimizer, schedule, loss_chunk=8, tuning=tuning),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None),
        )
        with sharding.activate(plan, mesh):
            state, metrics = step(state, sharding.put(batch, batch_sh))
        results.append(jax.tree.map(np.asarray, (state.params, metrics)))
        if plan_name == "fsdp":
            assert len(state.params["layers"]["attention"]["wq"]["lora_a"].sharding.device_set) == 8
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), *results)
