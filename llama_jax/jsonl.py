"""JSON Lines in (one object per line, errors naming file and line) and atomically out."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

from llama_jax.errors import UserError


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; malformed lines are user errors."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def write_atomic(path: str | None, lines: list[str]) -> None:
    """Write lines to path via a temporary file renamed at the end (stdout when None)."""
    if path is None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
