"""Greedy generation equals Hugging Face transformers' generate(do_sample=False)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llama_jax.convert import load_checkpoint, save_checkpoint
from llama_jax.generate import Sampling, generate
from llama_jax.model import Llama

SHAPES = {
    "llama2-mha": dict(num_key_value_heads=4, rope_theta=10000.0),
    "llama3.1-gqa-scaled": dict(
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),  # fmt: skip
}
# Prompts of different lengths (2 to 31 tokens) in one batch; BOS = 1, EOS = 2, HF pads with 0.
PROMPTS = [[1, 5, 9, 22, 7], [1, 3], [1, *range(10, 40)], [1, 100, 101]]
NEW = 24


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_matches_transformers(tmp_path, shape):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,  # peaked logits: no near-ties
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape],
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    save_checkpoint(load_checkpoint(tmp_path / "hf"), tmp_path / "orbax", "orbax")
    ckpt = load_checkpoint(tmp_path / "orbax")
    ours = generate(Llama(ckpt.config), jax.tree.map(jnp.asarray, ckpt.params), PROMPTS, NEW, Sampling(0.0), [2])

    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, eos_token_id=2)  # fmt: skip
    for row, completion in zip(out[:, width:].tolist(), ours, strict=True):
        expected = row[: row.index(2)] if 2 in row else row
        assert completion.tokens == expected
        assert completion.finish_reason == ("stop" if 2 in row else "length")
    assert len({tuple(c.tokens) for c in ours}) == len(PROMPTS)  # rows really differ
    assert np.mean([len(c.tokens) for c in ours]) > 5
