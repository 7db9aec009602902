"""gemmakit: Google's Gemma models in PyTorch. `gemmakit.load(source)` is the way in."""

from __future__ import annotations

from .config import PRESETS, GemmaConfig
from .errors import (
           CheckpointError,
           ConfigError,
           GemmaError,
           GenerationError,
           TokenizerError,
)
from .lm import LM, load
from .model import Gemma
from .runtime.sampling import Sampling
from .runtime.steps import Compile
from .tokenizer import Tokenizer

__all__ = ["load", "LM", "Gemma", "GemmaConfig", "PRESETS", "Tokenizer", "Sampling", "Compile", "GemmaError",
           "ConfigError", "CheckpointError", "TokenizerError", "GenerationError"]
