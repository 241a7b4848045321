"""Meta `.pth` checkpoints without torch: files written by torch.save read bit for bit as torch.load
reads them, files we write load in torch.load (weights_only, mmap) bit for bit, and both
conventions for kv heads repeated over model-parallel shards convert and score like the HF original.

The reading and writing run in subprocesses where torch is not importable (tests/no_torch);
torch in this process is only the peer that made or checks the files.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from meta_reference import write_meta_reference
from safetensors.numpy import load_file

from llama_jax.convert import load_checkpoint, open_checkpoint
from llama_jax.convert.cli import main
from llama_jax.model import Llama
from llama_jax.scoring import score

ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'no_torch'}{os.pathsep}{ROOT}"}
GQA = dict(num_key_value_heads=2, rms_norm_eps=1e-5)
SEQUENCES = [list(np.random.default_rng(i).integers(0, 256, n)) for i, n in enumerate((64, 57, 40))]
TOL = 1e-5  # float32 on both sides, same weights: summation order only (see test_convert.py)


def without_torch(code: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=NO_TORCH, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def assert_same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), what


@pytest.fixture(scope="module")
def model(make_hf_llama):
    return make_hf_llama(seed=3, **GQA)


READ = """
import sys, numpy as np
from pathlib import Path
from llama_jax.convert.torch_file import TorchReader
out = {}
for f in sorted(Path(sys.argv[1]).glob("*.pth")):
    r = TorchReader(f)
    for name in r.tensors:
        x = r.read(name)
        out[f"{f.name}/{name}/{x.dtype.name}"] = x.view(np.uint8)  # npz has no bfloat16
np.savez(sys.argv[2], **out)
"""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mp", [1, 2, 4])
def test_torch_saved_meta_reads_like_torch_load(model, dtype, mp, tmp_path):
    meta = tmp_path / "meta"
    write_meta_reference(model, meta, mp, "llama2-gqa", dtype=dtype)
    without_torch(READ, str(meta), str(tmp_path / "read.npz"))
    read = dict(np.load(tmp_path / "read.npz"))
    expected = {}
    for f in sorted(meta.glob("*.pth")):
        for mmap in (False, True):
            for name, t in torch.load(f, weights_only=True, mmap=mmap).items():
                x = as_numpy(t)
                expected[f"{f.name}/{name}/{x.dtype.name}"] = x
    assert read.keys() == expected.keys() and len(expected) == mp * (4 + 9 * model.config.num_hidden_layers)
    for key, x in expected.items():
        assert_same_bits(read[key].view(x.dtype).reshape(x.shape), x, key)


WRITE = """
import sys
from llama_jax.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_meta_written_without_torch_loads_in_torch_bit_for_bit(model, dtype, tmp_path):
    """HF -> Meta (MP=2, and MP=4: kv heads repeated) without torch; torch.load (weights_only,
    with and without mmap, and computing storage offsets itself) gives exactly the tensors of the
    reference layout."""
    hf = tmp_path / "hf"
    copy.deepcopy(model).to(dtype).save_pretrained(hf)
    for mp in (2, 4):
        ours, reference = tmp_path / f"ours{mp}", tmp_path / f"reference{mp}"
        without_torch(WRITE, str(hf), str(ours), "--to", "meta", "--model-parallel", str(mp))
        write_meta_reference(model, reference, mp, "llama2-gqa", dtype=dtype)
        for rank in range(mp):
            name = f"consolidated.{rank:02d}.pth"
            want = torch.load(reference / name, weights_only=True)
            want.pop("rope.freqs")
            for how in ({}, {"mmap": True}, {"mmap": True, "map_location": "cpu"}):
                got = torch.load(ours / name, weights_only=True, **how)
                assert got.keys() == want.keys()
                for k, v in want.items():
                    assert got[k].dtype == dtype and torch.equal(got[k], v), (name, k, how)
        assert json.loads((ours / "params.json").read_text())["n_kv_heads"] == max(2, mp)


def test_torch_computes_the_offsets_of_our_files(model, tmp_path, monkeypatch):
    """torch.load can skip reading zip headers and compute each storage's offset, assuming its
    own writer's layout (calculate_storage_offsets; TORCH_SERIALIZATION_DEBUG checks each)."""
    import torch.utils.serialization

    model.save_pretrained(tmp_path / "hf")
    ours = tmp_path / "meta"
    without_torch(WRITE, str(tmp_path / "hf"), str(ours), "--to", "meta", "--model-parallel", "2")
    files = sorted(ours.glob("*.pth"))
    plain = [torch.load(f, weights_only=True) for f in files]
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    monkeypatch.setattr(torch.utils.serialization.config.load, "calculate_storage_offsets", True)
    for f, want in zip(files, plain, strict=True):
        computed = torch.load(f, weights_only=True, mmap=True)
        assert computed.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in computed.items())


@pytest.mark.parametrize("kv_count", ["repeated", "true"])
def test_both_kv_head_conventions_score_like_transformers(model, hf_logprobs, kv_count, tmp_path):
    """MP=4 with 2 kv heads: every shard holds one, each head twice over; params.json says 4
    (repeated) or 2 (true). Both read as 2 kv heads, score as transformers does, and convert
    back to exactly the HF tensors."""
    meta = tmp_path / "meta"
    write_meta_reference(model, meta, 4, "llama2-gqa", kv_count=kv_count)
    assert json.loads((meta / "params.json").read_text())["n_kv_heads"] == (4 if kv_count == "repeated" else 2)
    assert open_checkpoint(meta).config.n_kv_heads == 2
    ck = load_checkpoint(meta)
    ours = score(Llama(ck.config), ck.params, SEQUENCES)
    theirs = hf_logprobs(model, SEQUENCES)
    assert max(np.abs(a - b).max() for a, b in zip(ours, theirs, strict=True)) <= TOL
    assert np.std(np.concatenate(theirs)) > 0.5
    assert main([str(meta), str(tmp_path / "hf"), "--to", "hf"]) == 0
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert written.keys() == original.keys() and all(np.array_equal(v, written[k]) for k, v in original.items())


@pytest.mark.parametrize("kv_count", ["repeated", "true"])
def test_differing_kv_copies_are_one_error_line(model, kv_count, tmp_path, capfd):
    meta = tmp_path / "meta"
    write_meta_reference(model, meta, 4, "llama2-gqa", kv_count=kv_count)
    shard = torch.load(meta / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wv.weight"] += 1e-3
    torch.save(shard, meta / "consolidated.01.pth")
    capfd.readouterr()
    assert main([str(meta), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "layers.1.attention.wv.weight" in err[0], err
    assert "copies differ" in err[0] and not (tmp_path / "out").exists()
