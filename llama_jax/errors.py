"""Bad input is reported as one `error: ...` line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """Input the user can fix: shown as `error: <message>`."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


# Exceptions that carry a message meant for the user. Library modules raise ValueError
# subclasses (ConfigError, TokenizerError, ...) or OSError for missing/unreadable files.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run main(argv); turn user errors into one stderr line and exit code 2.

    `--debug` anywhere in argv shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main([a for a in argv if a != "--debug"]) or 0
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        msg = str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"error: {' '.join(msg.split()) or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
