"""How the next token is chosen: `Sampling` (a value), `next_tokens` (the batched chooser) and
`token_logprobs` (what the server reports as logprobs).

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


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """A dict or (id, bias) pairs -> sorted (id, float bias) pairs; GenerationError on a bad entry."""
    try:
        pairs = dict(value.items() if isinstance(value, dict) else value)
    except (TypeError, ValueError):
        raise GenerationError(f"sampling field logit_bias must be a dict of token id -> bias, got {value!r}") from None
    for token, bias in pairs.items():
        if not (isinstance(token, int) and not isinstance(token, bool) and token >= 0):
            raise GenerationError(f"sampling field logit_bias: token ids must be integers >= 0, got {token!r}")
        if not (isinstance(bias, (int, float)) and not isinstance(bias, bool) and -100 <= bias <= 100):
            raise GenerationError(f"sampling field logit_bias: the bias of token {token} must be a number in "
                                  f"[-100, 100], got {bias!r}")
    return tuple(sorted((token, float(bias)) for token, bias in pairs.items()))


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; top_k/top_p/min_p/seed are then unused).

    Applied in this order (the penalties and the bias on greedy rows too, before the argmax):
    - repetition_penalty (Hugging Face's): logits of tokens already in the context (prompt and
      output) are divided by it when positive and multiplied by it when negative.
    - frequency_penalty, presence_penalty (OpenAI's, in [-2, 2]): logit[j] -= frequency_penalty *
      count[j] + presence_penalty * (count[j] > 0), count[j] being token j's count in the output so
      far (not the prompt). Negative values encourage repetition.
    - logit_bias (OpenAI's): logit[j] += bias[j], biases in [-100, 100]; -100 all but bans a
      token, 100 all but forces it. Given as a dict {token id: bias} or (id, bias) pairs, kept as
      sorted pairs so that the value stays hashable. The engine checks the ids against the vocabulary.
    - temperature, then the filters: top_k keeps the k most likely tokens; top_p the smallest set
      of most likely tokens whose probability reaches top_p; min_p the tokens at least min_p times
      as likely as the most likely one.
    - seed: seeds this request's own generator; None draws one from torch's global generator, so
      `torch.manual_seed` makes unseeded runs repeatable too.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
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
        for field in ("presence_penalty", "frequency_penalty"):
            if not number(field) or not -2 <= getattr(self, field) <= 2:
                bad(field, "a number in [-2, 2]")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.seed is not None and (not integer("seed") or not 0 <= self.seed < 2**64):
            bad("seed", "an integer in [0, 2**64) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether a penalty or a bias changes the logits (a greedy row then leaves the batched argmax)."""
        return bool(self.repetition_penalty is not None or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias)

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


History = tuple[Sequence[int], Sequence[int]]  # (prompt ids, output ids so far)


