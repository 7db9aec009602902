"""A synthetic verifiable task for `gemmakit rl` and `gemmakit dpo`: 2-digit addition.

Writes to OUT:
  train.jsonl, heldout.jsonl      prompts {"prompt": "...12+34=", "answer": "46"}, no problem in both
  pairs-train.jsonl, pairs-heldout.jsonl
                                  DPO pairs {"prompt", "chosen", "rejected"} on the same prompts:
                                  chosen the right sum, rejected the model's own greedy answer
                                  when it is wrong, else the sum off by one (said per pair in
                                  "rejected_from": "model" or "off_by_one")
  rewards.py                      exact(): 1.0 when the completion's leading number is the sum
  stats.json                      the model's greedy exact-match accuracy on both prompt sets

Prompts are plain text (`<bos>` + prompt): a fixed three-example prefix, then "a+b=". The model's
answers come from gemmakit's batched generation (`lm.generate` on the list of prompts, greedy,
4 new tokens, stopping at a newline).

    python docs/make_addition_data.py --out runs/addition [--model /work/peers/gemma3-270m-hf]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import gemmakit

SHOTS = ((23, 45), (71, 16), (38, 57))
PREFIX = "".join(f"{a}+{b}={a + b}\n" for a, b in SHOTS)
REWARDS = '''"""Reward of the addition task (docs/make_addition_data.py): 1.0 when the completion's
leading number is the right sum ("46", "46\\n..." but not "461" or " 4 6"), else 0.0."""

import re


def exact(prompts, completions, answer, **fields):
    return [float(re.match(r"\\d*", c.strip()).group() == a) for c, a in zip(completions, answer)]
'''


def leading_number(text: str) -> str:
    return re.match(r"\d*", text.strip()).group()


def problems(n_train: int, n_heldout: int, seed: int) -> tuple[list, list]:
    pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if (a, b) not in SHOTS]
    random.Random(seed).shuffle(pool)
    return pool[:n_train], pool[n_train:n_train + n_heldout]


def prompt_record(a: int, b: int) -> dict:
    return {"prompt": f"{PREFIX}{a}+{b}=", "answer": str(a + b)}


def pair_record(record: dict, said: str) -> dict:
    right = record["answer"]
    if said and said != right:
        rejected, source = said, "model"
    else:
        rejected, source = str(int(right) + 1), "off_by_one"
    return {"prompt": record["prompt"], "chosen": right, "rejected": rejected, "rejected_from": source}


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="/work/peers/gemma3-270m-hf")
    p.add_argument("--tokenizer", default=None, help="for a model folder without one")
    p.add_argument("--train", type=int, default=320, help="training prompts (and pairs)")
    p.add_argument("--heldout", type=int, default=100, help="held-out prompts (and pairs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = args.model  # a GemmaConfig .json: random weights, to try the script in seconds
    if source.endswith(".json") and Path(source).is_file():
        source = gemmakit.GemmaConfig.from_dict(json.loads(Path(source).read_text()))
    lm = gemmakit.load(source, quantize=None, compile="eager", tokenizer=args.tokenizer, progress=False)
    stats = {"model": args.model, "prefix": PREFIX}
    for name, split in zip(("train", "heldout"), problems(args.train, args.heldout, args.seed)):
        records = [prompt_record(a, b) for a, b in split]
        start = time.perf_counter()
        said = [leading_number(t) for t in lm.generate([r["prompt"] for r in records], max_new_tokens=4,
                                                       stop=["\n"], temperature=0.0)]
        pairs = [pair_record(r, s) for r, s in zip(records, said)]
        write_jsonl(out / f"{name}.jsonl", records)
        write_jsonl(out / f"pairs-{name}.jsonl", pairs)
        stats[name] = {"prompts": len(records), "greedy_accuracy": sum(s == r["answer"] for s, r in zip(said, records)) / len(records),
                       "rejected_from_model": sum(q["rejected_from"] == "model" for q in pairs),
                       "generate_s": round(time.perf_counter() - start, 1)}
    (out / "rewards.py").write_text(REWARDS)
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
