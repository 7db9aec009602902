"""Rollout speed of a GRPO step: sampled tokens/s of P prompts x k samples x N tokens, gemmakit's
engine (what `gemmakit rl` calls: train/rollout.py) against trl's generation with transformers
(GRPOTrainer without vLLM: `model.generate` on the prompts repeated k times, left-padded, with
the GenerationConfig trl builds), on the same model, in the same run, timed in alternation.

    python benchmarks/rollout_speed.py [--model /work/peers/gemma3-270m-hf] [--prompts 8]
        [--samples 8] [--tokens 64] [--threads 2] [--repeats 2] [--dtypes float32 bfloat16]

Every completion runs its N tokens (no stop token on either side), so both sides sample the
same number of tokens. Both sample at temperature 1 with nothing else (trl's defaults).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import gemmakit
from gemmakit.runtime.sampling import Sampling
from gemmakit.train import rollout


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def questions(n: int) -> list[str]:
    return [f"Question: what is {10 + 7 * i} + {31 + 5 * i}?\nAnswer:" for i in range(n)]


def ours(lm, texts: list[str], k: int, n: int) -> tuple[int, float]:
    prompts = [rollout.Prompt(t, lm.tokenizer.encode(t, add_bos=True)) for t in texts]
    seeds = [[rollout.sample_seed(0, 0, i, j) for j in range(k)] for i in range(len(prompts))]
    start = time.perf_counter()
    groups = rollout.generate(lm.module, lm.tokenizer, prompts, k, n, Sampling(temperature=1.0), seeds, stop_ids=())
    seconds = time.perf_counter() - start
    return sum(len(r.output_ids) for g in groups for r in g), seconds


def theirs(model, tokenizer, texts: list[str], k: int, n: int) -> tuple[int, float]:
    import transformers

    ids = [tokenizer.encode(t, add_bos=True) for t in texts for _ in range(k)]  # trl repeats each prompt k times
    width = max(map(len, ids))
    pad = 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding, as trl's
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    # GRPOTrainer's generation_kwargs (trl 1.16, no vLLM), its defaults; eos None runs all n tokens
    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=True, pad_token_id=pad, bos_token_id=2,
                                           eos_token_id=None, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
                                           repetition_penalty=1.0, cache_implementation=None, disable_compile=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    seconds = time.perf_counter() - start
    return out[:, width:].numel(), seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/peers/gemma3-270m-hf", help="a Hugging Face folder both sides read")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    texts = questions(args.prompts)
    print(f"CPU: {cpu_name()}, {args.threads} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"{args.prompts} prompts x {args.samples} samples x {args.tokens} tokens, temperature 1")
    rows = []
    for dtype in args.dtypes:
        lm = gemmakit.load(args.model, quantize=None, compile=None, dtype=dtype, progress=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).eval()
        best = {"gemmakit": 0.0, "trl": 0.0}
        for _ in range(args.repeats):  # alternation: load from other processes falls on both alike
            for name in best:
                tokens, seconds = (ours(lm, texts, args.samples, args.tokens) if name == "gemmakit" else
                                   theirs(hf, lm.tokenizer, texts, args.samples, args.tokens))
                best[name] = max(best[name], tokens / seconds)
                print(f"  {dtype:<9} {name:<9} {tokens} tokens in {seconds:6.1f} s: {tokens / seconds:7.1f} tokens/s",
                      flush=True)
        rows.append((dtype, best["gemmakit"], best["trl"]))
    print("\n| weights | gemmakit engine tokens/s | trl + transformers generate tokens/s | ratio |")
    print("|---|---|---|---|")
    for dtype, a, b in rows:
        print(f"| {dtype} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    if len(rows) > 1:
        print(f"\ngemmakit in {rows[-1][0]} against trl in {rows[0][0]} (its default on a CPU): "
              f"{rows[-1][1] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
