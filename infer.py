"""Score, reward, generate and chat with a Llama checkpoint: `python infer.py {score,reward,generate,chat,sample-best} --help`."""

import sys

from llama_jax.infer import main

if __name__ == "__main__":
    sys.exit(main())
