"""Score, reward, generate, chat, sample and evaluate with a Llama checkpoint: `python infer.py --help`."""

import sys

from llama_jax.infer import main

if __name__ == "__main__":
    sys.exit(main())
