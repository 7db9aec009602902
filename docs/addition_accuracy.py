"""Greedy exact-match accuracy of a model on addition prompts (docs/make_addition_data.py): the
share whose first 4 new tokens, up to a newline, are the sum (the reward `rewards.py:exact`).

    python docs/addition_accuracy.py MODEL runs/addition/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time

import gemmakit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args(argv)
    with open(args.prompts) as f:
        records = [json.loads(line) for line in f if line.strip()]
    lm = gemmakit.load(args.model, quantize=None, compile="eager", tokenizer=args.tokenizer, progress=False)
    start = time.perf_counter()
    said = lm.generate([r["prompt"] for r in records], max_new_tokens=4, stop=["\n"], temperature=0.0)
    right = sum(re.match(r"\d*", s.strip()).group() == r["answer"] for s, r in zip(said, records))
    print(json.dumps({"model": args.model, "prompts": args.prompts, "right": right, "of": len(records),
                      "accuracy": right / len(records), "generate_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
