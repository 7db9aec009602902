"""Where gemmakit keeps its files and how it writes them.

- `cache_dir()`: the converted models, compiled decode steps and the default model's file.
- `atomic_path(target)`: every file or folder gemmakit writes appears whole or not at all, so a
  run that is killed midway never leaves something a later run would trust.
- `fingerprint(files, ...)`: a short key for files as they are now, for caches derived from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMAKIT_CACHE", Path.home() / ".cache" / "gemmakit"))


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `target` to write a file or a folder at; moved onto `target` when
    the block ends, removed when it raises. The name keeps target's suffix (writers that pick a
    format by it still do); the process id keeps two writers of one target apart. An empty folder
    at `target` is replaced (rename cannot replace it on every system)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".partial-{os.getpid()}-{target.name}")
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def fingerprint(files: Iterable[str | os.PathLike], *extra) -> str:
    """16 hex digits that change when any file changes (its path, size or modification time) or
    any of `extra` (JSON-able values) does. Files are stat'ed, not read: keys of multi-GB
    checkpoints cost microseconds."""
    key = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for f in files:
        st = os.stat(f)
        key.update(f"{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return key.hexdigest()[:16]
