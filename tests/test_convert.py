"""llama-jax-convert: parity with transformers for each Llama family shape, Meta model-parallel
checkpoints, bit-exact round trips and the handling of bad input.

Parity tolerance: both sides compute in float32 from identical weights; the only differences are
summation order and the RoPE/softmax implementations, worth ~1e-6..1e-5 in a log-probability.
A wrong permutation, scaling or tensor mapping moves them by 1e-1 or more (see make_hf_llama).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from meta_reference import write_meta_reference
from safetensors.numpy import load_file

from llama_jax.config import from_meta_params, get_preset
from llama_jax.convert import detect_format, load_checkpoint, open_checkpoint, save_checkpoint
from llama_jax.convert.cli import main
from llama_jax.convert.layout import stacked_shape, tensors
from llama_jax.model import Llama, param_shapes
from llama_jax.scoring import score

TOL = 1e-4


def llama3_rope(factor: float) -> dict:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }


UNSCALED_3 = {"rope_type": "default", "rope_theta": 5e5}
GQA = dict(num_key_value_heads=2, rms_norm_eps=1e-5)
FAMILIES = {
    "llama1": dict(num_key_value_heads=4, rms_norm_eps=1e-6),
    "llama2-gqa": GQA,
    "llama3": dict(**GQA, rope_parameters=UNSCALED_3),
    "llama3.1": dict(**GQA, rope_parameters=llama3_rope(8.0)),
    "llama3.2": dict(**GQA, rope_parameters=llama3_rope(32.0), tie_word_embeddings=True),
}
# Longer than original_max_position_embeddings (16), so the 3.1-style scaling matters; one length bucket.
SEQUENCES = [list(np.random.default_rng(i).integers(0, 256, n)) for i, n in enumerate((64, 57, 40, 33))]


@pytest.fixture(scope="module")
def hf(tmp_path_factory, make_hf_llama):
    """family -> (transformers model, its save_pretrained directory)."""
    made = {}

    def get(family: str):
        if family not in made:
            model = make_hf_llama(seed=len(made), **FAMILIES[family])
            path = tmp_path_factory.mktemp(family) / "hf"
            model.save_pretrained(path)
            made[family] = model, path
        return made[family]

    return get


def convert(src: Path, dst: Path, *args: str) -> Path:
    assert main([str(src), str(dst), *args]) == 0
    return dst


def assert_scores_match(path: Path, model, hf_logprobs) -> None:
    ck = load_checkpoint(path)
    ours = score(Llama(ck.config), ck.params, SEQUENCES)
    theirs = hf_logprobs(model, SEQUENCES)
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a - b).max() <= TOL
    assert np.std(np.concatenate(theirs)) > 0.5  # far from uniform: the comparison has teeth


def safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def meta_shards(path: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(f, weights_only=True) for f in sorted(path.glob("consolidated.*.pth"))]


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-llama2", "tiny-llama3", "llama3.2-1b"])
def test_layout_matches_model(preset):
    cfg = get_preset(preset)
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))
    assert {"/".join(k.key for k in path): leaf.shape for path, leaf in flat} == {
        t.key: stacked_shape(t, cfg) for t in tensors(cfg)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_orbax_scores_like_transformers(family, hf, hf_logprobs, tmp_path):
    model, path = hf(family)
    assert detect_format(path) == "hf"
    out = convert(path, tmp_path / "orbax", "--to", "orbax")
    assert detect_format(out) == "orbax"
    assert_scores_match(out, model, hf_logprobs)


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2"])
def test_rope_scaling_is_in_effect(family, hf, hf_logprobs):
    """The scaled HF model differs from the same weights without scaling, so parity above means
    that the scaling was applied on our side too."""
    model, _ = hf(family)
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "rope_parameters": UNSCALED_3})
    unscaled = transformers.LlamaForCausalLM(config).eval()
    unscaled.load_state_dict(model.state_dict())
    scaled_logp, unscaled_logp = hf_logprobs(model, SEQUENCES), hf_logprobs(unscaled, SEQUENCES)
    assert max(np.abs(a - b).max() for a, b in zip(scaled_logp, unscaled_logp, strict=True)) > 0.1


@pytest.mark.parametrize(("family", "mp"), [("llama2-gqa", 2), ("llama2-gqa", 4), ("llama3", 4)])
def test_meta_model_parallel_scores_like_transformers(family, mp, hf, hf_logprobs, tmp_path):
    """MP=4 with 2 kv heads: Meta's shards repeat each kv head twice and params.json says 4."""
    model, hf_path = hf(family)
    meta = tmp_path / "meta"
    write_meta_reference(model, meta, mp, family)
    assert detect_format(meta) == "meta"
    reader = open_checkpoint(meta)
    assert reader.config.n_kv_heads == model.config.num_key_value_heads
    assert reader.config.family == ("llama3" if family == "llama3" else "llama2")
    assert_scores_match(convert(meta, tmp_path / "orbax", "--to", "orbax"), model, hf_logprobs)
    # Meta -> HF gives back exactly the original HF tensors.
    back = safetensors_dir(convert(meta, tmp_path / "hf", "--to", "hf"))
    assert back.keys() == safetensors_dir(hf_path).keys()
    assert all(np.array_equal(v, back[k]) for k, v in safetensors_dir(hf_path).items())


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_orbax_hf_round_trip_is_bit_exact(family, hf, tmp_path):
    _, path = hf(family)
    orbax_dir = convert(path, tmp_path / "orbax", "--to", "orbax")
    back = convert(orbax_dir, tmp_path / "hf", "--to", "hf")
    original = safetensors_dir(path)
    assert safetensors_dir(back).keys() == original.keys()
    assert all(np.array_equal(v, safetensors_dir(back)[k]) for k, v in original.items())


