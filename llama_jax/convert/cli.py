"""llama-jax-convert SRC DST --to orbax|hf|meta: convert a checkpoint, streaming tensor by tensor
(--to orbax --quantize int8|int4: a weight-only quantized checkpoint for inference).

Bad input is reported as a single `error: ...` line with exit status 2 (a traceback with --debug),
and leaves nothing at DST.
"""

from __future__ import annotations

import os

from llama_jax.config import QUANTIZATIONS
from llama_jax.convert.checkpoint import FORMATS, open_checkpoint, save_checkpoint
from llama_jax.dtypes import DTYPES
from llama_jax.errors import ArgumentParser, run_cli


def convert(argv: list[str]) -> None:
    p = ArgumentParser(prog="llama-jax-convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint directory to read, or a Hugging Face model id in the local cache")
    p.add_argument("dst", help="directory to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--from", dest="src_format", choices=("auto", *FORMATS), default="auto")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--dtype", choices=("keep", *DTYPES), default="keep", help="cast the weights (default: keep)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none", help="quantize the linear kernels (--to orbax)")
    p.add_argument("--model-parallel", type=int, default=1, metavar="N", help="Meta shard count (--to meta)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a model id SRC (default: main)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    # Conversion runs on the host: keep JAX (imported by orbax) from probing accelerators, which
    # is slow and, with libtpu installed, prints warnings.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    source = open_checkpoint(args.src, args.src_format, args.dtype, args.revision)
    save_checkpoint(
        source, args.dst, args.to, model_parallel=args.model_parallel, overwrite=args.overwrite, progress=True,
        quantize=args.quantize,
    )  # fmt: skip
    print(f"wrote {args.to} checkpoint {args.dst} from {source.format} checkpoint {args.src}")


def main(argv: list[str] | None = None) -> int:
    """The console script; argv defaults to sys.argv[1:]."""
    return run_cli(convert, argv)
