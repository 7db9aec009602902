"""Decode speed deep into a conversation: the int8 default model at batch 1 with a long prompt,
each `--compile` mode side by side in one process (same prompt, same tokens checked).

    python benchmarks/long_decode.py [--prompt-tokens 1100] [--steps 64] [--modes aot,eager,aot]

Past the sliding layers' ring (1,024 positions for the default model) the AOT engine runs its
second program (src/gemmakit/runtime/aot.py); the first run of a mode compiles its packages.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import gemmakit
from gemmakit.checkpoints.default import default_model_source
from gemmakit.runtime.engine import Engine

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gpl3_preamble.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=1100)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--modes", default="aot,eager,aot", help="comma-separated: eager, torch, aot")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = gemmakit.load(default_model_source(False), quantize="int8", compile=None, progress=False)
    ids = lm.tokenizer.encode(TEXT.read_text())
    ids = (ids * (args.prompt_tokens // len(ids) + 1))[:args.prompt_tokens]
    outputs = {}
    print("| mode | decode steps | spans | tok/s |\n|---|---|---|---|")
    for mode in args.modes.split(","):
        engine = Engine(lm.module, lm.tokenizer, max_batch=1, max_len=args.max_len, compile=mode)
        request = engine.add(ids, max_new_tokens=args.steps)
        engine.step()  # the prompt and the first token
        start, n = time.perf_counter(), 0
        while engine.requests:
            engine.step()
            n += 1
        rate = n / (time.perf_counter() - start)
        print(f"| {mode} | {n} | {len(ids) + 1}-{len(ids) + n} | {rate:.1f} |")
        outputs[mode] = request.output_ids
    same = len({tuple(o) for o in outputs.values()}) == 1
    print("same tokens in every mode" if same else f"TOKENS DIFFER: {outputs}")


if __name__ == "__main__":
    main()