def test_in_memory_checkpoint_saves_and_orbax_restores(hf, tmp_path):
    """load_checkpoint -> save_checkpoint works from memory too, and our params/ is a plain
    Orbax checkpoint that orbax's own StandardCheckpointer restores."""
    _, path = hf("llama3.2")
    ck = load_checkpoint(path)
    save_checkpoint(ck, tmp_path / "orbax", "orbax")
    restored = ocp.StandardCheckpointer().restore((tmp_path / "orbax" / "params").absolute())
    assert jax.tree.all(jax.tree.map(np.array_equal, restored, ck.params))
    save_checkpoint(ck, tmp_path / "hf", "hf")
    original, back = safetensors_dir(path), safetensors_dir(tmp_path / "hf")
    assert back.keys() == original.keys() and all(np.array_equal(v, back[k]) for k, v in original.items())


def test_sharded_hf_in_and_out(hf, make_hf_llama, tmp_path):
    model, path = hf("llama2-gqa")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    save_checkpoint(open_checkpoint(sharded), out, "hf", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert all((out / f).exists() for f in index["weight_map"].values())
    original, back = safetensors_dir(path), safetensors_dir(out)
    assert back.keys() == original.keys() and all(np.array_equal(v, back[k]) for k, v in original.items())


@pytest.mark.parametrize(("family", "mp"), [("llama2-gqa", 2), ("llama3", 4)])
def test_meta_orbax_meta_round_trip_is_bit_exact(family, mp, hf, tmp_path):
    model, _ = hf(family)
    meta = tmp_path / "meta"
    write_meta_reference(model, meta, mp, family)
    orbax_dir = convert(meta, tmp_path / "orbax", "--to", "orbax")
    back = convert(orbax_dir, tmp_path / "meta2", "--to", "meta", "--model-parallel", str(mp))
    for a, b in zip(meta_shards(meta), meta_shards(back), strict=True):
        a.pop("rope.freqs")
        assert a.keys() == b.keys()
        assert all(torch.equal(v, b[k]) for k, v in a.items())
    original, written = (json.loads((p / "params.json").read_text()) for p in (meta, back))
    # multiple_of may differ (any value giving the same FFN size will do); the rest is the same.
    assert from_meta_params(written, vocab_size=256) == from_meta_params(original, vocab_size=256)
    assert written["n_kv_heads"] == original["n_kv_heads"]


def test_tied_model_to_meta_carries_output(make_hf_llama, hf_logprobs, tmp_path):
    """Meta's files always have output.weight; for a tied (Llama 3.2) model it is the embedding.
    (Meta's params.json only has the scaling factor: the other RoPE parameters must be Meta's.)"""
    rope = {**llama3_rope(32.0), "original_max_position_embeddings": 8192}
    model = make_hf_llama(**GQA, rope_parameters=rope, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "hf")
    meta = convert(tmp_path / "hf", tmp_path / "meta", "--to", "meta", "--model-parallel", "2")
    shards = meta_shards(meta)
    output, embedding = (torch.cat([s[name] for s in shards]) for name in ("output.weight", "tok_embeddings.weight"))
    assert torch.equal(output, embedding) and torch.equal(embedding, model.model.embed_tokens.weight)
    assert_scores_match(meta, model, hf_logprobs)


@pytest.mark.parametrize("family", ["llama1", "llama3.2"])
def test_orbax_to_hf_loads_in_transformers(family, hf, tmp_path):
    """Same weights, same code: the logits are identical but for float noise from the config
    plumbing (none expected; 1e-6 allowed)."""
    model, path = hf(family)
    back = convert(convert(path, tmp_path / "orbax", "--to", "orbax"), tmp_path / "hf", "--to", "hf")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back).eval()
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    tokens = torch.tensor([SEQUENCES[0]])
    with torch.no_grad():
        assert (reloaded(tokens).logits - model(tokens).logits).abs().max() <= 1e-6
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == reloaded.config.eos_token_id


