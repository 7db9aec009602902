"""The model: the transformer of every family (gemma.py), masks per layer kind (masks.py), the KV
cache (cache.py), the quantized modules (quantized.py) and the training head's loss (loss.py).
No I/O, sampling or tokenizer here."""

from .cache import KVCache
from .gemma import Gemma

__all__ = ["Gemma", "KVCache"]
