"""The generation engine: requests in the rows of one KV cache, decoded together one token a step.

    engine = lm.engine(max_batch=8)          # or Engine(lm.module, lm.tokenizer, ...)
    request = engine.submit(prompt_ids, max_new_tokens=64, sampling=Sampling(temperature=0.7, seed=1))
    while engine.busy:
        for delta in engine.step():
            print(delta.text, end="")

Every `step` does four things, in order: admit (waiting requests take free rows; the longest
prefix of each prompt found in the prefix cache is copied in), fill (prompts are prefilled in
chunks, first come first served, several in one padded forward when their chunks are alike: all
but the last token; while other requests decode, at most `prefill_budget` prompt tokens and
`prefill_share` of a decode step's time a step, so that a long prompt never stalls the running
streams for its whole length), decode (one batched forward feeds each decoding request its latest token
at its own position; DecodeStep, in the model's compile mode) and update (sample, stop, release
text; a finished request leaves at once and its row is free for the next). `add` admits and
prefills one request at once instead, for callers that want its prefill done when it returns.

Prefix caching (prefixes.py): what a request's row holds is published in blocks as its prefill
completes them and when it ends, so a later prompt that starts with the same tokens (a shared
system prompt, the next turn of a conversation, n samples of one prompt) prefills only what is
new (`Request.reused` counts the tokens it skipped). A request waits a step rather than prefill
blocks that a prompt being prefilled is about to publish.

Rows [0, d) decode; rows [d, d + f) are being prefilled; rows stay dense and contiguous (a row
that leaves is filled by moving the last one of its group into it), so a decode step runs on one
contiguous view of the cache. An engine is not thread-safe: drive submit/step/cancel from one
thread (a server's scheduler loop).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch

from ..errors import GenerationError
from ..model import Gemma, KVCache
from ..model.quantized import mode_of
from ..tokenizer import Tokenizer
from .prefixes import BLOCK, PrefixCache, block_keys
from .sampling import GREEDY, Sampling, make_generator, next_tokens, token_logprobs
from .steps import Compile, DecodeStep
from .text import TextStream

_PROMPT_CONTEXT = 4  # prompt tokens decoded with the output so that its first piece keeps its leading space
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows
_SCORED_CHUNK = 64  # prompt tokens a forward when their logits are kept (V floats each)
_SHORT = 32  # prompt tokens left to prefill that a paced step takes whatever the pace
_LEAST = 4  # prompt tokens a paced step prefills at least


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
    reused: int = 0  # prompt tokens whose keys and values came from the prefix cache
    logprobs: int | None = None  # record each output token's logprob and the top N (0: its own only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (prefilled, never reused)
    constraint: object = None  # a grammar.Constraint the output must follow
    # (logprob, [(id, logprob) of the top N]) per output token / per prompt token (None for the first)
    output_logprobs: list = field(default_factory=list)
    input_logprobs: list = field(default_factory=list)

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
    """The engine's own state of a request in a row of the cache."""

    request: Request
    index: int  # its row of the cache
    length: int  # positions in the cache: [0, length)
    generator: torch.Generator | None
    keys: list[bytes]  # the prefix cache's keys of its full blocks so far (prefixes.block_keys)
    next: int = -1  # once decoding: the token the next step feeds, at position `length`
    text: TextStream | None = None

    @property
    def filling(self) -> bool:
        return self.length < len(self.request.prompt_ids) - 1


def default_kv_dtype(module: Gemma) -> torch.dtype:
    """The cache's dtype by default: bfloat16 beside int8 weights (the fast mode: attention over a
    2,000-token context runs ~2.4x faster in bfloat16 on the CPU, and the cache takes half the
    memory, as llama.cpp's float16 and vLLM's bfloat16 caches do), else the activations'."""
    return torch.bfloat16 if mode_of(module) == "int8" else module.dtype


