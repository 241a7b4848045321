"""`decode.py --hf`: Hugging Face transformers' eager Llama (PyTorch) on the same shapes, in the same
run, as the peer the decode rows are compared with. Random weights of the same preset, bfloat16 on
a GPU (float32 on a CPU), greedy `generate` with a fixed number of new tokens."""

from __future__ import annotations

import time

from llama_jax.config import LlamaConfig, to_hf_config


def hf_decode_rows(cfg: LlamaConfig, prompt: int, batches: list[int], steps: int) -> list[tuple[str, float]]:
    """[(label, output tok/s)]: decode tok/s at each batch size (time of `steps` new tokens minus
    the time of one, the prefill), after a warm-up generation."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = transformers.LlamaConfig(**to_hf_config(cfg, "bfloat16"))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()

    def run(ids: torch.Tensor, new: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for b in batches:
        ids = torch.ones((b, prompt), dtype=torch.long, device=device)
        run(ids, 2)  # warm-up
        seconds = run(ids, steps) - run(ids, 1)
        rows.append((f"HF eager decode batch {b}", b * (steps - 1) / seconds))
    return rows
