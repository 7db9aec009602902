"""How much of a compiled batch-1 decode step is Python: the same step under torch.compile and
compiled ahead of time with AOTInductor (C++ wrapper, no Dynamo guards, no Python between the
kernels), taking turns in one process. A measurement for the next step of issue 4, not a feature:
the AOT step here has fixed shapes (batch 1, attention over all 512 cache slots) and keeps its own
copy of the cache and the weights.

    python benchmarks/aoti_decode_step.py [--threads 2] [--steps 200]

Needs a C++ compiler and about a minute to compile.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gemmakit import kernels, quantize
from gemmakit.cache import KVCache
from gemmakit.default_model import default_model_source

MAX_LEN = 512


class DecodeStep(torch.nn.Module):
    """model(tokens, positions, cache) with the cache's tensors as buffers, so that export sees
    the writes into them as buffer mutations."""

    def __init__(self, model, cache: KVCache):
        super().__init__()
        self.model, self.cache = model, cache
        for i, t in enumerate(cache.k):
            self.register_buffer(f"k{i}", t)
        for i, t in enumerate(cache.v):
            self.register_buffer(f"v{i}", t)
        for s, t in cache.pos.items():
            self.register_buffer(f"pos{int(s)}", t)

    def forward(self, tokens, positions):
        c = self.cache
        c.k = [getattr(self, f"k{i}") for i in range(len(c.k))]
        c.v = [getattr(self, f"v{i}") for i in range(len(c.v))]
        c.pos = {s: getattr(self, f"pos{int(s)}") for s in list(c.pos)}
        c.reserve(MAX_LEN)  # attention over every slot: fixed shapes
        return self.model(tokens, positions, c, last_only=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = quantize.load(default_model_source(progress=False), "int8", progress=False)
    model = lm.module.eval()
    assert kernels.extension() is not None, "the int8 kernel did not build"
    step = DecodeStep(model, KVCache(model.config, 1, MAX_LEN, dtype=torch.float32))
    tokens, positions = torch.tensor([[100]]), torch.tensor([[40]])
    with torch.inference_mode():
        step(tokens, positions)  # eager once: binds the kernel's op, which tracing only reads

    start = time.perf_counter()
    program = torch.export.export(step, (tokens, positions), strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "step.pt2"))
        aot = torch._inductor.aoti_load_package(path)
    print(f"export + AOTInductor compile: {time.perf_counter() - start:.0f} s")
    compiled = torch.compile(step, dynamic=False)
    times = {"torch.compile": [], "AOTInductor": []}
    with torch.inference_mode():
        print(f"max |logit difference|: {(aot(tokens, positions) - compiled(tokens, positions)).abs().max().item():.2e}")
        for _ in range(args.steps):
            for name, fn in (("torch.compile", compiled), ("AOTInductor", aot)):
                t = time.perf_counter()
                fn(tokens, positions)
                times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:14} median {statistics.median(ts[10:]) * 1e3:.2f} ms a step")


if __name__ == "__main__":
    main()