class Engine:
    def __init__(self, module: Gemma, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None, compile: Compile | str | None = None,
                 prefill_budget: int | None = None, prefix_cache: int | None = None,
                 prefill_share: float | None = None, kv_dtype: torch.dtype | None = None):
        """max_len: tokens per request, prompt and output (default: the model's context); the
        cache holds max_batch of them (its memory is taken as rows fill). prefill_budget: prompt
        tokens prefilled per step while other requests decode (None: every waiting prompt at
        once, for batch jobs). prefill_share: besides, a step's prefill takes about this share of
        a decode step's time at most (both measured as they run; a long context makes a token
        of prefill dearer), so that the running streams' inter-token latency stays within
        (1 + share) of their own pace (None: the budget alone). prefix_cache: tokens the prefix
        cache keeps (None: as many as the rows hold, at most 1 GiB of keys and values; 0: none).
        kv_dtype: the cache's keys and values (None: `default_kv_dtype(module)`)."""
        config = module.config
        max_len = config.max_seq_len if max_len is None else max_len
        if not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_len, int) or not 1 <= max_len <= config.max_seq_len:
            raise GenerationError(f"max_len must be in [1, {config.max_seq_len}] (the model's context), got {max_len!r}")
        if prefill_budget is not None and (not isinstance(prefill_budget, int) or prefill_budget < 1):
            raise GenerationError(f"prefill_budget must be a positive integer or None, got {prefill_budget!r}")
        if prefill_share is not None and (not isinstance(prefill_share, (int, float)) or not prefill_share > 0):
            raise GenerationError(f"prefill_share must be a number > 0 or None, got {prefill_share!r}")
        if prefix_cache is not None and (not isinstance(prefix_cache, int) or prefix_cache < 0):
            raise GenerationError(f"prefix_cache must be a number of tokens >= 0 or None, got {prefix_cache!r}")
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.device = module.device
        self.prefill_budget = prefill_budget
        self.prefill_share = prefill_share
        self._pace = [None, None]  # seconds a decode step takes, seconds a token of prefill takes (moving averages)
        self.cache = KVCache(config, max_batch, max_len, dtype=kv_dtype or default_kv_dtype(module), device=module.device)
        self.decode_step = DecodeStep(self.module, self.cache, Compile.of(compile))
        if prefix_cache is None:
            per_token = self.cache.nbytes() // (max_batch * max_len) or 1
            prefix_cache = min(max_batch * max_len, (1 << 30) // per_token)
        blocks = -(-prefix_cache // BLOCK)
        self.prefixes = PrefixCache(self.cache, blocks) if blocks else None
        # Keys written by decode steps go to the prefix cache only where decode attention runs the
        # kernel a prompt's does: else a later prompt holding those tokens would get other bits
        # from the cache than from its own prefill.
        self._share_decoded = not self.module.decodes_apart(self.cache)
        self._rows: list[_Row | None] = [None] * max_batch  # by row of the cache
        self._decoding = 0  # rows [0, _decoding) decode
        self._filling: list[_Row] = []  # rows being prefilled, first come first served, at [_decoding, ...)
        self._waiting: collections.deque[Request] = collections.deque()
        self._keys: dict[Request, list[bytes]] = {}  # waiting prompts' block keys (prefixes.block_keys)
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
        """The admitted requests: those decoding, in row order, then those being prefilled."""
        return [row.request for row in self._rows[:self._decoding]] + [row.request for row in self._filling]

    @property
    def waiting(self) -> list[Request]:
        """The submitted requests not yet admitted, in order."""
        return list(self._waiting)

    @property
    def busy(self) -> bool:
        """Whether a step has work: requests decoding, being prefilled or waiting."""
        return bool(self._decoding or self._filling or self._waiting)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self._decoding - len(self._filling)

    # -- requests -------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
               stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), *, logprobs: int | None = None,
               prompt_logprobs: int | None = None, constraint=None) -> Request:
        """Queues a request; the next `step` with a free slot admits it. logprobs, prompt_logprobs:
        the model's own log-probabilities (before sampling's penalties and masks) of each output
        or prompt token, with the N most likely alternatives; constraint: a grammar.Constraint
        whose mask each step's choice obeys.

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
        sampling = sampling or GREEDY
        bad = next((i for i, _ in sampling.logit_bias if i >= self._vocab), None)
        if bad is not None:
            raise GenerationError(f"logit_bias token id {bad} is outside the vocabulary (0..{self._vocab - 1})")
        for name, n in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LOGPROBS):
                raise GenerationError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {n!r}")
        self._ids += 1
        request = Request(id=self._ids, prompt_ids=prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_ids=frozenset(int(i) for i in stop_ids), stop_strings=stop_strings,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs, constraint=constraint)
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
        row = self._start(request)
        self._fill_row(row, None)
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request now, waiting or decoding, and frees its slot (no-op for a finished one)."""
        if request.finished:
            return
        request.finish_reason = "cancelled"
        if request in self._waiting:
            self._waiting.remove(request)
            self._keys.pop(request, None)
        else:
            self._release(self._row_of(request))

    def stream(self, request: Request) -> Iterator[Delta]:
        """Steps the engine until `request` finishes, yielding its own deltas; a reader that stops
        early cancels it."""
        try:
            while not request.finished:
                yield from (d for d in self.step() if d.request is request)
        finally:
            self.cancel(request)

    # -- a step: admit, fill, decode, update ------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Admits what fits, prefills what the budget allows, then one batched decode forward over
        every decoding request; one Delta per decoding request."""
        self._admit()
        self._fill()
        rows = self._rows[:self._decoding]
        if not rows:
            return []
        tokens = torch.tensor([[r.next] for r in rows], device=self.device)  # (n, 1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)  # (n, 1)
        start = time.perf_counter()
        logits = self.decode_step(tokens, positions, end=max(r.length for r in rows) + 1)  # (n, V)
        logits = logits[:, :self._vocab]  # a padded embedding's extra rows are not tokens
        requests = [r.request for r in rows]
        histories = [(q.prompt_ids, q.output_ids) if q.sampling.adjusts_logits else None for q in requests]
        allowed = [q.constraint.mask(logits.shape[-1]) if q.constraint else None for q in requests]
        chosen = next_tokens(logits, [q.sampling for q in requests], [r.generator for r in rows], histories, allowed)
        scored = [i for i, q in enumerate(requests) if q.logprobs is not None]
        if scored:
            top = max(requests[i].logprobs for i in scored)
            for i, (lp, alternatives) in zip(scored, token_logprobs(logits[scored], chosen[scored], top)):
                requests[i].output_logprobs.append((lp, alternatives[:requests[i].logprobs]))
        chosen = chosen.tolist()  # waits for the device, so the clock below has the step's time
        self._paced(0, time.perf_counter() - start)
        for q, token in zip(requests, chosen):
            if q.constraint:
                q.constraint.accept(token)

        deltas = [Delta(row.request, token, self._update(row, token)) for row, token in zip(rows, chosen)]
        for row in rows:
            q = row.request
            if q.finished:
                self._release(row)
            elif self.prefixes and self._share_decoded and row.length % BLOCK == 0:  # a block complete while the ring holds it all
                self.prefixes.store(row.index, q.prompt_ids + q.output_ids, row.length, keys=row.keys)
        return deltas

    def _admit(self) -> None:
        for request in list(self._waiting):
            if not self.free_slots:
                break
            if self._deferred(request):
                continue
            self._waiting.remove(request)
            self._start(request)

    def _deferred(self, request: Request) -> bool:
        """Whether a prompt being prefilled will soon publish blocks this one could reuse."""
        keys = self._prompt_keys(request)
        for row in self._filling:
            theirs = row.keys
            shared = next((i for i, (a, b) in enumerate(zip(keys, theirs)) if a != b), min(len(keys), len(theirs)))
            if shared * BLOCK > row.length:
                return True
        return False

    def _prompt_keys(self, request: Request) -> list[bytes]:
        if request not in self._keys:
            self._keys[request] = block_keys(request.prompt_ids[:-1]) if self.prefixes else []
        return self._keys[request]

    def _fill(self) -> None:
        """Prefills the rows being filled within the step's budget: together, a chunk of each in
        one forward, while their chunks are of similar length; else in order, one by one."""
        for row in [r for r in self._filling if not r.filling]:  # the whole prompt came from the cache
            self._decode(row)
        budget = self._budget() if self._decoding else None
        if budget is not None:  # short prompts (a turn after a cached prefix) are not held back
            short = sum(len(r.request.prompt_ids) - 1 - r.length for r in self._filling
                        if len(r.request.prompt_ids) - 1 - r.length <= _SHORT)
            budget = max(budget, min(short, self.prefill_budget or short))
        while self._filling and budget != 0:
            ends = self._batch_ends(budget)
            if ends:
                budget = None if budget is None else budget - sum(end - row.length for row, end in ends)
                self._fill_chunk(ends)
            else:
                budget = self._fill_row(self._filling[0], budget)

    def _budget(self) -> int | None:
        """Prompt tokens this step may prefill beside the decoding requests."""
        decode, token = self._pace
        if self.prefill_share is None or decode is None or token is None:
            return self.prefill_budget
        fits = max(_LEAST, int(self.prefill_share * decode / token))  # a long prompt still moves
        return fits if self.prefill_budget is None else min(fits, self.prefill_budget)

    def _timed(self, start: float, tokens: int) -> None:
        """Notes a prefill forward's time per token (on a GPU the forward is only queued: no pace)."""
        if self.device.type == "cpu":
            self._paced(1, (time.perf_counter() - start) / tokens)

    def _paced(self, which: int, seconds: float) -> None:
        old = self._pace[which]
        self._pace[which] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def _chunk_end(self, row: _Row, limit: int | None) -> int:
        """Where `row`'s next prefill chunk ends: at most `limit` tokens (None: a whole chunk)."""
        scored = row.request.prompt_logprobs is not None
        chunk = min(self.cache.max_chunk, _SCORED_CHUNK) if scored else self.cache.max_chunk
        end = row.length + min(len(row.request.prompt_ids) - 1 - row.length, chunk, limit or chunk)
        if self.prefixes and end // BLOCK * BLOCK > row.length:
            end = end // BLOCK * BLOCK  # a chunk ends on a block, published before the ring overwrites it
        return end

    def _batch_ends(self, budget: int | None) -> list[tuple[_Row, int]]:
        """The chunk end of every row being filled, in row order, when one padded forward over all
        of them is worth it (each gets tokens, none needs logits, padding at most doubles the
        work); else []."""
        if len(self._filling) < 2 or any(r.request.prompt_logprobs is not None for r in self._filling):
            return []
        ends, left = [], budget
        for row in self._filling:  # the budget goes first come first served
            end = self._chunk_end(row, left)
            if end <= row.length:
                return []
            ends.append((row, end))
            left = None if left is None else left - (end - row.length)
        width = max(end - row.length for row, end in ends)
        real = sum(end - row.length for row, end in ends)
        if len(ends) * width > 2 * real + 32 * len(ends) or any(r.length + width > self.max_len for r, _ in ends):
            return []
        return sorted(ends, key=lambda e: e[0].index)  # rows [_decoding, ...): one contiguous view

    def _fill_chunk(self, ends: list[tuple[_Row, int]]) -> None:
        """One forward of a chunk of every row in `ends` (consecutive rows, in order), the shorter
        chunks padded: a padding token writes keys at a position its row has not reached, which
        the row overwrites before any of its queries can see it. A lone row that asked for its
        prompt's logprobs gets them."""
        width = max(end - row.length for row, end in ends)
        tokens = [row.request.prompt_ids[row.length:end] for row, end in ends]
        tokens = torch.tensor([t + [0] * (width - len(t)) for t in tokens], device=self.device)  # (p, width)
        positions = torch.stack([torch.arange(row.length, row.length + width) for row, _ in ends]).to(self.device)
        first, request = ends[0][0].index, ends[0][0].request
        scored = len(ends) == 1 and request.prompt_logprobs is not None
        start = time.perf_counter()
        try:
            logits = self.module(tokens, positions, self.cache.rows_view(first, first + len(ends)), logits=scored)
        except BaseException:
            for row, _ in ends:
                row.request.finish_reason = "error"
                self._release(row)
            raise
        self._timed(start, sum(end - row.length for row, end in ends))
        if scored:  # position p's logits predict prompt token p + 1
            row, end = ends[0]
            request.input_logprobs += token_logprobs(logits[0, :, :self._vocab],
                                                     request.prompt_ids[row.length + 1:end + 1], request.prompt_logprobs)
        for row, end in ends:
            row.length = end
            if self.prefixes and row.filling:
                self.prefixes.store(row.index, row.request.prompt_ids, row.length, keys=row.keys)  # the blocks so far
        for row, _ in ends:
            if not row.filling:
                self._decode(row)

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

    def _start(self, request: Request) -> _Row:
        """Gives `request` the first free row, with its longest cached prefix copied in."""
        index = self._decoding + len(self._filling)
        prompt = request.prompt_ids
        keys = self._prompt_keys(request)
        del self._keys[request]
        scored = request.prompt_logprobs is not None  # every prompt position's logits are needed
        reused, slots = self.prefixes.match(prompt, len(prompt) - 1, keys) if self.prefixes and not scored else (0, [])
        if scored:
            request.input_logprobs = [None]  # nothing predicts the first token
        if reused:
            self.prefixes.load(index, slots, reused)
        request.reused = reused
        row = _Row(request, index, length=reused, generator=make_generator(request.sampling, self.device),
                   keys=list(keys))
        self._rows[index] = row
        self._filling.append(row)
        return row

    def _fill_row(self, row: _Row, budget: int | None) -> int | None:
        """Prefills `row` by up to `budget` tokens (None: all); the budget left. A row whose
        prompt is all in the cache starts decoding."""
        while row.filling and budget != 0:
            end = self._chunk_end(row, budget)
            budget = None if budget is None else budget - (end - row.length)
            self._fill_chunk([(row, end)])
        if not row.filling and row in self._filling:  # its prompt came from the cache whole
            self._decode(row)
        return budget

    def _decode(self, row: _Row) -> None:
        """A prefilled row joins the decoding ones (it moves to row `_decoding`)."""
        request = row.request
        if self.prefixes:
            self.prefixes.store(row.index, request.prompt_ids, row.length, tail=True, keys=row.keys)
        self._filling.remove(row)
        self._swap(row.index, self._decoding)
        self._decoding += 1
        row.next = request.prompt_ids[-1]
        if self.tokenizer:
            row.text = TextStream(self.tokenizer, request.prompt_ids[-_PROMPT_CONTEXT:], request.stop_strings)

    def _row_of(self, request: Request) -> _Row:
        return next(row for row in self._rows if row is not None and row.request is request)

    def _release(self, row: _Row) -> None:
        """Frees `row`'s row of the cache (its keys go to the prefix cache) and closes the gap."""
        request = row.request
        if self.prefixes and request.finish_reason != "error":
            if self._share_decoded:
                self.prefixes.store(row.index, request.prompt_ids + request.output_ids, row.length, tail=True, keys=row.keys)
            else:  # what its prefill wrote: the prompt but its last token
                self.prefixes.store(row.index, request.prompt_ids, min(row.length, len(request.prompt_ids) - 1), tail=True,
                                    keys=row.keys)
        if row in self._filling:
            self._filling.remove(row)
            self._move(self._decoding + len(self._filling), row.index)  # the group's last row fills the gap
        else:
            self._decoding -= 1
            self._move(self._decoding, row.index)
            if self._filling:  # the gap is now at the start of the rows being filled
                self._move(self._decoding + len(self._filling), self._decoding)

    def _move(self, src: int, dst: int) -> None:
        """Row `src` moves to row `dst`, whose request has left; `src` is left empty."""
        if src == dst:
            self.cache.reset(src)
        else:
            row = self._rows[src]
            self.cache.move(src, dst, row.length)
            row.index = dst
            self._rows[dst] = row
        self._rows[src] = None

    def _swap(self, i: int, j: int) -> None:
        if i != j:
            a, b = self._rows[i], self._rows[j]
            self.cache.swap(i, j, max(r.length if r else 0 for r in (a, b)))
            self._rows[i], self._rows[j] = b, a
            for index, r in ((i, b), (j, a)):
                if r is not None:
                    r.index = index
