import sys

from llama_jax.convert.cli import main

sys.exit(main())
