"""The decode step compiled ahead of time (AOTInductor), for `Engine(..., compile="aot")`.

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

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import kernels, quantize
from .cache import KVCache
from .model import Gemma

_TRACED = ("aot.py", "model.py", "cache.py", "quantize.py", "kernels/__init__.py")  # what a package compiles


class _Step(nn.Module):
    """model(tokens, positions, cache) with the cache's tensors as buffers, the batch taken from
    `tokens` (rows [0, B) of the cache) and the span from `span`'s length."""

    def __init__(self, module: Gemma, cache: KVCache):
        super().__init__()
        self.model = module
        self.shell = object.__new__(KVCache)  # tracing writes into this one, never the engine's
        self.shell.__dict__.update(cache.__dict__)
        for i, (k, v) in enumerate(zip(cache.k, cache.v)):
            self.register_buffer(f"k{i}", k)
            self.register_buffer(f"v{i}", v)
        for sliding, table in cache.pos.items():
            self.register_buffer(f"pos{int(sliding)}", table)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        B, c = tokens.shape[0], self.shell
        c.k = [getattr(self, f"k{i}")[:B] for i in range(len(c.k))]
        c.v = [getattr(self, f"v{i}")[:B] for i in range(len(c.v))]
        c.pos = {s: getattr(self, f"pos{int(s)}")[:B] for s in list(c.pos)}
        c.rows = torch.arange(B, device=tokens.device)[:, None]
        c._extent = [span.shape[0]]
        c._reserved = True
        return self.model(tokens, positions, c, last_only=True)


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
    # The package is these files compiled: an edited or upgraded gemmakit gets a new one.
    here = Path(__file__).parent
    code = [hashlib.sha256((here / f).read_bytes()).hexdigest() for f in _TRACED]
    text = json.dumps([step.model.config.to_dict(), shapes, torch.__version__, code,
                       torch.backends.cpu.get_cpu_capability()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(module: Gemma, cache: KVCache) -> AOTDecode:
    """The step for this model and cache: read from the on-disk cache, or exported and compiled
    (about a minute a program for the default model) and stored there."""
    from .default_model import cache_dir
    from .errors import GenerationError

    if cache.k[0].device.type != "cpu":
        raise GenerationError("compile='aot' builds the decode step for the CPU; use compile=True on other devices")
    if min(cache.max_len, cache.ring) < 4:
        raise GenerationError(f"compile='aot' needs a cache of at least 4 positions, got {cache.max_len}")
    step = _Step(module, cache)
    # One program for spans short of the sliding layers' ring, where those layers read `span`
    # slots, and one from the ring on, where they read all of it: a range that reaches a length
    # (ring, max_len) pins min(length, span) to one side. The one step at span max_len is eager.
    ring, top = min(cache.max_len, cache.ring), cache.max_len - 1
    ranges = [(2, ring - 1)] + ([(ring, top)] if top > ring else [])
    key = _key(step)
    if quantize.mode_of(module) == "int8":
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{os.getpid()}-{path.name}")
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                             inductor_configs={"aot_inductor.package_constants_in_so": False})
    os.replace(tmp, path)  # a later run never loads half a package
