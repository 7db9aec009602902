"""The generation engine: requests in the slots of one KV cache, decoded together one token a step.

    engine = lm.engine(max_batch=8)          # or Engine(lm.module, lm.tokenizer, ...)
    request = engine.submit(prompt_ids, max_new_tokens=64, sampling=Sampling(temperature=0.7, seed=1))
    while engine.busy:
        for delta in engine.step():
            print(delta.text, end="")

Every `step` does three things, in order: admit (waiting requests move into free slots, their
prompts prefilled: all but the last token, at most `prefill_budget` prompt tokens a step, at least
one request), decode (one batched forward feeds each active request its latest token at its own
position; DecodeStep, in the model's compile mode), update (sample, stop, release text; a finished
request leaves at once and its slot is free for the next). `add` admits one request at once
instead of at the next step, for callers that want its prefill done when it returns.

A freed slot keeps its keys and values: a later prompt that starts with the same tokens (the next
turn of a conversation) prefills only what is new (`Request.reused` counts the tokens it skipped;
the rule is `KVCache.reusable`'s).

An engine is not thread-safe: drive submit/step/cancel from one thread (a server's scheduler loop).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch

from ..errors import GenerationError
from ..model import Gemma, KVCache
from ..tokenizer import Tokenizer
from .sampling import GREEDY, Sampling, make_generator, next_tokens
from .steps import Compile, DecodeStep
from .text import TextStream

_PROMPT_CONTEXT = 4  # prompt tokens decoded with the output so that its first piece keeps its leading space


@dataclass(eq=False)
class Request:
    """One generation. Read-only for callers; the engine fills in what follows `stop_strings`."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    output_ids: list[int] = field(default_factory=list)  # every sampled token, a final stop id included
    text: str = ""  # the text released so far (pieces joined); all of it once finished
    # "stop" (stop id or string), "length", "cancelled", or "error" (its prefill raised, and so did `step`)
    finish_reason: str | None = None
    reused: int = 0  # prompt tokens whose keys and values were already in the slot

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated_ids(self) -> list[int]:
        """The output without a final stop id: the tokens the text was decoded from."""
        if self.output_ids and self.output_ids[-1] in self.stop_ids:
            return self.output_ids[:-1]
        return self.output_ids


class Delta(NamedTuple):
    """What one step did for one request: the token it sampled and the text that became final."""

    request: Request
    token_id: int
    text: str  # "" while text is held back (an unfinished character, a possible stop string)

    @property
    def finished(self) -> bool:
        return self.request.finished


@dataclass(eq=False)
class _Row:
    """The engine's own state of a request while it decodes in a row of the cache."""

    request: Request
    length: int  # tokens in the cache
    next: int  # the token the next step feeds, at position `length`
    generator: torch.Generator | None
    text: TextStream | None


