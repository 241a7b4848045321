from llama_jax.convert.cli import main

main()