def next_tokens(logits: torch.Tensor, samplings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None] | None = None,
                histories: Sequence[History | None] | None = None,
                allowed: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Last-position logits (B, V) -> the next token of every row (B,) long.

    Row i uses samplings[i] and draws with generators[i] (from `make_generator`); histories[i],
    (prompt_ids, output_ids), feeds its penalties (None: no penalty); allowed[i], a bool (V,)
    tensor such as a grammar's `Constraint.mask`, sets every token it marks False to -inf before
    anything else, so greedy rows and sampled rows alike choose among the allowed tokens only.
    Greedy rows with nothing to adjust cost one batched argmax; sampled rows with nothing to
    adjust, no top_k and no top_p one batched draw in gemmakit's kernel (kernels.draw) where it is
    built; only the other rows get a float32 copy of their own logits, one at a time (a row of
    Gemma's 262k logits, and what sampling makes of it, stays in a CPU core's cache, where a batch
    of them would not).
    """
    masks = allowed if allowed is not None else [None] * len(samplings)
    plain = [s.greedy and mask is None and not s.adjusts_logits for s, mask in zip(samplings, masks)]
    if any(plain):
        # The first of equal maxima, as torch's argmax: gemmakit's kernel where it is loaded, else
        # max's indices (argmax's in 60-70% of its time over 262k logits).
        tokens = kernels.argmax(logits)
        if tokens is None:
            tokens = logits.max(dim=-1).indices  # (B,)
    else:  # every row is sampled or adjusted: no argmax of all of them for nothing
        tokens = torch.zeros(len(samplings), dtype=torch.long, device=logits.device)
    # Sampled rows without a mask, an adjustment, top_k or top_p: drawn together by the kernel
    # where it is loaded (a row in ~0.1 ms, against ~0.5 in torch ops), straight from the logits.
    gens = generators if generators is not None else [None] * len(samplings)
    done, uniforms = set(), {}
    fast = [i for i, (s, mask) in enumerate(zip(samplings, masks))
            if not s.greedy and mask is None and not s.adjusts_logits and s.top_k is None and s.top_p is None]
    if fast:
        u = torch.stack([torch.rand((), dtype=torch.float64, generator=gens[i], device=logits.device) for i in fast])
        drawn = kernels.draw(logits, torch.tensor(fast), u,
                             torch.tensor([min(1 / samplings[i].temperature, 1e30) for i in fast], dtype=torch.float32),
                             torch.tensor([samplings[i].min_p or 0.0 for i in fast], dtype=torch.float32))
        if drawn is not None and bool((drawn >= 0).all()):
            tokens[fast] = drawn.to(tokens.device)
            done = set(fast)
        else:  # the torch path draws them below, with the same uniforms
            uniforms = dict(zip(fast, u))
    for i, s in enumerate(samplings):
        mask = masks[i]
        if plain[i] or i in done:
            continue
        # (V,) float32; a copy of its own only where it is changed below: the caller's logits stay as they are
        row = logits[i].to(torch.float32, copy=mask is not None or s.adjusts_logits)
        if mask is not None:
            if not mask.any():
                raise GenerationError(f"row {i}: its allowed mask allows no token")
            row.masked_fill_(~mask, -math.inf)
        if s.adjusts_logits:
            _adjust_(row, s, histories[i] if histories is not None else None)
        if s.greedy:
            tokens[i] = row.argmax()
            continue
        generator = generators[i] if generators is not None else None
        # A tiny temperature overflows logits / T to inf (softmax: NaN), or is 0 in float32: in
        # float64, shifted by the maximum first, every value is <= 0 and the largest is 0.
        t = s.temperature
        scaled = row if t == 1 else row / t if t >= _TINY_TEMPERATURE else (row.double() - row.max()) / t
        tokens[i] = _draw(scaled, s, generator, uniforms.get(i))
    return tokens


_TINY_TEMPERATURE = 1e-4  # logits / T stays finite above it for any logit float32 holds below 1e34


def _adjust_(row: torch.Tensor, s: Sampling, history: History | None) -> None:
    """Applies the penalties and the bias to `row` in place, in Sampling's order."""
    if history is not None:
        prompt, output = history
        if s.repetition_penalty is not None and (prompt or output):
            ids = torch.as_tensor([*prompt, *output], dtype=torch.long, device=row.device).unique()
            seen = row[ids]
            # Beyond [1e-30, 1e30] a float32 logit overflows (inf, or 0 * inf = NaN); the choice is the same.
            penalty = min(max(s.repetition_penalty, 1e-30), 1e30)
            row[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
        if (s.frequency_penalty or s.presence_penalty) and output:
            ids, counts = torch.as_tensor(output, dtype=torch.long, device=row.device).unique(return_counts=True)
            row[ids] -= s.frequency_penalty * counts + s.presence_penalty
    if s.logit_bias:
        if s.logit_bias[-1][0] >= row.shape[-1]:  # sorted: the last id is the largest
            raise GenerationError(f"logit_bias token id {s.logit_bias[-1][0]} is outside the vocabulary "
                                  f"(0..{row.shape[-1] - 1})")
        ids, biases = zip(*s.logit_bias)
        row[torch.tensor(ids, device=row.device)] += torch.tensor(biases, device=row.device)


def _draw(row: torch.Tensor, s: Sampling, generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor:
    if s.top_k is None and s.top_p is None:
        probs = row.softmax(-1)  # (V,)
        if s.min_p is not None:
            probs = probs.masked_fill(probs < s.min_p * probs.max(), 0.0)
        return draw(probs, generator, u)
    if s.top_k is not None:
        values, ids = row.topk(min(s.top_k, row.shape[-1]))  # (k,), sorted, most likely first
    else:
        values, ids = row.sort(descending=True)
    probs = values.softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if s.top_p is not None:
        # A token stays while the tokens before it have not yet reached top_p (the first always stays).
        keep &= probs.cumsum(-1) - probs < s.top_p
        keep[0] = True  # also when top_p rounds to 0 in float32
    if s.min_p is not None:
        keep &= probs >= s.min_p * probs[0]
    return ids[draw(probs.masked_fill(~keep, 0.0), generator)]


def draw(probs: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token drawn from `probs` (V,), >= 0, not necessarily normalised: the first index
    whose cumulative probability exceeds a uniform draw in [0, total).

    One random number a draw, where torch.multinomial races V exponential variates (about 20 ms
    a row of Gemma's 262k tokens on a CPU core: far more than the decode step's share of a row at
    batch 64). The cumulative sum is float64, so no token's share is lost to rounding.
    """
    cdf = probs.double().cumsum(-1)  # (V,)
    total = cdf[-1]
    if u is None:  # (the caller may have drawn it: the kernel's path, kernels.draw, was not taken)
        u = torch.rand((), dtype=torch.float64, generator=generator, device=probs.device)
    u = u * total
    u = torch.minimum(u, torch.nextafter(total, total.new_zeros(())))  # rand * total may round up to total
    return torch.searchsorted(cdf, u, right=True)  # zero-probability tokens own an empty interval


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor | Sequence[int],
                   top_n: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
    """Logits (B, V) and the token chosen in each row (B,) -> per row (the chosen token's logprob,
    the top_n most likely (id, logprob), most likely first).

    The logprobs are the model's own (vLLM's default "raw logprobs"): the logits as the model
    returns them (after its final soft-cap), before any penalty, bias, mask or temperature, in
    float32.
    """
    if not (isinstance(top_n, int) and top_n >= 0):
        raise GenerationError(f"top_n must be an integer >= 0, got {top_n!r}")
    logprobs = logits.float().log_softmax(-1)  # (B, V)
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()  # (B,)
    if not top_n:
        return [(c, []) for c in chosen]
    values, ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)  # (B, top_n)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]
