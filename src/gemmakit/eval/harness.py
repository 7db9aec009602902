"""Runs a task over its items: progress bar, one record per item, resumable results file.

While a run is going, each finished record is appended to `<output>.partial.jsonl` (its first line
holds the settings); a run started again with the same settings skips the items found there. The
final results JSON is written to a temp file and renamed, and the partial file removed.

Under torchrun each rank scores its block of the items (`shards.py`) and keeps its own
`<output>.rank<R>-of-<N>.partial.jsonl`, so each shard resumes by itself; rank 0 gathers the
records and writes the one results file, the same as one process would.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from ..paths import atomic_path
from .shards import Shards, done, gather


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate(lm, task, output: str | os.PathLike | None = None, progress: bool = True,
             shards: Shards = Shards()) -> dict | None:
    """Scores `task` (see gemmakit.eval.tasks) with `lm`; returns the results dict it also writes to `output`.

    Results: task, score, stderr, metrics (each with its stderr), settings, timings, records.
    With several `shards` (shards.join() under torchrun) this rank scores its block only; rank 0
    returns and writes the results of all of them, the others return None.
    """
    settings = {"task": task.name, "model": getattr(lm, "source", ""), **_weights(lm), **task.settings,
                "n_items": len(task.items)}
    # A shard's file says which block it holds, so a run split another way does not resume from it.
    shard_settings = settings if shards.size == 1 else {**settings, "shard": shards.rank, "shards": shards.size}
    mine = shards.block(len(task.items))
    records: dict[int, dict] = {}
    partial = _partial_path(output, shards) if output is not None else None
    if partial is not None and partial.is_file():
        records = _resume(partial, shard_settings)
    elif partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"settings": shard_settings}) + "\n")
    todo = [i for i in mine if i not in records]
    log = partial.open("a") if partial is not None else None
    bar = tqdm(total=len(mine), initial=len(records), desc=task.name, unit="item",
               disable=not (progress and shards.main))
    try:
        for s in range(0, len(todo), task.batch_size):
            batch = todo[s:s + task.batch_size]
            start = time.perf_counter()
            new = task.score([task.items[i] for i in batch])
            seconds = (time.perf_counter() - start) / len(batch)
            for i, rec in zip(batch, new):
                rec = {"index": i, **rec, "seconds": round(seconds, 4)}
                records[i] = rec
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
            if log is not None:
                log.flush()
            bar.update(len(batch))
            bar.set_postfix_str(_postfix(task, records))
    finally:
        bar.close()
        if log is not None:
            log.close()

    kept = f"{output}.rank*-of-{shards.size}.partial.jsonl" if output is not None else "no file (no output given)"
    gathered = gather(records, shards, kept)
    results = None if gathered is None else _results(task, settings, gathered, shards.size)
    if results is not None and output is not None:
        with atomic_path(output) as tmp:
            tmp.write_text(json.dumps(results, indent=1))
    done(shards, kept)  # a shard's file goes only once the results that hold it are written
    if partial is not None:
        partial.unlink()
    return results


def _results(task, settings: dict, records: dict[int, dict], processes: int) -> dict:
    ordered = [records[i] for i in range(len(task.items))]
    metrics = task.summarize(ordered)
    primary = metrics[task.primary]
    total = sum(r["seconds"] for r in ordered)  # summed over the processes
    return {
        "task": task.name,
        "score": primary["value"],
        "stderr": primary["stderr"],
        "metric": task.primary,
        "metrics": metrics,
        "settings": settings,
        "timings": {"eval_seconds": round(total, 2), "items_per_second": round(len(ordered) / total, 3) if total else None,
                    "processes": processes},
        "records": ordered,
    }


def _partial_path(output, shards: Shards) -> Path:
    if shards.size == 1:
        return Path(str(output) + ".partial.jsonl")
    return Path(f"{output}.rank{shards.rank}-of-{shards.size}.partial.jsonl")


def _weights(lm) -> dict:
    """How the weights are held: a float32 run must not resume an int8 one of the same checkpoint."""
    if not hasattr(lm, "module"):
        return {}
    return {"dtype": str(lm.dtype).removeprefix("torch."), "quantize": lm.quantization}


def _resume(partial: Path, settings: dict) -> dict[int, dict]:
    lines = partial.read_text().splitlines()
    try:
        head = json.loads(lines[0])["settings"]
    except (IndexError, KeyError, ValueError):
        raise DataError(f"{partial}: not a gemmakit partial results file; delete it to start over") from None
    if head != settings:
        diff = sorted(k for k in set(head) | set(settings) if head.get(k) != settings.get(k))
        raise DataError(f"{partial}: an interrupted run with other settings ({', '.join(diff)}); "
                         "delete it or choose another --output")
    records = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:  # the line being written when the run was killed
            continue
        records[rec["index"]] = rec
    # Rewrite without a torn last line, so appending goes on from a clean state.
    partial.write_text("".join(json.dumps(x) + "\n" for x in [{"settings": settings}, *records.values()]))
    return records


def _postfix(task, records: dict) -> str:
    vals = [r["score"] for r in records.values()]
    return f"{task.primary}={sum(vals) / len(vals):.3f}" if vals else ""
