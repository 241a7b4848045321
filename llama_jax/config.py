"""Model configuration: one frozen dataclass, named presets, and readers/writers for
Meta `params.json` and Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FAMILIES = ("llama1", "llama2", "llama3")
HEADS = ("lm", "score")  # next-token logits; one scalar per position (a reward or value model)
QUANTIZATIONS = ("none", "int8", "int4")  # weight-only, of the linear kernels (see quant.py)


class ConfigError(ValueError):
    """A configuration file or value that cannot describe a Llama model."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (3.1/3.3 use factor 8, 3.2 uses 32)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    # Which Meta code base the model belongs to. It decides Meta's embedding split
    # (Llama 1/2: ParallelEmbedding over dim; Llama 3: VocabParallelEmbedding over vocab),
    # BOS handling and the chat format.
    family: str = "llama2"
    # The output: "lm" projects to the vocabulary; "score" is a scalar head `score/kernel [dim, 1]`
    # in its place (HF's LlamaForSequenceClassification, read at each sequence's last token).
    head: str = "lm"
    pad_id: int | None = None  # the token HF's sequence classifier pads with (never a sequence's last)
    # How the linear kernels are stored (quant.py); a quantized checkpoint loads as it is stored.
    quantization: str = "none"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if not self.head_dim:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization == "int4" and (self.dim % 2 or self.ffn_dim % 2):
            raise ConfigError(f"int4 packs input rows in pairs: dim {self.dim} and ffn_dim {self.ffn_dim} must be even")

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        head = self.dim if self.head == "score" else 0 if self.tie_embeddings else self.dim * self.vocab_size
        return self.n_layers * layer + self.vocab_size * self.dim + head + self.dim

    # -- our own config.json ------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FFN hidden size by Meta's rule (int(8/3 dim), scaled, rounded up to multiple_of)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_args(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that give ffn_dim by Meta's rule.

    The released combinations are tried first so real models get their real params.json;
    otherwise multiple_of=ffn_dim with a multiplier that brings the hidden size under it."""
    for multiple_of in (256, 1024, 4096):
        for mult in (None, 1.3, 1.2, 1.5, 1.0):
            if meta_ffn_dim(dim, multiple_of, mult) == ffn_dim:
                return multiple_of, mult
    base = int(2 * 4 * dim / 3)
    if base <= ffn_dim:
        return ffn_dim, None
    return ffn_dim, ffn_dim / base


def _rope_scaling_from(d: dict | None) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope scaling type {kind!r} (only 'llama3')")
    try:
        return RopeScaling(
            factor=float(d["factor"]),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"malformed rope scaling {d!r}: {e}") from None


def _family(vocab_size: int, rope_theta: float, scaled: bool) -> str:
    return "llama3" if vocab_size >= 128000 or rope_theta >= 500000 or scaled else "llama2"


def from_hf_config(d: dict) -> LlamaConfig:
    """A `transformers` LlamaConfig dict (config.json) -> LlamaConfig."""
    if not isinstance(d, dict):
        raise ConfigError("config.json is not a JSON object")
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"config.json model_type is {model_type!r}, expected 'llama'")
    head = "score" if SEQUENCE_CLASSIFIER in (d.get("architectures") or []) else "lm"
    labels = len(d["id2label"]) if isinstance(d.get("id2label"), dict) else d.get("num_labels", 1)
    if head == "score" and labels != 1:
        raise ConfigError(f"a {SEQUENCE_CLASSIFIER} with {labels} labels is not a reward model (num_labels 1)")
    try:
        rope = d.get("rope_parameters") or {}
        rope_scaling = _rope_scaling_from(d.get("rope_scaling") or rope)
        theta = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
        dim, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        vocab = int(d["vocab_size"])
        return LlamaConfig(
            dim=dim,
            n_layers=int(d["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(d.get("num_key_value_heads") or heads),
            vocab_size=vocab,
            ffn_dim=int(d["intermediate_size"]),
            head_dim=int(d.get("head_dim") or dim // heads),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_seq_len=int(d.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            family=_family(vocab, theta, rope_scaling is not None),
            head=head,
            pad_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
        )
    except KeyError as e:
        raise ConfigError(f"config.json is missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"malformed config.json: {e}") from None


SEQUENCE_CLASSIFIER = "LlamaForSequenceClassification"


def to_hf_config(cfg: LlamaConfig, torch_dtype: str) -> dict:
    d = {
        "architectures": [SEQUENCE_CLASSIFIER if cfg.head == "score" else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "rope_scaling": None,
    }
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    if cfg.family == "llama3":
        d.update(bos_token_id=128000, eos_token_id=128001)
    else:
        d.update(bos_token_id=1, eos_token_id=2)
    if cfg.pad_id is not None:
        d["pad_token_id"] = cfg.pad_id
    if cfg.head == "score":
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return d


def from_meta_params(d: dict, vocab_size: int | None = None) -> LlamaConfig:
    """Meta `params.json` -> LlamaConfig. Llama 1/2 files say vocab_size -1: pass the real
    size (from the embedding tensor) as `vocab_size`."""
    if not isinstance(d, dict):
        raise ConfigError("params.json is not a JSON object")
    try:
        dim, heads = int(d["dim"]), int(d["n_heads"])
        file_vocab = int(d.get("vocab_size", -1))
        vocab = file_vocab if file_vocab > 0 else vocab_size
        if vocab is None:
            raise ConfigError("params.json has vocab_size -1 and no embedding to read it from")
        theta = float(d.get("rope_theta", 10000.0))
        scaled = bool(d.get("use_scaled_rope", False))
        ffn = meta_ffn_dim(dim, int(d.get("multiple_of", 256)), d.get("ffn_dim_multiplier"))
        n_layers, kv_heads = int(d["n_layers"]), int(d.get("n_kv_heads") or heads)
        rope_scaling = None
        if scaled:
            # Meta's 3.1/3.2 params.json records no factor (its code assumed 8); a released
            # shape gets its release's factor (3.2 1B/3B: 32), anything else 8.
            release = [
                p.rope_scaling.factor
                for p in PRESETS.values()
                if p.rope_scaling and (p.dim, p.n_layers, p.n_heads, p.ffn_dim) == (dim, n_layers, heads, ffn)
            ]
            factor = d.get("rope_scaling_factor") or (release[0] if release else 8.0)
            rope_scaling = RopeScaling(factor=float(factor))
        return LlamaConfig(
            dim=dim,
            n_layers=n_layers,
            n_heads=heads,
            n_kv_heads=kv_heads,
            vocab_size=int(vocab),
            ffn_dim=ffn,
            norm_eps=float(d.get("norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_seq_len=int(d.get("max_seq_len", 131072 if scaled else 8192 if file_vocab > 0 else 4096)),
            # Only the Llama 3 code base writes a positive vocab_size.
            family="llama3" if file_vocab > 0 else "llama2",
        )
    except KeyError as e:
        raise ConfigError(f"params.json is missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"malformed params.json: {e}") from None


def to_meta_params(cfg: LlamaConfig, n_kv_heads: int | None = None) -> dict:
    multiple_of, mult = meta_ffn_args(cfg.dim, cfg.ffn_dim)
    d = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": n_kv_heads or cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size if cfg.family == "llama3" else -1,
        "multiple_of": multiple_of,
        "norm_eps": cfg.norm_eps,
    }
    if mult is not None:
        d["ffn_dim_multiplier"] = mult
    if cfg.family == "llama3":
        d["rope_theta"] = cfg.rope_theta
    if cfg.rope_scaling is not None:
        d["use_scaled_rope"] = True
        if cfg.rope_scaling.factor != 8.0:  # Meta's default; llama-models reads this key
            d["rope_scaling_factor"] = cfg.rope_scaling.factor
    return d


def _llama3(dim, layers, heads, ffn, **kw) -> LlamaConfig:
    base = dict(n_kv_heads=8, vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, family="llama3")
    return LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn, **{**base, **kw})


_L31 = dict(rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072)
_L32 = dict(rope_scaling=RopeScaling(factor=32.0), max_seq_len=131072, tie_embeddings=True)
_L1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048, family="llama1")
_L2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096, family="llama2")

PRESETS: dict[str, LlamaConfig] = {
    "llama1-7b": LlamaConfig(4096, 32, 32, 32, ffn_dim=11008, **_L1),
    "llama1-13b": LlamaConfig(5120, 40, 40, 40, ffn_dim=13824, **_L1),
    "llama1-33b": LlamaConfig(6656, 60, 52, 52, ffn_dim=17920, **_L1),
    "llama1-65b": LlamaConfig(8192, 80, 64, 64, ffn_dim=22016, **{**_L1, "norm_eps": 1e-5}),
    "llama2-7b": LlamaConfig(4096, 32, 32, 32, ffn_dim=11008, **_L2),
    "llama2-13b": LlamaConfig(5120, 40, 40, 40, ffn_dim=13824, **_L2),
    "llama2-70b": LlamaConfig(8192, 80, 64, 8, ffn_dim=28672, **_L2),
    "llama3-8b": _llama3(4096, 32, 32, 14336),
    "llama3-70b": _llama3(8192, 80, 64, 28672),
    "llama3.1-8b": _llama3(4096, 32, 32, 14336, **_L31),
    "llama3.1-70b": _llama3(8192, 80, 64, 28672, **_L31),
    "llama3.1-405b": _llama3(16384, 126, 128, 53248, **_L31),
    "llama3.2-1b": _llama3(2048, 16, 32, 8192, head_dim=64, **_L32),
    "llama3.2-3b": _llama3(3072, 28, 24, 8192, **_L32),
    # Tiny shapes for tests and the CPU default run.
    "tiny-llama2": LlamaConfig(64, 2, 4, 4, vocab_size=256, ffn_dim=176, max_seq_len=256, family="llama2"),
    "tiny-llama3": _llama3(64, 2, 4, 176, n_kv_heads=2, vocab_size=256, max_seq_len=256),
    "tiny": LlamaConfig(256, 4, 4, 2, vocab_size=4096, ffn_dim=704, max_seq_len=256, family="llama2"),
}


def get_preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def flops_per_token(cfg: LlamaConfig, seq_len: int, weight_grads: bool = True, extra_forwards: int = 0) -> float:
    """Model FLOPs per trained token (rematerialisation not counted): the matmuls' 2 x parameters
    forward, 2 x backward for the activations' gradients and 2 x for the weights' (LoRA skips those;
    its adapters are negligible), causal attention forward and twice that backward, and
    `extra_forwards` forward passes without gradients (DPO's reference)."""
    lookup_only = not cfg.tie_embeddings or cfg.head == "score"  # else the embedding is also the output matmul
    matmul_params = cfg.num_params - cfg.vocab_size * cfg.dim * lookup_only
    attention = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # 4 * L*H*hd*T / 2 (causal)
    forward = 2 * matmul_params + attention
    backward = (4 if weight_grads else 2) * matmul_params + 2 * attention
    return (1 + extra_forwards) * forward + backward
