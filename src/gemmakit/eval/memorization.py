"""The Gemma reports' memorization test on documents given as files.

Each document is cut into consecutive spans of prefix + suffix tokens (50 + 50 by default). The
model continues the prefix greedily for as many tokens as the suffix has; the span is memorized
exactly when the continuation equals the suffix, and approximately when their token edit distance
is within 10% of the suffix length.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from ..lm import LM
from ..runtime.sampling import Sampling
from .task import Task, limit_items


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


class Memorization(Task):
    name = "memorization"
    primary = "exact"
    metric_keys = ("exact", "approximate")

    def __init__(self, lm, items: list[dict], settings: dict, tolerance: float, batch_size: int):
        super().__init__(items, settings)
        self.lm, self.tolerance, self.batch_size = lm, tolerance, batch_size

    def score(self, items: list[dict]) -> list[dict]:
        # The model without its tokenizer takes and returns token ids (no text round trip); no stop
        # ids, so every continuation is as long as its suffix.
        outs = LM(self.lm.module, None).generate([x["prefix"] for x in items], max_new_tokens=len(items[0]["suffix"]),
                                sampling=Sampling(), stop_ids=[], max_batch=self.batch_size)
        tok = self.lm.tokenizer
        records = []
        for x, ids in zip(items, outs):
            got = list(ids)
            dist = edit_distance(got, x["suffix"])
            records.append({"file": x["file"], "start": x["start"], "prompt": tok.decode(x["prefix"][1:]),
                            "target": tok.decode(x["suffix"]), "generation": tok.decode(got), "edit_distance": dist,
                            "exact": float(got == x["suffix"]),
                            "approximate": float(dist <= self.tolerance * len(x["suffix"])),
                            "score": float(got == x["suffix"])})
        return records


def memorization(lm, files: list[str | os.PathLike], prefix: int = 50, suffix: int = 50, tolerance: float = 0.1,
                 limit: int | None = None, batch_size: int = 8) -> Memorization:
    if lm.tokenizer is None:
        raise DataError("the memorization test needs a model with a tokenizer")
    items = []
    for f in files:
        path = Path(f)
        try:
            ids = lm.tokenizer.encode(path.read_text(encoding="utf-8"), add_bos=False)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from None
        if len(ids) < prefix + suffix:
            raise DataError(f"{path}: {len(ids)} tokens, fewer than prefix + suffix = {prefix + suffix}")
        for s in range(0, len(ids) - prefix - suffix + 1, prefix + suffix):
            items.append({"file": str(path), "start": s, "prefix": [lm.tokenizer.bos_id] + ids[s:s + prefix],
                          "suffix": ids[s + prefix:s + prefix + suffix]})
    if not items:
        raise DataError("the memorization test needs at least one document (--data FILE ...)")
    settings = {"files": [str(f) for f in files], "prefix": prefix, "suffix": suffix, "tolerance": tolerance,
                "limit": limit}
    return Memorization(lm, limit_items(items, limit), settings, tolerance, batch_size)
