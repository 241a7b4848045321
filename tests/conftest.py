"""Test-wide settings, applied before JAX starts (subprocesses inherit them):
8 simulated CPU devices for the sharding tests, XLA's quickest CPU compiles, CPU only even where libtpu is installed
(it is, for ahead-of-time TPU compilation), and libtpu allowed in several processes."""

import os

import numpy as np
import pytest

# The suite compiles far more than it runs: XLA's lowest CPU optimisation level compiles ~30% faster.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


# Tiny random Hugging Face Llama models and their reference log-probabilities.
TINY_HF = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=256,
)


def _make_hf_llama(seed: int = 0, **overrides):
    """A seeded random float32 `transformers.LlamaForCausalLM` (TINY_HF + overrides), in eval mode.

    Every weight is redrawn, norms included (around 1), with a scale large enough that the
    log-probabilities are far from uniform: a misplaced or mis-permuted tensor then changes them
    by far more than any test tolerance."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_HF, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


def _hf_logprobs(model, sequences) -> list[np.ndarray]:
    """log P(seq[i+1] | seq[:i+1]) per sequence, from transformers, one sequence at a time (no padding)."""
    import torch

    out = []
    with torch.no_grad():
        for seq in sequences:
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            out.append(logp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].numpy())
    return out


@pytest.fixture(scope="session")
def make_hf_llama():
    return _make_hf_llama


@pytest.fixture(scope="session")
def hf_logprobs():
    return _hf_logprobs
