"""The decode step in its three modes: one batched forward of one new token per active row.

- `Compile.EAGER`: the module as it is.
- `Compile.TORCH`: `Gemma.forward` under torch.compile. A decode step runs the same few hundred
  small ops every token; compiled, most of their Python and dispatch cost goes. Prefill (a few
  large ops per chunk) stays eager.
- `Compile.AOT`: the step compiled ahead of time with AOTInductor (aot.py): no Python left in it.
  The engine waits for the compile (about a minute a program, once per shape; cached on disk).
- `Compile.AUTO`, the default: the AOT step for int8 models on the CPU (the fast mode), compiled
  by another process while this one decodes eagerly, and used from the step it is ready (at once
  when the disk cache has it); eager for every other model. GEMMAKIT_COMPILE=eager (or torch,
  aot) stands in for it, for machines that should not compile in the background.

`gemmakit.load(..., compile=)` fixes the mode of a model's engines; `DecodeStep` runs it.
"""

from __future__ import annotations

import enum
import functools
import os
import time

import torch

from ..config import LayerKind
from ..errors import ConfigError
from ..model import Gemma, KVCache
from ..model.quantized import mode_of


class Compile(str, enum.Enum):
    EAGER = "eager"
    TORCH = "torch"
    AOT = "aot"
    AUTO = "auto"

    @classmethod
    def of(cls, value: Compile | str | None) -> Compile:
        """The mode a user's value names: None is eager; "auto" is GEMMAKIT_COMPILE's where set."""
        if value is None:
            return cls.EAGER
        if value == "auto" and os.environ.get("GEMMAKIT_COMPILE"):
            value = os.environ["GEMMAKIT_COMPILE"]
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
        self.aot = None  # the compiled step, once there is one
        self.background = None  # an AUTO step's compile in another process, until it is ready
        if mode is Compile.AOT:
            from . import aot

            self.aot = aot.build(module, cache)
            cache.reset()  # building ran the step once on rows 0-1
        elif compiles_ahead(mode, module) and cache.length(LayerKind.SLIDING) >= 4:
            from . import aot

            self.aot = aot.build(module, cache, compile_missing=False)
            if self.aot is None:
                self.background = aot.Background(module, cache)

    def wait(self, poll: float = 0.5) -> None:
        """Blocks until a background compile has finished (the compiled step then runs), for
        measurements of the steady state."""
        while self.background is not None and self._poll(now=True):
            time.sleep(poll)

    def _poll(self, now: bool = False) -> bool:
        """Takes the background compile's step once it is there; whether it is still going."""
        self.aot = self.background.ready(now)
        if self.aot is not None or self.background.failed:
            self.background = None
        return self.background is not None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, end: int) -> torch.Tensor:
        if self.background is not None:
            self._poll()
        view = self.cache.rows_view(0, tokens.shape[0]).reserve(end)
        span = view.span(LayerKind.GLOBAL)  # slots the step reads: the global layers' (the ring's follow)
        if self.aot is not None and self.aot.usable(span):
            return self.aot(tokens, positions, span)[:, -1]  # (n, V)
        return self._forward(tokens, positions, view, last_only=True, decode=True)[:, -1]


def compiles_ahead(mode: Compile, module: Gemma) -> bool:
    """Whether engines of this mode and model run the AOT step (and so size their caches for it)."""
    return mode is Compile.AOT or (mode is Compile.AUTO and module.device.type == "cpu" and mode_of(module) == "int8")


@functools.lru_cache(maxsize=None)
def compiled_forward():
    """`Gemma.forward` under torch.compile, called with the module as its first argument: one
    compiled function for every engine (and no reference to any model kept here).

    Dynamic shapes: the batch and the cache's span change from step to step. The first steps of a
    process compile (about a minute on 2 cores; batch 1 and larger batches are two graphs), later
    processes read inductor's on-disk cache.
    """
    return torch.compile(Gemma.forward, dynamic=True)
