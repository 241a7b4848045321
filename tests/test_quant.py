"""Weight-only quantization (quant.py): rounding error bounds, int4 packing, the quantized matmul,
the model's logits, sharding, the quantized Orbax checkpoint and the command lines (float32, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import quant, sharding
from llama_jax.config import ConfigError, LlamaConfig, get_preset
from llama_jax.convert import Checkpoint, save_checkpoint
from llama_jax.convert.cli import main as convert_main
from llama_jax.linear import Linear
from llama_jax.load import load
from llama_jax.model import Llama, init_params, param_logical_axes, param_shapes
from llama_jax.per_layer import unstack_layers
from llama_jax.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
CFG = LlamaConfig(64, 2, 4, 2, vocab_size=320, ffn_dim=176, max_seq_len=64, family="llama2")
# Big enough that the unquantized embedding is a small share of the weights (2%).
WIDE = LlamaConfig(512, 2, 4, 4, vocab_size=320, ffn_dim=1408, max_seq_len=64, family="llama2")


def kernel(shape, seed=0) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32)) * 0.02


@pytest.mark.parametrize(
    "shape, n_in, n_out",
    [((2, 64, 4, 16), 1, 2), ((2, 4, 16, 64), 2, 1), ((176, 64), 1, 1)],  # wq, wo (stacked), w2 (one layer)
)
def test_int8_error_is_at_most_half_a_step_per_output_channel(shape, n_in, n_out):
    w = kernel(shape)
    w[..., 0] = 0.0  # a channel of zeros (in wq: a head_dim column; in w2: an output) gets no NaN scale
    q, scale = quant.quantize_kernel(w, n_in, n_out, "int8")
    assert q.dtype == jnp.int8 and q.shape == w.shape
    assert scale.shape == quant.layout(shape, n_in, n_out, "int8")[2] == (*shape[: -n_in - n_out], *shape[-n_out:])
    in_axes = tuple(range(len(shape) - n_in - n_out, len(shape) - n_out))
    step = np.expand_dims(np.asarray(scale), in_axes)
    err = np.abs(np.asarray(quant.dequantize(q, scale, n_in, n_out, "int8", jnp.float32)) - w)
    assert np.all(err <= step / 2 * (1 + 1e-6))  # 1e-6: float32 rounding of w / scale and q * scale
    assert np.all(np.abs(np.asarray(q)) <= 127)
    # The scale is tight: each nonzero channel's largest weight maps to +-127.
    amax = np.max(np.abs(np.asarray(q)), axis=in_axes)
    assert np.all((amax == 127) | (np.max(np.abs(w), axis=in_axes) == 0))


@pytest.mark.parametrize(
    "shape, n_in, n_out, group",
    [((2, 256, 64), 1, 1, 128), ((2, 4, 64, 32), 2, 1, 64), ((704, 32), 1, 1, 88), ((64, 4, 16), 1, 2, 64)],
)
def test_int4_error_is_at_most_half_a_step_per_group(shape, n_in, n_out, group):
    w = kernel(shape, seed=1)
    q, scale = quant.quantize_kernel(w, n_in, n_out, "int4")
    ax = len(shape) - n_out - 1
    rows = shape[ax]
    assert quant.group_size(rows) == group
    assert q.dtype == jnp.uint8 and q.shape == (*shape[:ax], rows // 2, *shape[ax + 1 :])
    assert scale.shape == (*shape[:ax], rows // group, *shape[ax + 1 :])
    assert (q.shape, scale.shape) == tuple(quant.layout(shape, n_in, n_out, "int4")[i] for i in (0, 2))
    step = np.repeat(np.asarray(scale), group, axis=ax)  # each row's group's scale
    err = np.abs(np.asarray(quant.dequantize(q, scale, n_in, n_out, "int4", jnp.float32)) - w)
    assert np.all(err <= step / 2 * (1 + 1e-6))
    assert np.all(np.abs(np.asarray(quant.unpack_int4(q, ax))) <= 7)


def test_group_size_falls_back_to_a_divisor_then_the_whole_axis():
    assert [quant.group_size(n) for n in (64, 128, 4096, 11008, 14336)] == [64, 128, 128, 128, 128]
    assert [quant.group_size(n) for n in (176, 704, 194)] == [88, 88, 194]  # 194 = 2 x 97: no even divisor


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_int4_packing_round_trips_exactly(axis):
    q = np.asarray(jax.random.randint(jax.random.key(2), (6, 8, 4), -8, 8), np.int8)
    packed = np.asarray(quant.pack_int4(q, axis))
    assert packed.dtype == np.uint8 and packed.shape[axis] == q.shape[axis] // 2
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, axis)), q)
    # Rows 2j and 2j + 1 share byte j, low nibble first (a shard of bytes is a run of whole rows).
    first = np.take(packed, 0, axis=axis)
    np.testing.assert_array_equal(first & 0xF, np.take(q, 0, axis=axis).astype(np.uint8) & 0xF)
    np.testing.assert_array_equal(first >> 4, np.take(q, 1, axis=axis).astype(np.uint8) & 0xF)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_is_the_matmul_with_the_dequantized_kernel(mode):
    x = jax.random.normal(jax.random.key(3), (2, 5, 4, 64))
    layer = Linear((48,), 2, ("heads", "head_dim", "embed"), jnp.float32, jnp.float32, mode)
    params = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
    assert (params["kernel"].dtype, params["scale"].dtype) == (quant.KERNEL_DTYPES[mode], jnp.float32)
    q, scale = quant.quantize_kernel(kernel((4, 64, 48)), 2, 1, mode)
    y = layer.apply({"params": {"kernel": q, "scale": scale}}, x)
    expected = jnp.tensordot(x, quant.dequantize(q, scale, 2, 1, mode, jnp.float32), axes=2)
    # Scaling the product instead of the kernel (int8) only reorders float32 roundings.
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_quantized_params_match_the_model_shapes_dtypes_and_axis_names():
    params = init_params(CFG, jax.random.key(0))
    for mode in ("int8", "int4"):
        qcfg = CFG.replace(quantization=mode)
        quantized = quant.quantize_params(params, CFG, mode)
        shapes = param_shapes(qcfg)
        assert jax.tree.structure(quantized) == jax.tree.structure(shapes)
        for a, b in zip(jax.tree.leaves(quantized), jax.tree.leaves(shapes), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_array_equal(quantized["tok_embeddings"]["embedding"], params["tok_embeddings"]["embedding"])
        axes = param_logical_axes(qcfg)["layers"]["attention"]
        names = ("layers", "embed", "kv_heads", "head_dim")
        assert tuple(axes["wk"]["kernel"]) == names
        assert tuple(axes["wk"]["scale"]) == (names[:1] + names[2:] if mode == "int8" else names)
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_params(quantized, qcfg, "int8")
    with pytest.raises(ConfigError, match="quantization must be one of"):
        quant.quantize_params(params, CFG, "int3")


def test_a_per_layer_layout_quantizes_like_the_stack():
    """Leaves are found by name and their axes counted from the end: a layer without the leading
    `layers` axis gives that layer's slice of the stacked result."""
    params = init_params(CFG, jax.random.key(0))
    stacked = quant.quantize_params(params, CFG, "int4")
    wo = params["layers"]["attention"]["wo"]["kernel"]
    one = quant.quantize_params({"layers_1": {"attention": {"wo": {"kernel": wo[1]}}}}, CFG, "int4")
    for leaf in ("kernel", "scale"):
        got = one["layers_1"]["attention"]["wo"][leaf]
        np.testing.assert_array_equal(got, stacked["layers"]["attention"]["wo"][leaf][1])


