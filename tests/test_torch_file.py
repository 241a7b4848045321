"""torch_file / torch_pickle against torch itself: what torch.save writes (views, shared storages,
parameters, every float dtype, HF pytorch_model*.bin) reads back bit for bit; pickles naming any
other global are refused before anything runs; malformed files are one error line."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from llama_jax.convert import ConvertError, load_checkpoint
from llama_jax.convert.cli import main
from llama_jax.convert.torch_file import TorchReader, TorchWriter
from llama_jax.convert.torch_pickle import load_state_dict


def as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def assert_reads_like_torch(path: Path) -> None:
    reader, state = TorchReader(path), torch.load(path, weights_only=True)
    assert list(reader.tensors) == list(state)
    for name, t in state.items():
        x, want = reader.read(name), as_numpy(t)
        assert x.dtype == want.dtype and x.shape == want.shape and x.tobytes() == want.tobytes(), name


def test_torch_save_structures_read_bit_for_bit(tmp_path):
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    state = collections.OrderedDict(
        slice=base[2:5, 3:],  # a view with an offset into a bigger storage
        transposed=base.t(),  # the same storage again, other strides
        whole=base,
        param=torch.nn.Parameter(torch.randn(3, 4)),  # _rebuild_parameter
        bf16=base.to(torch.bfloat16),
        f16=base[:, ::3].to(torch.float16),
        f64=torch.randn(5, dtype=torch.float64),
        scalar=torch.tensor(2.5),
    )
    torch.save(state, tmp_path / "a.pth")
    assert_reads_like_torch(tmp_path / "a.pth")


def test_written_files_load_in_torch_with_any_write_order(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "b": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16),
        "t": rng.standard_normal((4, 6)).astype(np.float32).T,  # non-contiguous: written in blocks
        "h": rng.standard_normal((3,)).astype(np.float16),
    }
    writer = TorchWriter(tmp_path / "x.pth", {k: (v.shape, v.dtype) for k, v in arrays.items()})
    for name in ("t", "h", "b"):
        writer.write(name, arrays[name])
    writer.close()
    assert zipfile.ZipFile(tmp_path / "x.pth").testzip() is None  # every CRC-32 right
    for how in ({}, {"mmap": True}):
        state = torch.load(tmp_path / "x.pth", weights_only=True, **how)
        assert list(state) == ["t", "h", "b"]  # the order written
        for k, v in arrays.items():
            assert as_numpy(state[k]).tobytes() == np.ascontiguousarray(v).tobytes() and state[k].shape == v.shape
    assert_reads_like_torch(tmp_path / "x.pth")


def test_hf_pytorch_model_bin_reads_like_safetensors(make_hf_llama, tmp_path):
    """A tied model's .bin shares one storage between embedding and head; sharded .bin with an
    index too."""
    model = make_hf_llama(num_key_value_heads=2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "st")
    one, sharded = tmp_path / "bin", tmp_path / "sharded"
    for d in (one, sharded):
        d.mkdir()
        (d / "config.json").write_bytes((tmp_path / "st" / "config.json").read_bytes())
    torch.save(model.state_dict(), one / "pytorch_model.bin")
    sd = model.state_dict()
    names = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2]}
    halves["pytorch_model-00002-of-00002.bin"] = names[len(names) // 2 :]
    for file, keys in halves.items():
        torch.save({k: sd[k] for k in keys}, sharded / file)
    index = {"weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    want = load_checkpoint(tmp_path / "st").params
    for d in (one, sharded):
        got = load_checkpoint(d).params
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


# -- refusals ------------------------------------------------------------------------------------


class Shell:
    """Unpickling this runs `command`: the attack a .pth can carry."""

    def __init__(self, call, command: str):
        self.call, self.command = call, command

    def __reduce__(self):
        return self.call, (self.command,)


@pytest.mark.parametrize(("call", "protocol", "named"), [(os.system, 2, "posix.system"), (exec, 4, "builtins.exec")])
def test_pickle_naming_another_global_is_refused_unrun(call, protocol, named, tmp_path, capfd):
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w').close()" if call is exec else f"touch {marker}"
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 1, "vocab_size": 4}))
    f = src / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(4, 8), "x": Shell(call, command)}, f, pickle_protocol=protocol)
    capfd.readouterr()
    assert main([str(src), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {f}: its pickle names {named}"), err
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(f, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def rewrite(src: Path, dst: Path, patch, compression: int = zipfile.ZIP_STORED) -> None:
    """Copy a torch zip with Python's zipfile (no alignment), data.pkl through patch(bytes)."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", compression) as b:
        for info in a.infolist():
            data = a.read(info)
            b.writestr(info.filename, patch(data) if info.filename.endswith("data.pkl") else data)


def test_malformed_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"a": torch.arange(4.0)}, good)
    # Re-zipped by another writer, unaligned: still read.
    rewrite(good, tmp_path / "rezipped.pth", lambda d: d)
    assert TorchReader(tmp_path / "rezipped.pth").read("a").tolist() == [0, 1, 2, 3]
    # Storage offset 0 -> 2 (the BININT1 after BINPERSID): the tensor would reach past its storage.
    rewrite(good, tmp_path / "past.pth", lambda d: d.replace(b"QK\x00", b"QK\x02", 1))
    cases = {
        "past.pth": "reaches past its storage",
        "deflated.pth": "compressed",
        "legacy.pth": "pre-1.6 format",
        "empty.pth": "not a torch checkpoint",
        "garbled.pth": "pickle is malformed",
    }
    rewrite(good, tmp_path / "deflated.pth", lambda d: d, zipfile.ZIP_DEFLATED)
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "empty.pth").write_bytes(b"")
    rewrite(good, tmp_path / "garbled.pth", lambda d: d[: len(d) // 2])
    for name, fragment in cases.items():
        with pytest.raises(ConvertError, match=fragment):
            TorchReader(tmp_path / name)


def test_even_a_harmless_other_global_is_refused():
    """The allow-list is exact: a global no state dict needs is refused however harmless."""
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=2).dump(collections.OrderedDict(a=np.float32))  # names numpy.float32
    with pytest.raises(ConvertError, match="names numpy.float32"):
        load_state_dict(buf.getvalue(), lambda *a: None)
