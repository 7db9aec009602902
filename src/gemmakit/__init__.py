"""gemmakit: Google's Gemma models in PyTorch. `gemmakit.load(source)` is the way in."""

from __future__ import annotations

import os

import torch

from .config import PRESETS, GemmaConfig
from .errors import CheckpointError, ConfigError, GemmaError, GenerationError, TokenizerError
from .lm import LM
from .model import Gemma
from .tokenizer import Tokenizer

__all__ = ["load", "LM", "Gemma", "GemmaConfig", "PRESETS", "Tokenizer", "GemmaError", "ConfigError",
           "CheckpointError", "TokenizerError", "GenerationError"]


def load(source: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
         variant: str | None = None, tokenizer: str | os.PathLike | None = None, seed: int = 0,
         progress: bool = True) -> LM:
    """A model ready to run, from a Hugging Face folder, an official .ckpt/.bin, a .gguf file,
    or a preset name (random weights; see gemmakit.PRESETS).

    variant: the preset an official checkpoint belongs to, where its shapes do not tell.
    tokenizer: a tokenizer.model / tokenizer.json to use instead of (or where there is none) the
    checkpoint's own.
    """
    from . import checkpoints

    dtype = _dtype(dtype)
    tok = Tokenizer.from_file(tokenizer) if tokenizer is not None else None
    if isinstance(source, str) and source in PRESETS and not os.path.exists(source):
        config = PRESETS[source]
        with torch.device(device):
            torch.manual_seed(seed)
            module = Gemma(config)  # initialised: random matrices, norms at 0 (a scale of 1)
        module = module.to(dtype).eval()
    else:
        ckpt = checkpoints.read(source, variant=variant)
        tok = tok or ckpt.tokenizer
        module = checkpoints.build(ckpt, dtype=dtype, device=device, progress=progress)
        config = ckpt.config
    if tok is not None:
        tok.family = config.family
        if tok.vocab_size > config.vocab_size:
            raise TokenizerError(f"the tokenizer has {tok.vocab_size} tokens but the model's embedding has {config.vocab_size} rows")
    return LM(module, tok, source=str(source))


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]