@pytest.mark.parametrize("mode, tol", [("int8", 0.02), ("int4", 0.25)])
def test_quantized_model_logits_stay_close(mode, tol):
    """Round-to-nearest leaves a uniform error of RMS step / sqrt(12) per weight: for 64 Gaussian
    inputs (max ~2.4 sigma) that is 0.5% of the weights' RMS at int8 and 10% at int4 (7 levels);
    the logits' relative error is of that order. The bounds are 3-4x the measured 0.6% / 6%; a
    scale applied to the wrong axis or a mis-packed nibble gives errors near 100%."""
    cfg = get_preset("tiny-llama3")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    ref = Llama(cfg).apply({"params": params}, tokens)[0]
    got = Llama(cfg.replace(quantization=mode)).apply({"params": quant.quantize_params(params, cfg, mode)}, tokens)[0]
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) <= tol


def test_int4_scales_split_like_their_rows_or_not_at_all():
    """fsdp over 8 devices splits `embed`: the int4 wq scale of WIDE has 4 groups of its 512 rows,
    too few to split 8 ways, so that axis is replicated while the packed kernel's rows split."""
    plan = sharding.load_plan("fsdp")
    mesh = sharding.build_mesh(plan)
    placed = sharding.param_shardings(plan, mesh, WIDE.replace(quantization="int4"))
    wq = placed["layers"]["attention"]["wq"]
    assert tuple(wq["kernel"].spec) == (None, "fsdp", None, None)  # 256 packed rows, 8 ways
    assert tuple(wq["scale"].spec) == (None, None, None, None)
    int8 = sharding.param_shardings(plan, mesh, WIDE.replace(quantization="int8"))["layers"]["attention"]["wo"]
    assert tuple(int8["scale"].spec) == (None, "fsdp")  # wo's output axis is embed


