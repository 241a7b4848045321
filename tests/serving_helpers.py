"""Shared by the serving tests: a small checkpoint with a tokenizer, and the app on uvicorn in a
thread on an ephemeral 127.0.0.1 port (stopped at the end)."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import jax
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.convert import Checkpoint, save_checkpoint
from llama_jax.load import load
from llama_jax.model import init_params
from llama_jax.serving.api import create_app
from llama_jax.serving.engine import Engine, EngineConfig
from llama_jax.serving.server import BackgroundServer
from llama_jax.tokenizer import train_sentencepiece

TEXT = "The quick brown fox jumps over the lazy dog 12345.\nPack my box with five dozen liquor jugs! é ü 日本\n" * 50


def make_checkpoint(root: Path, cfg: LlamaConfig, scale: float = 6.0) -> Path:
    """An Orbax model with a SentencePiece tokenizer. Weights are scaled up so that logits are
    peaked: greedy choices have no near-ties that float rounding could flip."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(TEXT)
    tok = Path(train_sentencepiece([root / "corpus.txt"], str(root / "sp"), vocab_size=300))
    params = jax.tree.map(lambda x: np.asarray(x * scale if x.ndim > 1 else x), init_params(cfg, jax.random.key(0)))
    save_checkpoint(Checkpoint(cfg, params, [tok], "orbax"), root / "model", "orbax")
    (root / "model" / tok.name).rename(root / "model" / "tokenizer.model")
    return root / "model"


class Server(BackgroundServer):
    """The app for a checkpoint on uvicorn in a thread; `engine` is the live engine."""

    def __init__(self, checkpoint: Path, config: EngineConfig, api_key: str | None = None, name: str = "tiny"):
        self.lm = load(str(checkpoint), need_tokenizer=True)
        self.engine = Engine(self.lm.model, self.lm.params, self.lm.tokenizer.vocab_size, config)
        self.api_key = api_key
        super().__init__(create_app(self.engine, self.lm.tokenizer, name, api_key))

    def raw(self, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None):
        """(status, parsed JSON or text) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = json.dumps(body) if isinstance(body, dict) else body
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **auth, **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text

    def metrics(self) -> dict[str, float]:
        _, text = self.raw("GET", "/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if stats["running"] == 0 and stats["waiting"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(stats)
            time.sleep(0.05)
