"""JSONL inputs (preference pairs, RL prompts): each non-blank line's record with its `file:line`
for messages, or a DataError naming the file or the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError


def records(path: str | Path, what: str = "file") -> Iterator[tuple[str, object]]:
    """(`path:line`, the line's JSON) for each non-blank line; the file is read whole first, so a
    missing or non-UTF-8 file fails before any line is used."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:  # Python's parser recurses once per level of nesting
            raise DataError(f"{where}: JSON nested too deeply") from None
        yield where, record
