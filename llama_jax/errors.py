"""Bad input is reported as one `error: ...` line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """Input the user can fix: shown as `error: <message>`."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


# Exceptions that carry a message meant for the user. Library modules raise UserError or
# ValueError subclasses (ConfigError, TokenizerError, ShardingError, ...), OSError for missing or
# unreadable files, ImportError for a missing optional dependency.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, ImportError)


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run main(argv): user errors become one stderr line and exit code 2, anything else one
    `internal error` line and exit code 1. `--debug` shows the traceback (and library logs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.getLogger("absl").setLevel(logging.DEBUG if debug else logging.ERROR)  # orbax's chatter
    try:
        return main([a for a in argv if a != "--debug"]) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        line = " ".join(_message(e).split())
        if isinstance(e, USER_ERRORS):
            print(f"error: {line}", file=sys.stderr)
            return 2
        print(
            f"error: internal error ({type(e).__name__}: {line}); rerun with --debug for the traceback", file=sys.stderr
        )
        return 1
