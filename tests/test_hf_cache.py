"""Hugging Face model ids as checkpoints: a cache laid out as huggingface_hub documents it
(models--ORG--NAME/ with blobs/, refs/<branch or tag> holding a commit, snapshots/<commit>/ of
links into blobs/) loads by id in `infer.py score` and `llama-jax-convert`, found by
huggingface_hub's offline lookup (HF_HUB_CACHE, or HF_HOME/hub); --revision picks a ref."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest

from llama_jax import infer
from llama_jax.convert import load_checkpoint, open_checkpoint, resolve_checkpoint
from llama_jax.convert.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "test-org/tiny-llama"


def add_snapshot(cache: Path, model_dir: Path, ref: str) -> str:
    """Put model_dir's files into the cache as a commit that refs/<ref> points to."""
    repo = cache / f"models--{MODEL_ID.replace('/', '--')}"
    files = sorted(model_dir.iterdir())
    commit = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in files:
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def cache(tmp_path_factory, make_hf_llama) -> dict:
    """HF_HOME with hub/ holding two revisions of one model: main, and the tag v2 (other weights)."""
    root = tmp_path_factory.mktemp("hf")
    out = {"home": root / "home", "dirs": {}}
    for seed, ref in ((0, "main"), (1, "v2")):
        model_dir = root / ref
        make_hf_llama(seed=seed, num_key_value_heads=2).save_pretrained(model_dir)
        out["dirs"][ref] = model_dir
        out[ref] = add_snapshot(root / "home" / "hub", model_dir, ref)
    return out


def run(script: list[str], env: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_score_and_convert_by_model_id(cache, tmp_path):
    seqs = tmp_path / "in.jsonl"
    seqs.write_text("".join(json.dumps({"tokens": list(range(i, i + 20))}) + "\n" for i in (1, 50)))
    scores = {}
    for name, checkpoint, extra, env in (
        ("id", MODEL_ID, [], {"HF_HUB_CACHE": str(cache["home"] / "hub")}),
        ("id v2", MODEL_ID, ["--revision", "v2"], {"HF_HOME": str(cache["home"])}),
        ("dir", str(cache["dirs"]["main"]), [], None),
        ("dir v2", str(cache["dirs"]["v2"]), [], None),
    ):
        out = tmp_path / f"{name}.jsonl"
        args = ["score", "--checkpoint", checkpoint, "--input", str(seqs), "--output", str(out), *extra]
        if env is None:  # the directories themselves, in this process
            assert infer.main(args) == 0
        else:
            proc = run(["infer.py", *args], env)
            assert proc.returncode == 0, proc.stderr
        scores[name] = [json.loads(line)["logprobs"] for line in out.read_text().splitlines()]
    assert scores["id"] == scores["dir"] and scores["id v2"] == scores["dir v2"]
    assert scores["id"] != scores["id v2"]

    proc = run(
        ["-m", "llama_jax.convert", MODEL_ID, str(tmp_path / "orbax"), "--to", "orbax"], {"HF_HOME": str(cache["home"])}
    )
    assert proc.returncode == 0, proc.stderr
    want = load_checkpoint(cache["dirs"]["main"]).params
    got = load_checkpoint(tmp_path / "orbax").params
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


def test_the_lookup_is_huggingface_hubs(cache, monkeypatch):
    """The snapshot directory is what huggingface_hub itself resolves, at a ref or a commit."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache["home"] / "hub"))
    for revision in (None, "v2", cache["v2"]):
        hub = huggingface_hub.snapshot_download(MODEL_ID, revision=revision, local_files_only=True)
        assert resolve_checkpoint(MODEL_ID, revision) == Path(hub)
        assert open_checkpoint(MODEL_ID, revision=revision).path == Path(hub)  # as train.py --init-from opens it
        assert hub.endswith(cache["v2" if revision else "main"])


@pytest.mark.parametrize(
    ("checkpoint", "revision", "fragment"),
    [
        ("test-org/absent", None, "looked in {hub}/models--test-org--absent"),
        (MODEL_ID, "v3", "at revision v3 (looked in {hub}/models--test-org--tiny-llama"),
        ("./no/such/dir", None, "./no/such/dir is not a directory"),
    ],
)
def test_unknown_ids_say_where_they_looked(cache, checkpoint, revision, fragment, monkeypatch, tmp_path, capfd):
    hub = cache["home"] / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    capfd.readouterr()
    extra = ["--revision", revision] if revision else []
    assert main([checkpoint, str(tmp_path / "out"), "--to", "hf", *extra]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment.format(hub=hub) in err[0], err
    assert not (tmp_path / "out").exists()
