"""`gemmakit eval`: score a model on a task and write the results JSON."""

from __future__ import annotations

import json
import math
import time


def register(subparsers) -> None:
    from ..cli.options import add_model_args
    from . import TASKS

    p = subparsers.add_parser("eval", help="evaluate a model on a benchmark task",
                              description="Evaluate a model: mmlu, mc (a JSONL of question/choices/answer), gsm8k, "
                                          "humaneval, perplexity, memorization (text files) or bbh (BIG-bench source tasks "
                                          "of BBH's 23, from the bigbench sdist: --data).")
    add_model_args(p)
    p.add_argument("--task", "-t", required=True, choices=TASKS)
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (mmlu 5, gsm8k 8, bbh 3, mc 0 by default)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--per-subject", type=int, default=None,
                   help="mmlu: the N questions of each subject after its few-shot examples (a stratified slice); "
                        "bbh: the first N items of each subtask")
    p.add_argument("--data", nargs="+", default=None,
                   help="data files: the JSONL for mc, text files for perplexity/memorization, "
                        "the bigbench==1.0.0 sdist (or its unpacked folder) for bbh, "
                        "or a replacement for the packaged mmlu/gsm8k/humaneval set")
    p.add_argument("--samples", type=int, default=1, help="samples per item: maj@k for gsm8k, pass@k for humaneval")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature when --samples > 1")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", "-o", default=None,
                   help="results JSON; an interrupted run with the same settings resumes from it")
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    import torch

    from ..cli.options import load_model
    from . import run, shards

    if args.threads:
        torch.set_num_threads(args.threads)
    ranks = shards.join()  # under torchrun: this process's share of the items
    try:
        if ranks.size > 1 and args.device == "cuda":
            args.device = f"cuda:{ranks.local_rank}"
        start = time.perf_counter()
        lm = load_model(args, progress=ranks.main)
        load_seconds = time.perf_counter() - start
        results = run(lm, args.task, output=args.output, shots=args.shots, limit=args.limit, data=args.data,
                      samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, seed=args.seed, per_subject=args.per_subject, shards=ranks)
    finally:
        shards.leave()
    if results is None:  # a rank other than 0: rank 0 reports
        return 0
    summary = {k: v for k, v in results.items() if k != "records"}
    summary["timings"] = {**summary["timings"], "load_seconds": round(load_seconds, 2)}
    for name, m in results["metrics"].items():
        err = "" if math.isnan(m["stderr"]) else f" ± {m['stderr']:.4f}"
        print(f"{results['task']} {name}: {m['value']:.4f}{err}")
    print(json.dumps(summary["timings"]))
    return 0
