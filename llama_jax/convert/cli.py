"""llama-jax-convert SRC DST --to orbax|hf|meta: convert a checkpoint, streaming tensor by tensor.

Bad input is reported as a single `error: ...` line with exit status 2 (a traceback with --debug),
and leaves nothing at DST.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from llama_jax.config import ConfigError
from llama_jax.convert.checkpoint import FORMATS, open_checkpoint, save_checkpoint
from llama_jax.convert.source import DTYPES, ConvertError

USER_ERRORS = (ConvertError, ConfigError, OSError, ImportError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        _fail(message)


def _fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}".replace("\n", " "), file=sys.stderr)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    """The console script; argv defaults to sys.argv[1:]."""
    p = _Parser(prog="llama-jax-convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint directory to read")
    p.add_argument("dst", help="directory to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--from", dest="src_format", choices=("auto", *FORMATS), default="auto")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--dtype", choices=("keep", *DTYPES), default="keep", help="cast the weights (default: keep)")
    p.add_argument("--model-parallel", type=int, default=1, metavar="N", help="Meta shard count (--to meta)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    # Conversion runs on the host: keep JAX (imported by orbax) from probing accelerators, which
    # is slow and, with libtpu installed, prints warnings.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.getLogger("absl").setLevel(logging.DEBUG if args.debug else logging.ERROR)  # orbax's chatter
    try:
        source = open_checkpoint(args.src, args.src_format, args.dtype)
        save_checkpoint(
            source, args.dst, args.to, model_parallel=args.model_parallel, overwrite=args.overwrite, progress=True
        )
    except USER_ERRORS as e:
        if args.debug:
            raise
        _fail(str(e) if not isinstance(e, OSError) or not e.strerror else f"{e.strerror}: {e.filename}")
    except Exception as e:
        if args.debug:
            raise
        _fail(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback", status=1)
    print(f"wrote {args.to} checkpoint {args.dst} from {source.format} checkpoint {args.src}")