class Engine:
    def __init__(self, module: Gemma, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None, compile: Compile | str | None = None,
                 prefill_budget: int | None = None):
        """max_len: tokens per request, prompt and output (default: the model's context); the
        cache holds max_batch of them. prefill_budget: prompt tokens admitted per step (None: as
        many requests as there are free slots), so that a burst of long prompts joins over several
        steps instead of stalling the running ones for all of them."""
        config = module.config
        max_len = config.max_seq_len if max_len is None else max_len
        if not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_len, int) or not 1 <= max_len <= config.max_seq_len:
            raise GenerationError(f"max_len must be in [1, {config.max_seq_len}] (the model's context), got {max_len!r}")
        if prefill_budget is not None and (not isinstance(prefill_budget, int) or prefill_budget < 1):
            raise GenerationError(f"prefill_budget must be a positive integer or None, got {prefill_budget!r}")
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.device = module.device
        self.prefill_budget = prefill_budget
        self.cache = KVCache(config, max_batch, max_len, dtype=module.dtype, device=module.device)
        self.decode_step = DecodeStep(self.module, self.cache, Compile.of(compile))
        # Rows [0, n) hold the active requests in order; a finished row swaps with the last active
        # one, so a decode step always runs on a contiguous view of the cache.
        self._rows: list[_Row | None] = [None] * max_batch
        self._active = 0
        self._held: list[list[int]] = [[] for _ in range(max_batch)]  # tokens cached in each free slot
        self._waiting: collections.deque[Request] = collections.deque()
        self._ids = 0
        self._vocab = min(config.vocab_size, tokenizer.vocab_size) if tokenizer is not None else config.vocab_size

    @property
    def max_batch(self) -> int:
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def compile(self) -> Compile:
        return self.decode_step.mode

    @property
    def requests(self) -> list[Request]:
        """The requests being decoded, in row order."""
        return [row.request for row in self._rows[:self._active]]

    @property
    def waiting(self) -> list[Request]:
        """The submitted requests not yet admitted, in order."""
        return list(self._waiting)

    @property
    def busy(self) -> bool:
        """Whether a step has work: requests decoding or waiting."""
        return bool(self._active or self._waiting)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self._active

    # -- requests -------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
               stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()) -> Request:
        """Queues a request; the next `step` with a free slot admits it.

        Raises GenerationError now for a request the engine cannot serve: an empty prompt, an id
        outside the vocabulary, a prompt longer than `max_len` (a prompt of max_len tokens leaves
        room for one new token; the request ends with finish_reason "length" when its slot is
        full), a bad max_new_tokens or stop string.
        """
        prompt = self._check_prompt(prompt_ids)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop_strings = tuple(stop_strings or ())
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise GenerationError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
        if stop_strings and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; this engine has none (use stop ids)")
        self._ids += 1
        request = Request(id=self._ids, prompt_ids=prompt, max_new_tokens=max_new_tokens,
                          sampling=sampling or GREEDY, stop_ids=frozenset(int(i) for i in stop_ids),
                          stop_strings=stop_strings)
        self._waiting.append(request)
        return request

    @torch.inference_mode()
    def add(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
            stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()) -> Request:
        """`submit`, admitted at once: prefilled when it returns. Raises GenerationError when no
        slot is free."""
        if not self.free_slots:
            raise GenerationError(f"no free slot: all {self.max_batch} are decoding (wait for one to finish)")
        request = self.submit(prompt_ids, max_new_tokens, sampling, stop_ids, stop_strings)
        self._waiting.pop()
        self._start(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request now, waiting or decoding, and frees its slot (no-op for a finished one)."""
        if request.finished:
            return
        request.finish_reason = "cancelled"
        if request in self._waiting:
            self._waiting.remove(request)
        else:
            self._release(request)

    def stream(self, request: Request) -> Iterator[Delta]:
        """Steps the engine until `request` finishes, yielding its own deltas; a reader that stops
        early cancels it."""
        try:
            while not request.finished:
                yield from (d for d in self.step() if d.request is request)
        finally:
            self.cancel(request)

    # -- a step: admit, decode, update ------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Admits what fits, then one batched decode forward over every active request; one Delta
        per active request."""
        self._admit()
        rows = self._rows[:self._active]
        if not rows:
            return []
        tokens = torch.tensor([[r.next] for r in rows], device=self.device)  # (n, 1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)  # (n, 1)
        logits = self.decode_step(tokens, positions, end=max(r.length for r in rows) + 1)  # (n, V)
        logits = logits[:, :self._vocab]  # a padded embedding's extra rows are not tokens
        requests = [r.request for r in rows]
        penalized = [q.prompt_ids + q.output_ids if q.sampling.repetition_penalty else None for q in requests]
        chosen = next_tokens(logits, [q.sampling for q in requests], [r.generator for r in rows], penalized).tolist()

        deltas = [Delta(row.request, token, self._update(row, token)) for row, token in zip(rows, chosen)]
        for d in deltas:
            if d.request.finished:
                self._release(d.request)
        return deltas

    def _admit(self) -> None:
        budget = self.prefill_budget
        admitted = 0
        while self._waiting and self.free_slots:
            n = len(self._waiting[0].prompt_ids)
            if admitted and budget is not None and n > budget:
                break
            request = self._waiting.popleft()
            try:
                self._start(request)
            except BaseException:
                request.finish_reason = "error"
                raise
            admitted += 1
            budget = None if budget is None else budget - n

    def _update(self, row: _Row, token: int) -> str:
        """Records `token`, updates the request's text and finish_reason; returns the released text."""
        r, stream = row.request, row.text
        row.length += 1
        row.next = token
        r.output_ids.append(token)
        if token in r.stop_ids:
            r.finish_reason = "stop"
            piece = stream.close() if stream else ""
        else:
            piece = stream.push(token) if stream else ""
            if stream and stream.stopped:
                r.finish_reason = "stop"
            elif len(r.output_ids) >= r.max_new_tokens or row.length >= self.max_len:
                r.finish_reason = "length"
                piece += stream.close() if stream else ""
        r.text += piece
        return piece

    # -- slots ----------------------------------------------------------------------------------
    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        try:
            prompt = [int(i) for i in prompt_ids]
        except (TypeError, ValueError):
            raise GenerationError("a prompt must be a sequence of token ids") from None
        if not prompt:
            raise GenerationError("empty prompt: a prompt needs at least one token (<bos>)")
        vocab = self.module.config.vocab_size
        bad = next((i for i in prompt if not 0 <= i < vocab), None)
        if bad is not None:
            raise GenerationError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) > self.max_len:
            raise GenerationError(f"prompt of {len(prompt)} tokens does not fit: the engine holds {self.max_len} "
                                  f"tokens per request (the model's context is {self.module.config.max_seq_len})")
        return prompt

    def _start(self, request: Request) -> None:
        """Puts `request` in the free slot that already holds most of its prompt, and prefills the rest."""
        prompt = request.prompt_ids
        slot, reused = self._pick_slot(prompt)
        row = self._active
        self._swap(slot, row)
        self._held[row] = []  # until the request ends (a prefill that fails leaves no false record)
        if reused:
            self.cache.truncate(row, reused)
        else:
            self.cache.reset(row)
        self._prefill(row, prompt[reused:-1], start=reused)
        request.reused = reused
        text = TextStream(self.tokenizer, prompt[-_PROMPT_CONTEXT:], request.stop_strings) if self.tokenizer else None
        self._rows[row] = _Row(request, length=len(prompt) - 1, next=prompt[-1],
                               generator=make_generator(request.sampling, self.device), text=text)
        self._active += 1

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest usable prefix with `prompt`."""
        best, best_reuse = self._active, -1
        for slot in range(self._active, self.max_batch):
            held = self._held[slot]
            n = self.cache.reusable(held, len(held), prompt)
            # Prefer the longest reuse, then the slot that holds the least (keep other caches for later).
            if n > best_reuse or (n == best_reuse and len(held) < len(self._held[best])):
                best, best_reuse = slot, n
        return best, best_reuse

    def _prefill(self, row: int, ids: list[int], start: int) -> None:
        view = self.cache.row_view(row)
        chunk = self.cache.max_chunk
        for i in range(0, len(ids), chunk):
            piece = torch.tensor([ids[i:i + chunk]], device=self.device)  # (1, T)
            positions = torch.arange(start + i, start + i + piece.shape[1], device=self.device)[None]
            self.module(piece, positions, view, logits=False)  # fills the cache

    def _release(self, request: Request) -> None:
        i = next(i for i in range(self._active) if self._rows[i].request is request)
        row, last = self._rows[i], self._active - 1
        self._swap(i, last)
        self._rows[last] = None
        self._held[last] = (request.prompt_ids + request.output_ids)[:row.length]
        self._active -= 1

    def _swap(self, i: int, j: int) -> None:
        if i != j:
            self.cache.swap(i, j)
            self._rows[i], self._rows[j] = self._rows[j], self._rows[i]
            self._held[i], self._held[j] = self._held[j], self._held[i]
