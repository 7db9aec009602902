"""How much of a compiled batch-1 decode step is Python: the same step under torch.compile and
compiled ahead of time with AOTInductor (C++ wrapper, no Dynamo guards, no Python between the
kernels), taking turns in one process: what `--compile aot` (gemmakit.runtime.aot) saves a step. The step
is the engine's own, here with fixed shapes (batch 1, attention over 511 of 512 cache slots) and
its own copy of the cache and the weights, so that both compilers get the same graph.

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

import gemmakit
from gemmakit import kernels
from gemmakit.checkpoints.default import default_model_source
from gemmakit.model import KVCache
from gemmakit.runtime.aot import _Step

MAX_LEN = 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = gemmakit.load(default_model_source(progress=False), quantize="int8", compile=None, progress=False)
    model = lm.module.eval()
    assert kernels.extension() is not None, "the int8 kernel did not build"
    step = _Step(model, KVCache(model.config, 1, MAX_LEN, dtype=torch.float32))  # the engine's AOT step
    inputs = (torch.tensor([[100]]), torch.tensor([[40]]), torch.empty(MAX_LEN - 1))  # span: all but one slot
    with torch.inference_mode():
        step(*inputs)  # eager once: binds the kernel's op, which tracing only reads

    start = time.perf_counter()
    program = torch.export.export(step, inputs, strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "step.pt2"))
        aot = torch._inductor.aoti_load_package(path)
    print(f"export + AOTInductor compile: {time.perf_counter() - start:.0f} s")
    compiled = torch.compile(step, dynamic=False)
    times = {"torch.compile": [], "AOTInductor": []}
    with torch.inference_mode():
        print(f"max |logit difference|: {(aot(*inputs) - compiled(*inputs)).abs().max().item():.2e}")
        for _ in range(args.steps):
            for name, fn in (("torch.compile", compiled), ("AOTInductor", aot)):
                t = time.perf_counter()
                fn(*inputs)
                times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:14} median {statistics.median(ts[10:]) * 1e3:.2f} ms a step")


if __name__ == "__main__":
    main()
