"""Perplexity and bits per byte of text files.

Each file is scored as one document (BOS, then its tokens) in disjoint windows that each start
from BOS (`Scorer.rolling`; lm-eval's loglikelihood_rolling for one window, see there). Bits per byte divides the summed negative log-likelihood by
the file's UTF-8 length, so tokenizers of different granularity compare.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import DataError
from .loglik import Scorer
from .task import Task, limit_items


class Perplexity(Task):
    name = "perplexity"
    primary = "bits_per_byte"

    def __init__(self, lm, items: list[dict], settings: dict, window: int):
        super().__init__(items, settings)
        self.lm, self.window, self.scorer = lm, window, Scorer(lm)

    def score(self, items: list[dict]) -> list[dict]:
        out = []
        for x in items:
            logprobs = self.scorer.rolling(self.lm.tokenizer.encode(x["text"]), window=self.window)
            nll = -sum(logprobs)
            nbytes = len(x["text"].encode("utf-8"))
            out.append({"file": x["file"], "tokens": len(logprobs), "bytes": nbytes, "nll": nll,
                        "perplexity": math.exp(nll / len(logprobs)), "score": nll / math.log(2) / nbytes})
        return out

    def summarize(self, records: list[dict]) -> dict:
        """Corpus-level: every token and byte of every file counts once (not a mean of files)."""
        nll = sum(r["nll"] for r in records)
        tokens, nbytes = sum(r["tokens"] for r in records), sum(r["bytes"] for r in records)
        return {"bits_per_byte": {"value": nll / math.log(2) / nbytes, "stderr": float("nan")},
                "perplexity": {"value": math.exp(nll / tokens), "stderr": float("nan")},
                "tokens": {"value": tokens, "stderr": float("nan")}}


def perplexity(lm, files: list[str | os.PathLike], limit: int | None = None, window: int = 1024) -> Perplexity:
    items = []
    for f in files:
        path = Path(f)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from None
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        items.append({"file": str(path), "text": text})
    if not items:
        raise DataError("perplexity needs at least one text file (--data FILE ...)")
    settings = {"files": [x["file"] for x in items], "limit": limit, "window": window}
    return Perplexity(lm, limit_items(items, limit), settings, window)
