"""The decode step in its three modes: one batched forward of one new token per active row.

- `Compile.EAGER`: the module as it is.
- `Compile.TORCH`: `Gemma.forward` under torch.compile. A decode step runs the same few hundred
  small ops every token; compiled, most of their Python and dispatch cost goes. Prefill (a few
  large ops per chunk) stays eager.
- `Compile.AOT`: the step compiled ahead of time with AOTInductor (aot.py): no Python left in it.

`gemmakit.load(..., compile=)` fixes the mode of a model's engines; `DecodeStep` runs it.
"""

from __future__ import annotations

import enum
import functools

import torch

from ..config import LayerKind
from ..errors import ConfigError
from ..model import Gemma, KVCache


class Compile(str, enum.Enum):
    EAGER = "eager"
    TORCH = "torch"
    AOT = "aot"

    @classmethod
    def of(cls, value: Compile | str | None) -> Compile:
        """The mode a user's value names: None is eager."""
        if value is None:
            return cls.EAGER
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"compile must be one of {', '.join(m.value for m in cls)} (or None), "
                              f"got {value!r}") from None


class DecodeStep:
    """`step(tokens, positions, end)`: tokens and positions (n, 1) of the first n rows of `cache`,
    every position below `end` -> logits (n, V) of each row's next token."""

    def __init__(self, module: Gemma, cache: KVCache, mode: Compile = Compile.EAGER):
        self.module, self.cache, self.mode = module, cache, mode
        self._forward = functools.partial(compiled_forward(), module) if mode is Compile.TORCH else module
        self.aot = None
        if mode is Compile.AOT:
            from . import aot

            self.aot = aot.build(module, cache)
            cache.reset()  # building ran the step once on rows 0-1

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, end: int) -> torch.Tensor:
        view = self.cache.rows_view(0, tokens.shape[0]).reserve(end)
        span = self.cache.span(LayerKind.GLOBAL)  # slots the step reads: the global layers' (the ring's follow)
        if self.aot is not None and self.aot.usable(span):
            return self.aot(tokens, positions, span)[:, -1]  # (n, V)
        return self._forward(tokens, positions, view, last_only=True)[:, -1]


@functools.lru_cache(maxsize=None)
def compiled_forward():
    """`Gemma.forward` under torch.compile, called with the module as its first argument: one
    compiled function for every engine (and no reference to any model kept here).

    Dynamic shapes: the batch and the cache's span change from step to step. The first steps of a
    process compile (about a minute on 2 cores; batch 1 and larger batches are two graphs), later
    processes read inductor's on-disk cache.
    """
    return torch.compile(Gemma.forward, dynamic=True)
