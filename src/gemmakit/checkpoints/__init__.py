"""Checkpoint formats: one reader per format (hf, official, gguf), format detection (`read`), the
quantized conversions kept on disk (converted), the default model (default), and the model built
from any of them (checkpoint.build).

Every reader returns a `Checkpoint` (checkpoint.py): the config, the tokenizer and the tensors as
lazy references.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import Checkpoint, TensorRef, build

__all__ = ["Checkpoint", "TensorRef", "build", "read", "is_gguf"]


def is_gguf(path: Path) -> bool:
    """A .gguf file, or a file that starts with GGUF's magic (only its first 4 bytes are read)."""
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read(source: str | os.PathLike, variant: str | None = None) -> Checkpoint:
    """Reads a Hugging Face folder, an official .ckpt/.bin (+ index), or a .gguf file."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (and not a preset name)")
    if path.is_dir() and (path / "config.json").is_file():
        from . import hf

        return hf.read(path)
    if is_gguf(path):
        from . import gguf

        return gguf.read(path)
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth") or path.is_dir() or path.name.endswith(".index.json"):
        from . import official

        return official.read(path, variant=variant)
    raise CheckpointError(f"{path}: not a checkpoint gemmakit knows (a Hugging Face folder, .ckpt/.bin or .gguf)")
