"""Speed of a model on this machine: `gemmakit bench [--model M] [--quantize int8]`.

Every figure runs the generation engine the way users do (`lm.engine`; `Engine.add` prefills,
`Engine.step` decodes), so it measures what `LM.generate` and the server get:
- prefill: tokens/s to fill the cache with a prompt of `prefill_tokens` tokens;
- decode b1 / b16: new tokens/s (all streams together) at batch 1 and with 16 streams;
- load: seconds from nothing to a model ready to run (reading, converting or the cache);
- generate b1 / b16 / prefill: the same through `lm.generate`, as a user's call gets them (128
  tokens after a 32-token prompt; 16 prompts of 32 tokens, 64 new each; the 512-token prompt);
- peak RSS: the process's high-water mark of resident memory, load included.
`benchmarks/bench.py` runs the same measurement next to llama.cpp and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from .runtime.engine import Engine

PREFILL_TOKENS = 512
DECODE_TOKENS = 64
GENERATE_TOKENS = 128  # lm.generate at batch 1


def bench_prompt(vocab_size: int, n: int) -> list[int]:
    """<bos> and n fixed, ordinary token ids (no special ones): the same in every run and engine."""
    return [2] + [1000 + (i * 7919) % (vocab_size - 2000) for i in range(n)]


def measure(lm, prefill_tokens: int = PREFILL_TOKENS, decode_tokens: int = DECODE_TOKENS,
            batch_sizes: tuple[int, ...] = (1, 16)) -> dict:
    """prefill_tok_s, decode_b{n}_tok_s for each n in batch_sizes, peak_rss_mb and the sizes used."""
    prompt = bench_prompt(lm.config.vocab_size, prefill_tokens)
    out = {"prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens}

    engine = Engine(lm.module, None, max_batch=1, max_len=prefill_tokens + 2)  # prefill is eager in every mode
    kv = engine.cache.nbytes()
    engine.add(prompt[:9], max_new_tokens=1)  # warm-up: first calls allocate and pick kernels
    engine.step()
    start = time.perf_counter()
    engine.add(prompt, max_new_tokens=1)  # prefills all but the last prompt token
    sync(lm.device)  # a GPU's prefill is queued, not done, when add returns (steps sync on their tokens)
    out["prefill_tok_s"] = prefill_tokens / (time.perf_counter() - start)
    engine.step()

    for n in batch_sizes:
        engine = lm.engine(max_batch=n, max_len=32 + decode_tokens + 4)
        engine.decode_step.wait()  # the default mode's compiled step, where it is compiling in the background
        kv = max(kv, engine.cache.nbytes())
        for row in range(n):
            engine.submit(prompt[row:row + 32], max_new_tokens=decode_tokens + 4)
        for _ in range(3):  # warm-up steps (the first admits every stream)
            engine.step()
        start = time.perf_counter()
        for _ in range(decode_tokens):
            engine.step()
        out[f"decode_b{n}_tok_s"] = n * decode_tokens / (time.perf_counter() - start)

    # What a user's call gets, end to end: lm.generate (its engine kept between calls; warmed up
    # first, as a second call of a session finds it). Each timed call has a prompt of its own: a
    # prompt the kept engine has seen would skip its prefill.
    other = [prompt[0]] + [t + 1 for t in prompt[1:]]  # ordinary ids too, sharing only <bos>
    for max_batch, max_len in ((1, 32 + GENERATE_TOKENS), (16, 32 + 64), (1, prefill_tokens + 1)):
        lm.prepare(max_batch, max_len)
    lm.generate(prompt[:32], max_new_tokens=GENERATE_TOKENS, stop_ids=[])
    start = time.perf_counter()
    lm.generate(other[:32], max_new_tokens=GENERATE_TOKENS, stop_ids=[])  # never stops early
    out["generate_b1_tok_s"] = GENERATE_TOKENS / (time.perf_counter() - start)
    lm.generate([prompt[row:row + 32] for row in range(16)], max_new_tokens=64, stop_ids=[])
    start = time.perf_counter()
    lm.generate([other[row:row + 32] for row in range(16)], max_new_tokens=64, stop_ids=[])
    out["generate_b16_tok_s"] = 16 * 64 / (time.perf_counter() - start)
    lm.generate(prompt, max_new_tokens=1, stop_ids=[])
    start = time.perf_counter()
    lm.generate(other, max_new_tokens=1, stop_ids=[])  # the prompt's prefill and one step
    out["generate_prefill_tok_s"] = prefill_tokens / (time.perf_counter() - start)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["kv_mb"] = kv / 2**20  # the largest cache the run held
    return out


def sync(device: torch.device) -> None:
    """Waits for the device's queued work, so that a clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    from .cli.options import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm = load_model(args, progress=not args.json)
    result = {"model": str(lm.source), "dtype": str(lm.dtype).removeprefix("torch."), "quantize": lm.quantization,
              "compile": lm.compile.value,
              "threads": torch.get_num_threads(), "load_s": time.perf_counter() - start,
              "weights_mb": lm.nbytes() / 2**20}
    if lm.quantization == "int8":
        from . import kernels

        result["int8_kernel"] = kernels.describe()
    result.update(measure(lm, args.prefill_tokens, args.decode_tokens, tuple(args.batch_sizes)))
    result["rss_ratio"] = result["peak_rss_mb"] / (result["weights_mb"] + result["kv_mb"])
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model        {result['model']}  ({result['dtype']}{', ' + result['quantize'] if result['quantize'] else ''}, "
          f"compile {result['compile']}, "
          f"{result['threads']} threads, {result['weights_mb']:.0f} MiB of weights)")
    if "int8_kernel" in result:
        print(f"int8 kernel  {result['int8_kernel']}")
    print(f"prefill      {result['prefill_tok_s']:8.1f} tok/s  ({result['prefill_tokens']} tokens)")
    for n in args.batch_sizes:
        print(f"decode b{n:<3} {result[f'decode_b{n}_tok_s']:8.1f} tok/s" + (f"  ({n} streams, total)" if n > 1 else ""))
    print(f"lm.generate  {result['generate_b1_tok_s']:8.1f} tok/s at batch 1, {result['generate_b16_tok_s']:.1f} with 16 "
          f"streams, prefill {result['generate_prefill_tok_s']:.1f} tok/s")
    print(f"load         {result['load_s']:8.2f} s")
    print(f"peak RSS     {result['peak_rss_mb']:8.0f} MiB  ({result['rss_ratio']:.2f}x weights + KV cache)")
    return 0


def register(subparsers) -> None:
    from .cli.options import add_model_args

    p = subparsers.add_parser("bench", help="measure prefill, decode (batch 1 and 16), load time and memory")
    add_model_args(p)
    p.add_argument("--threads", type=_positive, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--prefill-tokens", type=_positive, default=PREFILL_TOKENS)
    p.add_argument("--decode-tokens", type=_positive, default=DECODE_TOKENS, help="decode steps timed per batch size")
    p.add_argument("--batch-sizes", type=_sizes, default=[1, 16], help="comma-separated (default: 1,16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _sizes(text: str) -> list[int]:
    return [_positive(t) for t in text.split(",")]
