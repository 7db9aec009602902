"""The decode step compiled ahead of time (AOTInductor): `Compile.AOT` (steps.py).

A `torch.compile`d step still runs Python every token: Dynamo's guards, the code that gathers the
~400 weight tensors, and a Python wrapper that calls each kernel. At batch 1 on the default model
that is ~3.5 of ~21 ms (benchmarks/aoti_decode_step.py). Here the same step is exported once
(batch and cache span as dynamic dims), compiled to a shared library with a C++ wrapper, and called
with the model's own weights and the engine's own cache tensors as its constants (user-managed:
no copy; its writes land in the engine's cache). A package depends only on the shapes (config,
weight dtypes, the cache's rows and length) and on gemmakit's code, not on the weights, so it is
cached on disk by them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from .. import kernels
from ..config import LayerKind
from ..errors import GenerationError
from ..model import Gemma, KVCache
from ..model.quantized import mode_of
from ..paths import atomic_path, cache_dir, fingerprint

_PACKAGE = Path(__file__).parent.parent
# What a package compiles: an edited or upgraded gemmakit gets a new one.
_TRACED = [_PACKAGE / f for f in ("runtime/aot.py", "model/gemma.py", "model/masks.py", "model/cache.py",
                                  "model/quantized.py", "kernels/__init__.py")]


class _Step(nn.Module):
    """model(tokens, positions, cache) with the cache's tensors as buffers, the batch taken from
    `tokens` (rows [0, B) of the cache) and the span from `span`'s length."""

    def __init__(self, module: Gemma, cache: KVCache):
        super().__init__()
        self.model = module
        self.cache = cache  # its layout; the step reads and writes its tensors through the buffers
        for i, (k, v) in enumerate(zip(cache.k, cache.v)):
            self.register_buffer(f"k{i}", k)
            self.register_buffer(f"v{i}", v)
        for kind, table in cache.pos.items():
            self.register_buffer(f"pos_{kind.value}", table)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        B, n = tokens.shape[0], len(self.cache.k)
        view = self.cache.over([getattr(self, f"k{i}")[:B] for i in range(n)],
                               [getattr(self, f"v{i}")[:B] for i in range(n)],
                               {kind: getattr(self, f"pos_{kind.value}")[:B] for kind in self.cache.pos},
                               extent=span.shape[0])
        return self.model(tokens, positions, view, last_only=True)


class AOTDecode:
    """Calls the compiled step for a span; `usable(span)` says whether one covers it.
    programs: (runner, lowest span, highest span) each."""

    def __init__(self, programs: list[tuple[object, int, int]]):
        self.programs = programs
        top = max((hi for _, _, hi in programs), default=0)
        self._marker = torch.empty(top)  # its first `span` elements carry the span as a shape

    def _runner(self, span: int):
        return next((r for r, lo, hi in self.programs if lo <= span <= hi), None)

    def usable(self, span: int) -> bool:
        return self._runner(span) is not None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        return self._runner(span)(tokens, positions, self._marker[:span])


def _key(step: _Step) -> str:
    shapes = {n: (list(t.shape), str(t.dtype)) for n, t in step.state_dict().items()}
    return fingerprint(_TRACED, step.model.config.to_dict(), shapes, torch.__version__,
                       torch.backends.cpu.get_cpu_capability())


def build(module: Gemma, cache: KVCache) -> AOTDecode:
    """The step for this model and cache: read from the on-disk cache, or exported and compiled
    (about a minute a program for the default model) and stored there."""
    if cache.k[0].device.type != "cpu":
        raise GenerationError("compile='aot' builds the decode step for the CPU; use compile='torch' on other devices")
    ring, top = cache.length(LayerKind.SLIDING), cache.max_len - 1
    if ring < 4:
        raise GenerationError(f"compile='aot' needs a cache of at least 4 positions, got {cache.max_len}")
    step = _Step(module, cache)
    # One program for spans short of the sliding layers' ring, where those layers read `span`
    # slots, and one from the ring on, where they read all of it: a range that reaches a length
    # (ring, max_len) pins min(length, span) to one side. The one step at span max_len is eager.
    ranges = [(2, ring - 1)] + ([(ring, top)] if top > ring else [])
    key = _key(step)
    if mode_of(module) == "int8":
        kernels.extension()  # registers the int8 op the packages call
    state = dict(step.named_parameters()) | dict(step.named_buffers())
    programs = []
    for lo, hi in ranges:
        path = cache_dir() / "aot" / (f"decode-{key}.pt2" if lo == 2 else f"decode-{key}-from{lo}.pt2")
        if not path.is_file():
            _compile(step, cache.batch_size, lo, hi, path)
        runner = torch._inductor.aoti_load_package(str(path))
        runner.load_constants({n: state[n] for n in runner.get_constant_fqns()}, check_full_update=True,
                              user_managed=True)
        programs.append((runner, lo, hi))
    return AOTDecode(programs)


def _compile(step: _Step, max_batch: int, lo: int, hi: int, path: Path) -> None:
    from torch.export import Dim

    print(f"gemmakit: compiling the decode step ahead of time (once for these shapes, about a minute): {path}",
          file=sys.stderr, flush=True)
    batch = 2 if max_batch > 1 else 1
    example = (torch.full((batch, 1), 3), torch.full((batch, 1), 2), torch.empty(min(lo + 1, hi)))
    dims = {"tokens": {0: Dim("batch", min=1, max=max_batch)} if max_batch > 1 else None,
            "span": {0: Dim("span", min=lo, max=hi)}}
    dims["positions"] = dims["tokens"]
    with torch.inference_mode():
        step(*example)  # eager once: binds the int8 kernel's op, which tracing only reads
    program = torch.export.export(step, example, dynamic_shapes=dims, strict=False)
    with atomic_path(path) as tmp:  # a later run never loads half a package
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
