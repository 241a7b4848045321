"""Train a Llama model (pre-training, SFT, DPO, LoRA); `python train.py --help` lists every option.

With no arguments it trains the `tiny` preset on this interpreter's standard library, with a
freshly trained tokenizer, in a few minutes on a CPU, and prints a sample from the checkpoint.
"""

import sys

from llama_jax.errors import run_cli
from llama_jax.training import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