def test_dtype_bfloat16_round_trip(hf, tmp_path):
    _, path = hf("llama3")
    orbax_dir = convert(path, tmp_path / "orbax", "--to", "orbax", "--dtype", "bfloat16")
    assert load_checkpoint(orbax_dir).params["norm"]["scale"].dtype.name == "bfloat16"
    back = convert(orbax_dir, tmp_path / "hf", "--to", "hf")
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with torch.no_grad():
        expected = {
            k: v.to(torch.bfloat16) for k, v in transformers.LlamaForCausalLM.from_pretrained(path).state_dict().items()
        }
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in expected.items())


def test_tokenizer_files_are_copied(hf, tmp_path):
    _, path = hf("llama3")
    src = tmp_path / "src"
    shutil.copytree(path, src)
    (src / "tokenizer.model").write_text("fake tokenizer\n")
    (src / "tokenizer_config.json").write_text("{}\n")
    out = convert(convert(src, tmp_path / "orbax", "--to", "orbax"), tmp_path / "meta", "--to", "meta")
    assert (out / "tokenizer.model").read_text() == "fake tokenizer\n"
    assert sorted(f.name for f in load_checkpoint(out).tokenizer_files) == ["tokenizer.model", "tokenizer_config.json"]


def test_meta_download_layout_finds_the_shared_tokenizer(hf, tmp_path):
    """Meta's Llama 1/2 downloads keep tokenizer.model beside the model folders, not in them."""
    model, _ = hf("llama2-gqa")
    write_meta_reference(model, tmp_path / "llama-2-7b", 1, "llama2-gqa")
    (tmp_path / "tokenizer.model").write_text("fake tokenizer\n")
    assert open_checkpoint(tmp_path / "llama-2-7b").tokenizer_files == [tmp_path / "tokenizer.model"]
    out = convert(tmp_path / "llama-2-7b", tmp_path / "orbax", "--to", "orbax")
    assert (out / "tokenizer.model").read_text() == "fake tokenizer\n"


def test_train_run_directory_reads_latest_params(hf, tmp_path):
    """config.json + checkpoints/<step>/params from a CheckpointManager; unfinished steps ignored."""
    _, path = hf("llama2-gqa")
    ours = convert(path, tmp_path / "orbax", "--to", "orbax")
    params = load_checkpoint(ours).params
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ours / "config.json", run / "config.json")
    with ocp.CheckpointManager((run / "checkpoints").absolute(), item_names=("params", "opt_state")) as manager:
        for step, scale in ((1, 2.0), (2, 1.0)):
            scaled = jax.tree.map(lambda x, s=scale: jnp.asarray(x) * s, params)  # jax arrays, as train.py has
            items = dict(
                params=ocp.args.StandardSave(scaled), opt_state=ocp.args.StandardSave({"step": np.int32(step)})
            )
            manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-1234").mkdir()
    assert detect_format(run) == "orbax"
    loaded = load_checkpoint(run).params
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))


