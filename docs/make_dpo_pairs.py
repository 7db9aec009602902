"""Builds preference pairs for DPO offline, on a task with a checkable answer: two-digit
addition asked in chat. The chosen answer is the sum; the rejected one is the model's own sampled
answer (temperature 1, seeded), the first of up to four samples that is wrong; a prompt the model
always answers right is dropped. Also prints the model's greedy accuracy on the prompts.

    python docs/make_dpo_pairs.py MODEL OUT.jsonl [--n 160]
"""

import argparse
import json
import random
import re

import gemmakit

QUESTION = "What is {a} + {b}? Reply with the number only."


def correct(text: str, answer: int) -> bool:
    found = re.search(r"-?\d+", text.replace(",", ""))
    return found is not None and int(found.group()) == answer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=160)
    args = parser.parse_args()
    rng = random.Random(0)
    problems = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(args.n)]
    lm = gemmakit.load(args.model, quantize=None, compile="eager", progress=False)
    messages = [[{"role": "user", "content": QUESTION.format(a=a, b=b)}] for a, b in problems]
    ids = [lm.tokenizer.chat_ids(m) for m in messages]
    greedy = lm.generate(ids, max_new_tokens=8, temperature=0.0)
    print(f"greedy accuracy {sum(correct(t, a + b) for t, (a, b) in zip(greedy, problems)) / len(problems):.3f}")
    rejected: dict[int, str] = {}
    for round in range(4):
        todo = [i for i in range(len(problems)) if i not in rejected]
        if not todo:
            break
        texts = lm.generate([ids[i] for i in todo], max_new_tokens=8, temperature=1.0, seed=round)
        for i, text in zip(todo, texts):
            a, b = problems[i]
            if text.strip() and not correct(text, a + b) and text.strip() != str(a + b):
                rejected[i] = text.strip()
    with open(args.out, "w") as f:
        for i in sorted(rejected):
            a, b = problems[i]
            f.write(json.dumps({"messages": messages[i], "chosen": str(a + b), "rejected": rejected[i]}) + "\n")
    print(f"{len(rejected)} pairs of {len(problems)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
