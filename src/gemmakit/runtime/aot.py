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

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import kernels
from ..config import GemmaConfig, LayerKind
from ..errors import GenerationError
from ..model import Gemma, KVCache
from ..model.quantized import Quantization, mode_of, quantization_of, quantized_skeleton
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
        n = len(self.cache.k)
        view = self.cache.over([getattr(self, f"k{i}") for i in range(n)], [getattr(self, f"v{i}") for i in range(n)],
                               {kind: getattr(self, f"pos_{kind.value}") for kind in self.cache.pos},
                               rows=tokens.shape[0], extent=span.shape[0])
        return self.model(tokens, positions, view, last_only=True, decode=True)


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


def _plan(module: Gemma, cache: KVCache) -> tuple[_Step, list[tuple[int, int, Path]]]:
    """The step, and the programs it needs: (lowest span, highest span, package path) each."""
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
    return step, [(lo, hi, cache_dir() / "aot" / (f"decode-{key}.pt2" if lo == 2 else f"decode-{key}-from{lo}.pt2"))
                  for lo, hi in ranges]


def build(module: Gemma, cache: KVCache, compile_missing: bool = True) -> AOTDecode | None:
    """The step for this model and cache: read from the on-disk cache, or exported and compiled
    (about a minute a program for the default model) and stored there; compile_missing=False:
    None unless every program is on disk already."""
    step, plan = _plan(module, cache)
    missing = [(lo, hi, path) for lo, hi, path in plan if not path.is_file()]
    if missing and not compile_missing:
        return None
    for lo, hi, path in missing:
        _compile(step, cache.batch_size, lo, hi, path)
    if mode_of(module) == "int8":
        kernels.extension()  # registers the int8 op the packages call
    state = dict(step.named_parameters()) | dict(step.named_buffers())
    return AOTDecode([(_Program(path, state), lo, hi) for lo, hi, path in plan])


class _Program:
    """One package, run through torch's own loader (torch._C._aoti) directly. The Python wrapper
    torch returns from aoti_load_package costs a start ~3 s on 2 cores (importing torch.export and
    probing the CPU's vector units by compiling and loading test programs, which only ever warns:
    our key holds the CPU's capability) and every step a parse of the package's call spec."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor]):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        constants = {n: state[n] for n in self.loader.get_constant_fqns()}
        # (use_inactive, check_full_update, user_managed: the engine's own tensors, no copy)
        self.loader.load_constants(constants, False, True, True)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        return self.loader.boxed_run([tokens, positions, span])[0]


class Background:
    """The programs for a model and cache compiled by another process, while this one decodes
    eagerly. A package depends on shapes and code, not on weights, so that process builds them on
    a model of the same shapes with no weights read, and leaves them in the on-disk cache: a run
    that ends first still has them next time. `ready()` loads them once they are all there."""

    STALE = 30 * 60  # seconds after which another process's build is taken to have died

    def __init__(self, module: Gemma, cache: KVCache):
        self.module, self.cache = module, cache
        _, plan = _plan(module, cache)
        self.paths = [path for _, _, path in plan]
        self.lock = self.paths[0].with_suffix(".building")
        self.process = None
        self.failed = False
        self._checks = 0
        # A core is the compiler's meanwhile, ours or another process's. Every op's threads wait
        # for the slowest of them, so with the compiler preempting one of two threads a decode
        # step ran ~50x slower (1.2 vs 58 tokens/s, 2 cores): this process gives up a thread
        # until the programs are there.
        self._threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self._threads - 1))
        if self._someone_else_building():
            return
        spec = {"config": module.config.to_dict(), "quantization": _quantization(module), "lock": str(self.lock),
                "dtype": str(module.dtype).removeprefix("torch."),
                "kv_dtype": str(cache.k[0].dtype).removeprefix("torch."), "batch": cache.batch_size, "max_len": cache.max_len}
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        log = self.lock.with_suffix(".log")
        print(f"gemmakit: compiling the decode step for these shapes in the background (once; a minute or two, "
              f"cached in {self.lock.parent}); decoding eagerly meanwhile", file=sys.stderr, flush=True)
        with open(log, "w") as out:
            # Its own session: the build finishes and is cached even when this process ends first.
            self.process = subprocess.Popen([sys.executable, "-m", "gemmakit.runtime.aot", json.dumps(spec)],
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=os.environ | {"TORCHINDUCTOR_COMPILE_THREADS": "1"})
        self.lock.write_text(str(self.process.pid))

    def _someone_else_building(self) -> bool:
        try:
            return time.time() - self.lock.stat().st_mtime < self.STALE
        except FileNotFoundError:
            return False

    def ready(self, now: bool = False) -> AOTDecode | None:
        """The compiled step once every program is on disk (checked every 16 calls, or now), else None."""
        self._checks += 1
        if self.failed or (self._checks % 16 and not now):
            return None
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                return None  # still compiling (its packages are whole once it has exited)
            self.process = None
            if code != 0:
                warnings.warn(f"gemmakit: the background compile failed (exit {code}; see "
                              f"{self.lock.with_suffix('.log')}); decoding stays eager", stacklevel=3)
                self.lock.unlink(missing_ok=True)
        elif not self._built() and self._someone_else_building():
            return None  # another process's build, still going
        # Done, one way or the other: a build that failed or died leaves this engine eager.
        torch.set_num_threads(self._threads)
        self.failed = not self._built()
        return None if self.failed else build(self.module, self.cache, compile_missing=False)

    def _built(self) -> bool:
        return all(p.is_file() for p in self.paths)


def _quantization(module: Gemma) -> dict | None:
    q = quantization_of(module)
    return None if q is None else {"mode": q.mode, "group_size": q.group_size}


def _background_main(spec: dict) -> None:
    """`python -m gemmakit.runtime.aot SPEC`: compiles the packages a Background asked for."""
    config = GemmaConfig.from_dict(spec["config"])
    dtype = getattr(torch, spec["dtype"])
    q = spec["quantization"]
    if q is not None:
        module = quantized_skeleton(config, Quantization(q["mode"], q["group_size"], dtype))
    else:
        with torch.device("meta"):
            module = Gemma(config).to(dtype)
    # Shapes and dtypes only: a package holds no weights (tracing's one eager step reads these
    # uninitialised values; what it computes is thrown away).
    module = module.to_empty(device="cpu").eval()
    try:
        build(module, KVCache(config, spec["batch"], spec["max_len"], dtype=getattr(torch, spec["kv_dtype"])))
    finally:
        Path(spec["lock"]).unlink(missing_ok=True)


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


if __name__ == "__main__":
    os.nice(19)  # the foreground process decodes meanwhile: the cores are its first
    torch.set_num_threads(1)
    _background_main(json.loads(sys.argv[1]))
