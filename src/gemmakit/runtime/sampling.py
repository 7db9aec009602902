"""How the next token is chosen: `Sampling` (a value) and `next_tokens`, the batched chooser.

Each row of a batch has its own Sampling and its own `torch.Generator`, so a seeded request
draws the same tokens whatever else shares the batch with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import kernels
from ..config import check_fields
from ..errors import GenerationError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; top_k/top_p/min_p/seed are then unused).

    The filters apply in Hugging Face's order: repetition_penalty, temperature, top_k, top_p, min_p.
    - top_k: keep the k most likely tokens.
    - top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
    - min_p: keep tokens at least min_p times as likely as the most likely one.
    - repetition_penalty: logits of tokens already in the context (prompt and output) are divided
      by it when positive and multiplied by it when negative (greedy rows too).
    - seed: seeds this request's own generator; None draws one from torch's global generator, so
      `torch.manual_seed` makes unseeded runs repeatable too.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, rule: str):
            raise GenerationError(f"sampling field {field} must be {rule}, got {getattr(self, field)!r}")

        def number(field: str) -> bool:
            v = getattr(self, field)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(field: str) -> bool:
            v = getattr(self, field)
            return isinstance(v, int) and not isinstance(v, bool)

        if not number("temperature") or self.temperature < 0:
            bad("temperature", "a number >= 0 (0 is greedy)")
        if self.top_k is not None and (not integer("top_k") or self.top_k < 1):
            bad("top_k", "a positive integer or None")
        if self.top_p is not None and (not number("top_p") or not 0 < self.top_p <= 1):
            bad("top_p", "in (0, 1] or None")
        if self.min_p is not None and (not number("min_p") or not 0 <= self.min_p <= 1):
            bad("min_p", "in [0, 1] or None")
        if self.repetition_penalty is not None and (not number("repetition_penalty") or self.repetition_penalty <= 0):
            bad("repetition_penalty", "a number > 0 or None")
        if self.seed is not None and (not integer("seed") or not 0 <= self.seed < 2**64):
            bad("seed", "an integer in [0, 2**64) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> Sampling:
        check_fields(Sampling, changes, GenerationError, "sampling field")
        return dataclasses.replace(self, **changes)


GREEDY = Sampling()


def make_generator(sampling: Sampling, device: str | torch.device = "cpu") -> torch.Generator | None:
    """The request's own random generator (None for greedy requests, which draw nothing)."""
    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))
    return torch.Generator(device=device).manual_seed(seed)


def next_tokens(logits: torch.Tensor, samplings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None] | None = None,
                contexts: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
    """Last-position logits (B, V) -> the next token of every row (B,) long.

    Row i uses samplings[i], draws with generators[i] (from `make_generator`) and, for
    repetition_penalty, penalizes the token ids in contexts[i]. Greedy rows cost one batched
    argmax; only rows that sample or penalize get a float32 copy of their own logits.
    """
    # The first of equal maxima, as torch's argmax: gemmakit's kernel where it is loaded, else
    # max's indices (argmax's in 60-70% of its time over 262k logits).
    tokens = kernels.argmax(logits)
    if tokens is None:
        tokens = logits.max(dim=-1).indices  # (B,)
    for i, s in enumerate(samplings):
        if s.greedy and s.repetition_penalty is None:
            continue
        row = logits[i].float()  # (V,); the same tensor when logits are float32: never modified in place
        if s.repetition_penalty is not None and contexts is not None and contexts[i]:
            row = _penalize(row, contexts[i], s.repetition_penalty)
        if s.greedy:
            tokens[i] = row.argmax()
            continue
        generator = generators[i] if generators is not None else None
        tokens[i] = _draw(row / s.temperature, s, generator)
    return tokens


def _penalize(row: torch.Tensor, context: Sequence[int], penalty: float) -> torch.Tensor:
    ids = torch.as_tensor(context, dtype=torch.long, device=row.device).unique()
    seen = row[ids]
    row = row.clone()
    row[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return row


def _draw(row: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if s.top_k is None and s.top_p is None:
        probs = row.softmax(-1)  # (V,)
        if s.min_p is not None:
            probs = probs.masked_fill(probs < s.min_p * probs.max(), 0.0)
        return torch.multinomial(probs, 1, generator=generator)[0]
    if s.top_k is not None:
        values, ids = row.topk(min(s.top_k, row.shape[-1]))  # (k,), sorted, most likely first
    else:
        values, ids = row.sort(descending=True)
    probs = values.softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if s.top_p is not None:
        # A token stays while the tokens before it have not yet reached top_p (the first always stays).
        keep &= probs.cumsum(-1) - probs < s.top_p
    if s.min_p is not None:
        keep &= probs >= s.min_p * probs[0]
    choice = torch.multinomial(probs.masked_fill(~keep, 0.0), 1, generator=generator)
    return ids[choice[0]]