def test_weight_bytes_against_bfloat16():
    """int8: a byte per weight plus a float32 scale per output channel; int4: half a byte plus a
    float32 scale per 128 weights (0.266). The embedding and norms stay in bfloat16: the whole
    model's ratio is counted from shapes for llama2-7b (embedding 2% of the weights)."""
    for mode, linear, whole in (("int8", 0.503, 0.53), ("int4", 0.3, 0.3)):
        cfg = get_preset("llama2-7b")
        shapes, quantized = param_shapes(cfg), param_shapes(cfg.replace(quantization=mode))
        assert quant.linear_bytes(quantized) / quant.linear_bytes(shapes) <= linear
        assert quant.weight_bytes(quantized) / quant.weight_bytes(shapes) <= whole


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """WIDE as an Orbax checkpoint with a tokenizer, and its int8 conversion by llama-jax-convert."""
    root = tmp_path_factory.mktemp("quant")
    (root / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog.\nPack my box with five jugs!\n" * 50)
    tok = Path(train_sentencepiece([root / "corpus.txt"], str(root / "tok"), vocab_size=300))
    params = jax.tree.map(np.asarray, init_params(WIDE, jax.random.key(0)))
    save_checkpoint(Checkpoint(WIDE, params, [], "orbax"), root / "model", "orbax")
    (root / "model" / "tokenizer.model").write_bytes(tok.read_bytes())
    assert convert_main([str(root / "model"), str(root / "int8"), "--to", "orbax", "--quantize", "int8"]) == 0
    return {"model": root / "model", "int8": root / "int8", "root": root, "params": params}


def test_quantized_orbax_checkpoint_round_trips_bit_exactly(checkpoints):
    """The converter's host quantization, written and restored, equals quantizing the original
    once loaded (the same jitted function): every array compared exactly."""
    saved = load(str(checkpoints["int8"]))
    assert saved.cfg.quantization == "int8"
    on_load = load(str(checkpoints["model"]), quantize="int8")
    expected = unstack_layers(quant.quantize_params(checkpoints["params"], WIDE, "int8"))  # as load() lays it out
    for got in (saved.params, on_load.params):
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Loaded arrays, float leaves counted in bfloat16: kernels (+ scales), then everything. int8
    # kernels: 0.5 plus a float32 scale per 512 input rows (0.4%); the embedding is 2% of WIDE.
    unquantized = load(str(checkpoints["model"])).params
    assert quant.linear_bytes(saved.params) / quant.linear_bytes(unquantized) <= 0.505
    assert quant.weight_bytes(saved.params) / quant.weight_bytes(unquantized) <= 0.53
    int4 = load(str(checkpoints["model"]), quantize="int4").params
    assert quant.weight_bytes(int4) / quant.weight_bytes(unquantized) <= 0.3


def test_quantized_checkpoint_refusals(checkpoints, capsys):
    int8, model = str(checkpoints["int8"]), str(checkpoints["model"])
    with pytest.raises(Exception, match=r"is quantized \(int8\); it cannot be loaded as int4"):
        load(int8, quantize="int4")
    dst = str(checkpoints["root"] / "out")
    cases = [
        ([int8, dst, "--to", "hf"], "is quantized (int8): it cannot be converted"),
        ([int8, dst, "--to", "meta"], "is quantized (int8): it cannot be converted"),
        ([model, dst, "--to", "hf", "--quantize", "int8"], "--quantize writes Orbax checkpoints only"),
    ]
    for argv, message in cases:
        assert convert_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not Path(dst).exists()


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_quantized_and_refusals(checkpoints):
    model, int8 = str(checkpoints["model"]), str(checkpoints["int8"])
    common = ["generate", "--max-new-tokens", "4", "--temperature", "0", "--prompt", "The quick"]
    for checkpoint, flag in ((model, ["--quantize", "int8"]), (int8, []), (model, ["--quantize", "int4"])):
        proc = run("infer.py", *common, "--checkpoint", checkpoint, *flag)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    for args, message in [
        (["infer.py", *common, "--checkpoint", int8, "--quantize", "none"], "is quantized (int8)"),
        (["infer.py", *common, "--checkpoint", model, "--quantize", "int2"], "invalid choice"),
        (["train.py", "--init-from", int8, "--out", str(checkpoints["root"] / "run"), "--steps", "1"], "is quantized"),
    ]:
        proc = run(*args)
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
