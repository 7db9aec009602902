"""Evaluation: multiple choice by log-likelihood (MMLU, user JSONL), GSM8K, HumanEval in a sandbox,
perplexity, the memorization test, and a bridge to EleutherAI's lm-eval.

    results = gemmakit.eval.run(lm, "mmlu", shots=5, limit=100, output="mmlu.json")
"""

from __future__ import annotations

import os

from ..errors import DataError
from .harness import evaluate, mean_stderr

TASKS = ("mmlu", "mc", "gsm8k", "humaneval", "perplexity", "memorization", "bbh")

__all__ = ["run", "make_task", "evaluate", "mean_stderr", "TASKS"]


def make_task(lm, task: str, shots: int | None = None, limit: int | None = None, data: list | None = None,
              samples: int = 1, temperature: float | None = None, max_new_tokens: int | None = None,
              batch_size: int = 8, seed: int = 0, per_subject: int | None = None):
    """The task named `task` over its data; `data` is a file list for mc, perplexity and memorization,
    the bigbench sdist (or its files) for bbh, or replaces the packaged set of mmlu, gsm8k and
    humaneval; per_subject slices mmlu and bbh (see mc.mmlu, bbh.bbh)."""
    from . import bbh, gsm8k, humaneval, mc, memorization, perplexity

    if lm.tokenizer is None:
        raise DataError(f"task {task!r} needs a model with a tokenizer (pass --tokenizer / tokenizer=)")
    if per_subject is not None and task not in ("mmlu", "bbh"):
        raise DataError(f"per_subject (--per-subject) slices mmlu and bbh only, not {task!r}")
    files = [os.fspath(f) for f in data or []]
    one = files[0] if files else None
    gen = {k: v for k, v in (("temperature", temperature), ("max_new_tokens", max_new_tokens)) if v is not None}
    if task == "mmlu":
        return mc.mmlu(lm, shots=5 if shots is None else shots, limit=limit, path=one, per_subject=per_subject)
    if task == "mc":
        if len(files) != 1:
            raise DataError("the mc task needs one JSONL file: --data FILE")
        return mc.jsonl_mc(lm, one, shots=shots or 0, limit=limit)
    if task == "gsm8k":
        return gsm8k.gsm8k(lm, shots=8 if shots is None else shots, limit=limit, path=one, samples=samples,
                           batch_size=batch_size, seed=seed, **gen)
    if task == "humaneval":
        return humaneval.humaneval(lm, limit=limit, path=one, samples=samples, batch_size=batch_size, seed=seed, **gen)
    if task == "perplexity":
        return perplexity.perplexity(lm, files, limit=limit)
    if task == "bbh":
        if len(files) > 1:
            raise DataError("bbh reads one bigbench sdist or folder: --data bigbench-1.0.0.tar.gz")
        return bbh.bbh(lm, one, shots=3 if shots is None else shots, limit=limit, per_subject=per_subject,
                       batch_size=batch_size, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    if task == "memorization":
        return memorization.memorization(lm, files, limit=limit, batch_size=batch_size)
    raise DataError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def run(lm, task: str, output: str | os.PathLike | None = None, progress: bool = True, shards=None,
        **options) -> dict | None:
    """Builds the task (see make_task for the options) and evaluates it; the results dict (None on
    ranks other than 0 when `shards`, from shards.join(), splits the items over processes)."""
    from .shards import Shards

    return evaluate(lm, make_task(lm, task, **options), output=output, progress=progress, shards=shards or Shards())