# -- bad input -----------------------------------------------------------------------------------


class Payload:
    """Not a tensor: unpickling it needs this module, which weights_only refuses."""


def corrupt(case: str, hf, tmp_path: Path) -> tuple[Path, list[str], str]:
    """A bad SRC for `case`, the extra CLI arguments, and a fragment the error must contain."""
    model, path = hf("llama2-gqa")
    src = tmp_path / "src"
    if case in ("params.json", "truncated .pth", "pickle code", "model parallel"):
        write_meta_reference(model, src, 2, "llama2-gqa")
    else:
        shutil.copytree(path, src)
    if case == "undetectable":
        shutil.rmtree(src)
        src.mkdir()
        (src / "weights.npz").write_bytes(b"")
        return src, ["--to", "hf"], "cannot tell the checkpoint format"
    if case == "params.json":
        (src / "params.json").write_text('{"dim": 64, ')
        return src, ["--to", "hf"], "params.json"
    if case == "config.json":
        (src / "config.json").write_text('{"hidden_size": 64}')
        return src, ["--to", "orbax"], "config.json is missing 'num_"
    if case == "shape":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 180}))
        return src, ["--to", "orbax"], "gate_proj.weight has shape (176, 64), but the config implies (180, 64)"
    if case == "truncated safetensors":
        f = src / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return src, ["--to", "meta"], "truncated"
    if case == "truncated .pth":
        f = src / "consolidated.01.pth"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return src, ["--to", "hf"], "consolidated.01.pth is truncated"
    if case == "pickle code":
        torch.save({"tok_embeddings.weight": torch.zeros(256, 32), "extra": Payload()}, src / "consolidated.00.pth")
        return src, ["--to", "hf"], "arbitrary code"
    if case == "missing shard":
        shutil.rmtree(src)
        model.save_pretrained(src, max_shard_size="100KB")
        index = json.loads((src / "model.safetensors.index.json").read_text())
        shard = sorted(set(index["weight_map"].values()))[1]
        (src / shard).unlink()
        return src, ["--to", "hf"], f"lists shard {shard}, which is missing"
    if case == "model parallel":
        return src, ["--to", "meta", "--model-parallel", "3"], "--model-parallel 3 does not divide n_heads 4"
    if case == "rope scaling":  # the test model's original_max_position_embeddings is 16
        return hf("llama3.1")[1], ["--to", "meta"], "cannot express this RoPE scaling"
    if case == "usage":
        return src, ["--to", "gguf"], "invalid choice"
    raise AssertionError(case)


BAD = [
    "undetectable",
    "params.json",
    "config.json",
    "shape",
    "truncated safetensors",
    "truncated .pth",
    "pickle code",
    "missing shard",
    "model parallel",
    "rope scaling",
    "usage",
]


def assert_one_error_line(err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err


def assert_nothing_at(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line(case, hf, tmp_path, capfd):
    src, args, fragment = corrupt(case, hf, tmp_path)
    dst = tmp_path / "out" / "dst"
    dst.parent.mkdir()
    capfd.readouterr()
    assert main([str(src), str(dst), *args]) == 2
    assert_one_error_line(capfd.readouterr().err, fragment)
    assert_nothing_at(dst)


def test_existing_destination_needs_overwrite(hf, tmp_path, capfd):
    _, path = hf("llama2-gqa")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    capfd.readouterr()
    assert main([str(path), str(dst), "--to", "hf"]) == 2
    assert_one_error_line(capfd.readouterr().err, "--overwrite")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert main([str(path), str(dst), "--to", "hf", "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()


def test_cli_process_reports_one_line(tmp_path):
    """The real console entry point: exit status 2, one stderr line, nothing written."""
    (tmp_path / "src").mkdir()
    dst = tmp_path / "dst"
    proc = subprocess.run(
        [sys.executable, "-m", "llama_jax.convert", str(tmp_path / "src"), str(dst), "--to", "hf"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "cannot tell the checkpoint format")
    assert_nothing_at(dst)
