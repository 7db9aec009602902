"""What each weight mode costs in quality, on the real Gemma 3 270M (the default model).

    python benchmarks/quality.py [--modes float32,default,bfloat16,int8,int4] [--threads 1]

Per mode: perplexity on tests/data/gpl3_preamble.txt (one window from BOS), top-1 agreement with
float32 on that text (teacher-forced), and greedy decoding on the five llama.cpp reference prompts
(tests/data/llamacpp_gemma3_270m.json, 32 tokens each), one at a time and all five at once: how
many tokens agree with float32's one-at-a-time greedy output before the first difference, and
with llama.cpp's. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def load(mode: str):
    """float32 (the exact mode), bfloat16, int8, int4, or default: `gemmakit.load(gguf)` with no
    arguments but compile=None (the weights a user's default mode runs; its compiled step gives
    the eager step's tokens, tests/test_aot.py)."""
    import gemmakit
    from gemmakit.checkpoints.default import default_model_path, default_model_source

    if mode == "default":
        return gemmakit.load(default_model_path(), compile=None, progress=False)
    source = default_model_source(progress=False)
    if mode in ("float32", "bfloat16"):
        return gemmakit.load(source, dtype=mode, quantize=None, compile=None, progress=False)
    return gemmakit.load(source, quantize=mode, compile=None, progress=False)


def greedy_ids(lm, prompts: list[list[int]], streams: int, n: int = 32) -> list[list[int]]:
    """n greedy tokens after each prompt, EOS not special-cased (as the llama.cpp reference),
    decoding `streams` prompts at a time (int8 picks its kernel by the number of rows)."""
    from gemmakit.runtime.engine import Engine

    out = []
    for i in range(0, len(prompts), streams):
        batch = prompts[i: i + streams]
        engine = Engine(lm.module, None, max_batch=len(batch), max_len=max(map(len, batch)) + n)
        requests = [engine.add(p, n) for p in batch]
        while engine.requests:
            engine.step()
        out += [r.output_ids for r in requests]
    return out


def prefix_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="float32,default,bfloat16,int8,int4")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reference = json.loads((DATA / "llamacpp_gemma3_270m.json").read_text())["results"]
    text = (DATA / "gpl3_preamble.txt").read_text()

    rows, base = [], None
    for mode in args.modes.split(","):
        lm = load(mode)
        ids = torch.tensor([lm.tokenizer.encode(text)])
        logits = lm.logits(ids[:, :-1])[0]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
        top1 = logits.argmax(-1)
        prompts = [r["prompt_token_ids"] for r in reference]
        greedy, together = greedy_ids(lm, prompts, 1), greedy_ids(lm, prompts, len(prompts))
        if base is None:
            base = {"nll": nll, "top1": top1, "greedy": greedy}
        rows.append((mode, math.exp(nll), math.exp(nll - base["nll"]) - 1, (top1 == base["top1"]).float().mean().item(),
                     sum(prefix_agreement(g, b) for g, b in zip(greedy, base["greedy"])),
                     sum(prefix_agreement(g, b) for g, b in zip(together, base["greedy"])),
                     sum(prefix_agreement(g, r["generated_token_ids"]) for g, r in zip(greedy, reference))))
        del lm
    n = 32 * len(reference)
    first = args.modes.split(",")[0]
    print(f"| mode | perplexity | vs {first} | top-1 agreement (teacher-forced) | "
          f"greedy tokens equal to {first}'s before the first difference (of {n}), one stream | "
          f"the same, {len(reference)} streams at once | one stream's equal to llama.cpp's (of {n}) |")
    print("|---|---|---|---|---|---|---|")
    for mode, ppl, rel, agree, same, same_together, same_llama in rows:
        print(f"| {mode} | {ppl:.3f} | {rel:+.2%} | {agree:.3f} | {same} | {same_together} | {same_llama} |")


if __name__ == "__main__":
    main()
