"""Meta checkpoints made with torch.save from a transformers model, independently of the converter
(shared by the conversion tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_meta_reference(
    model, dst: Path, mp: int, family: str, dtype: torch.dtype | None = None, kv_count: str = "repeated"
) -> None:
    """Meta's layout written straight from the reference sheet: HF->Meta q/k permutation, kv heads
    repeated over consecutive shards when mp > n_kv_heads, Meta's split per tensor, the weights
    cast to `dtype` if given. kv_count: what params.json says n_kv_heads is when the heads are
    repeated, "repeated" (the 405B MP=16 release) or "true" (llama-models' reshard_mp)."""
    c, sd = model.config, model.state_dict()
    heads, kv, hd, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    rep = max(1, mp // kv)

    def permute(w, n):
        return w.view(n, 2, hd // 2, dim).transpose(1, 2).reshape(n * hd, dim)

    def repeat(w):
        return w.view(kv, hd, dim).repeat_interleave(rep, 0).reshape(-1, dim)

    llama3 = family.startswith("llama3")
    full = {
        "tok_embeddings.weight": (sd["model.embed_tokens.weight"], 0 if llama3 else 1),
        "norm.weight": (sd["model.norm.weight"], None),
        "output.weight": (sd["lm_head.weight"], 0),
        "rope.freqs": (torch.ones(hd // 2), None),  # present in Meta's files, ignored by readers
    }
    for i in range(c.num_hidden_layers):
        hf_layer, layer = f"model.layers.{i}.", f"layers.{i}."
        full |= {
            layer + "attention.wq.weight": (permute(sd[hf_layer + "self_attn.q_proj.weight"], heads), 0),
            layer + "attention.wk.weight": (repeat(permute(sd[hf_layer + "self_attn.k_proj.weight"], kv)), 0),
            layer + "attention.wv.weight": (repeat(sd[hf_layer + "self_attn.v_proj.weight"]), 0),
            layer + "attention.wo.weight": (sd[hf_layer + "self_attn.o_proj.weight"], 1),
            layer + "feed_forward.w1.weight": (sd[hf_layer + "mlp.gate_proj.weight"], 0),
            layer + "feed_forward.w3.weight": (sd[hf_layer + "mlp.up_proj.weight"], 0),
            layer + "feed_forward.w2.weight": (sd[hf_layer + "mlp.down_proj.weight"], 1),
            layer + "attention_norm.weight": (sd[hf_layer + "input_layernorm.weight"], None),
            layer + "ffn_norm.weight": (sd[hf_layer + "post_attention_layernorm.weight"], None),
        }
    dst.mkdir(parents=True)
    for rank in range(mp):
        shard = {
            k: (w if d is None else w.chunk(mp, d)[rank]).to(dtype or w.dtype).clone() for k, (w, d) in full.items()
        }
        torch.save(shard, dst / f"consolidated.{rank:02d}.pth")
    params = {
        "dim": dim,
        "n_layers": c.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": kv * rep if kv_count == "repeated" else kv,
        "vocab_size": c.vocab_size if llama3 else -1,
        "multiple_of": 16,
        "norm_eps": c.rms_norm_eps,
    }
    if llama3:
        params["rope_theta"] = c.rope_parameters["rope_theta"]
    (dst / "params.json").write_text(json.dumps(params))
