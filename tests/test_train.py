"""The loss, the train step and the optimizer, in process on the tiny presets."""

import dataclasses
import importlib.util
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.config import ConfigError, flops_per_token, get_preset
from llama_jax.loss import output_kernel, token_losses, weighted_loss
from llama_jax.model import Llama, build_model, init_params
from llama_jax.optim import decay_mask, lr_schedule, make_optimizer
from llama_jax.step import init_state, loss_sums, make_eval_step, make_train_step
from llama_jax.train_config import TrainConfig, build_parser, parse_args

CFG = get_preset("tiny-llama2")
init = jax.jit(init_params, static_argnums=0)


def reference_losses(hidden, kernel, targets):
    logits = jnp.einsum("btd,dv->btv", hidden, kernel)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk", [4, 5, 16, 64])
def test_chunked_loss_and_gradient_match_full_logits(chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (2, 16, 8))
    kernel = jax.random.normal(k2, (8, 50))
    targets = jax.random.randint(k3, (2, 16), 0, 50)
    xent, log_z = jax.jit(token_losses, static_argnums=3)(hidden, kernel, targets, chunk)
    np.testing.assert_allclose(xent, reference_losses(hidden, kernel, targets), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_z, jax.nn.logsumexp(hidden @ kernel, axis=-1), rtol=1e-5)
    weights = jax.random.uniform(k3, (2, 16))  # a weighted cross-entropy plus a z-loss reach both outputs

    def objective(losses):
        return lambda h, k: jnp.sum(weights * losses(h, k)[0]) + 0.3 * jnp.sum(weights * losses(h, k)[1] ** 2)

    ours = objective(lambda h, k: token_losses(h, k, targets, chunk))
    full = objective(lambda h, k: (reference_losses(h, k, targets), jax.nn.logsumexp(h @ k, axis=-1)))
    expected = jax.grad(full, argnums=(0, 1))(hidden, kernel)
    # weighted_loss: the same objective, its gradient made in the forward pass.
    fused = partial(weighted_loss, targets=targets, weights=weights, z_loss=0.3, chunk=chunk)
    np.testing.assert_allclose(jax.jit(fused)(hidden, kernel)[0], full(hidden, kernel), rtol=1e-6)
    for grad_fn in (jax.grad(ours, argnums=(0, 1)), jax.grad(lambda h, k: fused(h, k)[0], argnums=(0, 1))):
        for got, want in zip(jax.jit(grad_fn)(hidden, kernel), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_weighted_loss_gradients_of_its_outputs():
    """Scaled cotangents scale the gradient; without a z-loss the cross-entropy output is the
    objective; with one, differentiating it is an error, not a wrong gradient; a frozen
    projection gets no gradient work."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    hidden, kernel = jax.random.normal(k1, (2, 8, 4)), jax.random.normal(k2, (4, 30))
    targets, weights = jax.random.randint(k3, (2, 8), 0, 30), jnp.ones((2, 8))
    loss = partial(weighted_loss, targets=targets, weights=weights, chunk=4)
    plain = jax.grad(lambda h: loss(h, kernel, z_loss=0.0)[0])(hidden)
    np.testing.assert_allclose(jax.grad(lambda h: 3 * loss(h, kernel, z_loss=0.0)[0])(hidden), 3 * plain, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda h: loss(h, kernel, z_loss=0.0)[1])(hidden), plain, rtol=1e-6)
    with pytest.raises(TypeError, match="with a z-loss, differentiate the objective"):
        jax.grad(lambda h: loss(h, kernel, z_loss=0.1)[1])(hidden)
    frozen = jax.grad(lambda h: loss(h, jax.lax.stop_gradient(kernel), z_loss=0.0)[0])
    np.testing.assert_allclose(jax.jit(frozen)(hidden), plain, rtol=1e-6)
    trained = jax.grad(lambda h, k: loss(h, k, z_loss=0.0)[0], argnums=(0, 1))
    matmuls = (
        str(jax.make_jaxpr(f)(*args)).count("dot_general")
        for f, args in ((trained, (hidden, kernel)), (frozen, (hidden,)))
    )
    assert tuple(matmuls) == (3, 2)  # logits, d_hidden (, d_kernel)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_is_the_models_cross_entropy(tied):
    cfg = CFG.replace(tie_embeddings=tied)
    model = Llama(cfg)
    params = init(cfg, jax.random.key(1))
    assert output_kernel(cfg, params).shape == (cfg.dim, cfg.vocab_size)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    batch = batch_of(tokens, np.ones((2, 12), np.int32))
    objective, (xent_sum, count) = jax.jit(partial(loss_sums, model, loss_chunk=5, z_loss=1e-2))(params, batch)
    logits, _ = jax.jit(model.apply)({"params": params}, tokens)
    expected = reference_losses(logits, jnp.eye(cfg.vocab_size), batch["targets"])
    assert count == 24
    np.testing.assert_allclose(xent_sum, expected.sum(), rtol=1e-5)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(objective, expected.sum() + 1e-2 * (log_z**2).sum(), rtol=1e-5)


def batch_of(tokens, segment_ids, loss_mask=None):
    """A packed batch whose targets are the next token of the same segment."""
    tokens, segment_ids = np.asarray(tokens, np.int32), np.asarray(segment_ids, np.int32)
    positions = np.zeros_like(tokens)
    for row in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            same = segment_ids[row, t] == segment_ids[row, t - 1]
            positions[row, t] = positions[row, t - 1] + 1 if same else 0
    targets = (tokens * 7 + 3) % CFG.vocab_size  # any fixed targets will do
    mask = (segment_ids > 0).astype(np.int32) if loss_mask is None else np.asarray(loss_mask, np.int32)
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": segment_ids, "loss_mask": mask}


def test_packing_a_tokens_loss_and_gradient_ignore_other_documents():
    """Document A packed before B or before C, or alone after padding: A's per-token losses
    and the gradient of A's loss are the same; so are B's, alone or after A."""
    model = Llama(CFG)
    params = init(CFG, jax.random.key(3))
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, CFG.vocab_size, n) for n in (9, 7, 7))
    rows = [np.concatenate([a, b]), np.concatenate([a, c]), np.concatenate([np.zeros(7, int), a])]
    segments = [[1] * 9 + [2] * 7, [1] * 9 + [2] * 7, [0] * 7 + [1] * 9]
    in_a = np.array([[1] * 9 + [0] * 7, [1] * 9 + [0] * 7, [0] * 7 + [1] * 9])
    batch = batch_of(rows, segments)

    @jax.jit
    def token_loss(rows):
        hidden, _ = model.apply(
            {"params": params}, rows["tokens"], positions=rows["positions"], segment_ids=rows["segment_ids"],
            return_hidden=True,
        )  # fmt: skip
        return token_losses(hidden, output_kernel(CFG, params), rows["targets"], 16)[0]

    losses = token_loss(batch)
    np.testing.assert_allclose(losses[0, :9], losses[1, :9], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses[0, :9], losses[2, 7:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(losses[0, 9:], losses[1, 9:])  # B and C do differ
    b_alone = token_loss(batch_of([np.concatenate([b, np.zeros(9, int)])], [[1] * 7 + [0] * 9]))
    np.testing.assert_allclose(losses[0, 9:], b_alone[0, :7], rtol=1e-5, atol=1e-5)

    @jax.jit
    def a_loss_grad(one_row):
        return jax.grad(lambda p: loss_sums(model, p, one_row, loss_chunk=16)[0])(params)

    grads = [
        a_loss_grad({**{k: v[r : r + 1] for k, v in batch.items()}, "loss_mask": in_a[r : r + 1]}) for r in range(3)
    ]
    for other in grads[1:]:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grads[0], other)


def train_setup(**step_kwargs):
    schedule = lr_schedule(1e-3, 2, 10, 0.1)
    optimizer = make_optimizer(schedule)
    state = jax.jit(init_state, static_argnums=(0, 1))(CFG, optimizer, jax.random.key(0))
    return state, make_train_step(Llama(CFG), optimizer, schedule, loss_chunk=8, **step_kwargs)


@pytest.fixture(scope="module")
def tiny_step():
    state, step = train_setup()
    return state, step, jax.jit(step)


def random_batch(seed, rows=4, length=16):
    rng = np.random.default_rng(seed)
    segments = np.repeat(rng.integers(1, 3, (rows, 1)), length, 1)
    segments[:, length // 2 :] += 1  # two documents per row
    segments[0, -3:] = 0  # and some padding
    return batch_of(rng.integers(0, CFG.vocab_size, (rows, length)), segments)


def test_gradient_accumulation_matches_the_whole_batch(tiny_step):
    batch = random_batch(0)
    state, _, step = tiny_step
    state_accum, step_accum = train_setup(grad_accum=2)
    step_accum = jax.jit(step_accum)
    for _ in range(2):
        state, metrics = step(state, batch)
        state_accum, metrics_accum = step_accum(state_accum, batch)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], metrics_accum[key], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), state.params, state_accum.params)


def test_train_step_is_pure_and_compiles_with_given_shardings(tiny_step):
    """The step takes shardings from outside: here every array on one device."""
    state, step, jitted_step = tiny_step
    batch = random_batch(1)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state_shardings = jax.tree.map(lambda _: sharding, state)
    batch_shardings = jax.tree.map(lambda _: sharding, batch)
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, sharding))
    new_state, metrics = jitted(state, batch)
    again, metrics_again = jitted_step(state, batch)
    assert int(new_state.step) == 1 and set(metrics) == {"loss", "grad_norm", "lr"}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), (new_state, metrics), (again, metrics_again))
    assert float(metrics["lr"]) == 0.0  # warmup starts at 0
    assert float(jitted_step(new_state, batch)[1]["lr"]) == pytest.approx(5e-4)


def test_training_lowers_the_loss_and_eval_step_agrees(tiny_step):
    state, _, step = tiny_step
    batch = random_batch(2)
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5
    sums = jax.jit(make_eval_step(Llama(CFG), 8))(state.params, None, batch)
    assert sums["count"] == batch["loss_mask"].sum()
    assert float(sums["loss"] / sums["count"]) < losses[-1]


def test_schedule_warmup_and_cosine_to_a_tenth():
    schedule = lr_schedule(3e-4, 100, 1000, 0.1)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(1.5e-4)
    assert float(schedule(100)) == pytest.approx(3e-4)
    assert float(schedule(550)) == pytest.approx((3e-4 + 3e-5) / 2)
    assert float(schedule(1000)) == pytest.approx(3e-5)


def test_weight_decay_skips_norms_and_embeddings():
    params = init(CFG, jax.random.key(0))
    mask = decay_mask(params, TrainConfig().no_decay)
    assert mask["tok_embeddings"]["embedding"] is False and mask["norm"]["scale"] is False
    assert mask["layers"]["attention_norm"]["scale"] is False and mask["layers"]["ffn_norm"]["scale"] is False
    assert mask["output"]["kernel"] is True and mask["layers"]["attention"]["wq"]["kernel"] is True
    # Decay shrinks a decayed weight with a zero gradient and leaves an excluded one alone.
    opt = make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, clip_norm=0.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(updates["output"]["kernel"], -0.05 * params["output"]["kernel"], rtol=1e-6)
    assert not np.any(updates["norm"]["scale"])


def test_master_weights_and_optimizer_state_stay_float32_with_bfloat16_compute():
    model = Llama(CFG, dtype=jnp.bfloat16)
    schedule = lr_schedule(1e-3, 0, 10, 0.1)
    optimizer = make_optimizer(schedule)
    state = jax.jit(init_state, static_argnums=(0, 1))(CFG, optimizer, jax.random.key(0))
    state, metrics = jax.jit(make_train_step(model, optimizer, schedule))(state, random_batch(3))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    assert {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"]))


def test_config_toml_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 50\nlr = 1\nno_decay = ["norm"]\nout = "x"\n')
    cfg = parse_args(["--config", str(toml), "--steps", "7", "--batch-size", "4"])
    assert (cfg.steps, cfg.lr, cfg.no_decay, cfg.out, cfg.batch_size) == (7, 1.0, ("norm",), "x", 4)
    (tmp_path / "saved.toml").write_text(cfg.to_toml())
    assert parse_args(["--config", str(tmp_path / "saved.toml")]) == cfg
    assert parse_args(["--no-decay", "a,b"]).no_decay == ("a", "b")


@pytest.mark.parametrize(
    "toml, message",
    [
        ("steps = ", "not valid TOML"),
        ("stepz = 3", "unknown keys stepz"),
        ('steps = "3"', "steps must be of type int"),
        ("steps = 0", "steps must be positive"),
        ('model = "llama9"', "unknown model preset"),
        ('stage = "sft"', "needs --data"),
        ("batch_size = 6\ngrad_accum = 4", "not divisible"),
    ],
)
def test_bad_configuration(tmp_path, toml, message):
    (tmp_path / "bad.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(tmp_path / "bad.toml")])


def test_help_lists_every_option_with_its_default():
    text = build_parser().format_help()
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in text
    for flag in ("--model", "--data", "--tokenizer", "--out", "--steps", "--batch-size", "--seq-len", "--lr"):
        assert flag in text
    for flag in ("--save-every", "--log-every", "--eval-every", "--seed", "--stage", "--init-from"):
        assert flag in text
    assert text.count("(default:") == len(dataclasses.fields(TrainConfig))


def test_layer_loop_is_unrolled_on_gpus_without_remat_by_default():
    cfg = get_preset("llama3.2-1b")  # 16 layers
    unroll = lambda setting, remat, backend: build_model(cfg, "auto", "xla", remat, setting, backend).scan_unroll
    assert [unroll(0, "none", backend) for backend in ("gpu", "tpu", "cpu")] == [16, 1, 1]
    assert unroll(0, "full", "gpu") == 1
    assert (unroll(4, "full", "tpu"), unroll(99, "none", "gpu")) == (4, 16)


def test_auto_settings_follow_the_backend():
    cfg = get_preset("tiny")
    resolved = {b: build_model(cfg, backend=b) for b in ("cpu", "gpu", "tpu")}
    assert [(jnp.dtype(m.dtype).name, m.attention_impl) for m in resolved.values()] == [
        ("float32", "xla"),
        ("bfloat16", "cudnn"),
        ("bfloat16", "splash"),
    ]
    assert build_model(cfg, "float32", backend="gpu").attention_impl == "xla"  # cuDNN takes 16-bit inputs


def test_model_flops_count_what_each_stage_computes():
    """6N + causal attention for full training; LoRA skips the weight gradients (4N); DPO adds the
    reference's forward pass (2N and a third of the attention)."""
    cfg, t = get_preset("llama3.2-1b"), 4096
    n = cfg.num_params  # tied embeddings: the output projection is the only use that costs FLOPs
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t
    assert flops_per_token(cfg, t) == 6 * n + attention
    assert flops_per_token(cfg, t, weight_grads=False) == 4 * n + attention
    assert flops_per_token(cfg, t, extra_forwards=1) == 8 * n + attention * 4 / 3
    untied = get_preset("llama3-8b")  # the input embedding is a lookup, not a matmul
    assert flops_per_token(untied, 1) == 6 * (untied.num_params - untied.vocab_size * untied.dim) + 6 * 32 * 32 * 128


def test_tokamax_attention_without_tokamax_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'llama-jax\[cuda\]'"):
        build_model(get_preset("tiny"), "bfloat16", "tokamax")
