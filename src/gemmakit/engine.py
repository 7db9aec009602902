"""The generation engine: requests in the slots of one KV cache, decoded together one token a step.

    engine = Engine(lm.module, lm.tokenizer, max_batch=8, max_len=4096)
    request = engine.add(prompt_ids, max_new_tokens=64, sampling=Sampling(temperature=0.7, seed=1))
    while engine.requests:
        for delta in engine.step():
            print(delta.text, end="")

`add` prefills a request's prompt (all but its last token) into a free slot; every `step` feeds
each active request its latest token at its own position in one batched forward, samples, and
returns one `Delta` per request. A request added between steps joins the next step; a finished or
cancelled request leaves at once and its slot is free for the next `add`.

A freed slot keeps its keys and values: a later prompt that starts with the same tokens (the next
turn of a conversation) prefills only what is new (`Request.reused` counts the tokens it skipped).

An engine is not thread-safe: drive add/step/cancel from one thread (a server's scheduler loop).
`add` runs the whole prefill before it returns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from .cache import KVCache
from .errors import GenerationError
from .model import Gemma
from .sampling import GREEDY, Sampling, make_generator, next_tokens
from .tokenizer import Tokenizer

_PROMPT_CONTEXT = 4  # prompt tokens decoded with the output so that its first piece keeps its leading space


@dataclass(eq=False)
class Request:
    """One generation. Read-only for callers; the engine updates it every step."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    output_ids: list[int] = field(default_factory=list)  # every sampled token, a final stop id included
    text: str = ""  # the text released so far (pieces joined); all of it once finished
    finish_reason: str | None = None  # "stop" (stop id or string), "length" or "cancelled"
    reused: int = 0  # prompt tokens whose keys and values were already in the slot
    _length: int = field(default=0, repr=False)  # tokens in the cache
    _next: int = field(default=0, repr=False)  # the token the next step feeds, at position _length
    _generator: torch.Generator | None = field(default=None, repr=False)
    _text: TextStream | None = field(default=None, repr=False)

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


class Engine:
    def __init__(self, module: Gemma, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None, compile: bool | str = False):
        config = module.config
        max_len = config.max_seq_len if max_len is None else max_len
        if not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_len, int) or not 1 <= max_len <= config.max_seq_len:
            raise GenerationError(f"max_len must be in [1, {config.max_seq_len}] (the model's context), got {max_len!r}")
        if compile not in (False, None, True, "torch", "aot"):
            raise GenerationError(f"compile must be False, True/'torch' or 'aot', got {compile!r}")
        self.module = module.eval()
        # Decode steps run the same few hundred small ops every token: compiled, their Python and
        # dispatch cost mostly goes (prefill, a few large ops per chunk, stays eager). "aot": the
        # step compiled ahead of time, with no Python left in it (see aot.py).
        self._decode = functools.partial(compiled_forward(), self.module) if compile in (True, "torch") else self.module
        self.tokenizer = tokenizer
        weight = module.embed.weight
        self.device = weight.device
        self.cache = KVCache(config, max_batch, max_len, dtype=weight.dtype, device=weight.device)
        self._aot = None
        if compile == "aot":
            from . import aot

            self._aot = aot.build(module, self.cache)
            self.cache.reset()  # building ran the step once on rows 0-1
        # Rows [0, n) hold the active requests in order; a finished row swaps with the last active
        # one, so a decode step always runs on a contiguous view of the cache.
        self._rows: list[Request | None] = [None] * max_batch
        self._active = 0
        self._held: list[list[int]] = [[] for _ in range(max_batch)]  # tokens cached in each free slot
        self._ids = 0
        self._vocab = min(config.vocab_size, tokenizer.vocab_size) if tokenizer is not None else config.vocab_size

    @property
    def max_batch(self) -> int:
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def requests(self) -> list[Request]:
        """The requests being decoded, in row order."""
        return self._rows[:self._active]

    @property
    def free_slots(self) -> int:
        return self.max_batch - self._active

    # -- requests -------------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
            stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()) -> Request:
        """Prefills `prompt_ids` into a free slot; the request joins the next `step`.

        Raises GenerationError when no slot is free or the prompt does not fit `max_len` (a prompt
        of max_len tokens leaves room for one new token; the request ends with finish_reason
        "length" when its slot is full).
        """
        prompt = self._check_prompt(prompt_ids)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop_strings = tuple(stop_strings or ())
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise GenerationError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
        if stop_strings and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; this engine has none (use stop ids)")
        if not self.free_slots:
            raise GenerationError(f"no free slot: all {self.max_batch} are decoding (wait for one to finish)")
        sampling = sampling or GREEDY

        slot, reused = self._pick_slot(prompt)
        row = self._active
        self._swap(slot, row)
        self._held[row] = []  # until the request ends (a prefill that fails leaves no false record)
        if reused:
            self.cache.truncate(row, reused)
        else:
            self.cache.reset(row)
        self._prefill(row, prompt[reused:-1], start=reused)

        self._ids += 1
        request = Request(id=self._ids, prompt_ids=prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_ids=frozenset(int(i) for i in stop_ids), stop_strings=stop_strings,
                          reused=reused, _length=len(prompt) - 1, _next=prompt[-1],
                          _generator=make_generator(sampling, self.device))
        if self.tokenizer is not None:
            request._text = TextStream(self.tokenizer, prompt[-_PROMPT_CONTEXT:], stop_strings)
        self._rows[row] = request
        self._active += 1
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request now and frees its slot (no-op for a finished one)."""
        if not request.finished:
            request.finish_reason = "cancelled"
            self._release(request)

    # -- decoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """One batched decode forward over every active request; one Delta per request."""
        active = self.requests
        if not active:
            return []
        tokens = torch.tensor([[r._next] for r in active], device=self.device)  # (n, 1)
        positions = torch.tensor([[r._length] for r in active], device=self.device)  # (n, 1)
        cache = self.cache.rows_view(0, len(active)).reserve(max(r._length for r in active) + 1)
        span = self.cache.span(False)  # slots the step reads: the global layers' (the ring's follow from it)
        if self._aot is not None and self._aot.usable(span):
            logits = self._aot(tokens, positions, span)[:, -1]  # (n, V)
        else:
            logits = self._decode(tokens, positions, cache, last_only=True)[:, -1]
        logits = logits[:, :self._vocab]  # a padded embedding's extra rows are not tokens
        penalized = [r.prompt_ids + r.output_ids if r.sampling.repetition_penalty else None for r in active]
        chosen = next_tokens(logits, [r.sampling for r in active], [r._generator for r in active], penalized).tolist()

        deltas = []
        for r, token in zip(active, chosen):
            r._length += 1
            r._next = token
            r.output_ids.append(token)
            piece = self._update(r, token)
            deltas.append(Delta(r, token, piece))
        for d in deltas:
            if d.request.finished:
                self._release(d.request)
        return deltas

    def _update(self, r: Request, token: int) -> str:
        """Updates the request's text and finish_reason after `token`; returns the released text."""
        stream = r._text
        if token in r.stop_ids:
            r.finish_reason = "stop"
            piece = stream.close() if stream else ""
        else:
            piece = stream.push(token) if stream else ""
            if stream and stream.stopped:
                r.finish_reason = "stop"
            elif len(r.output_ids) >= r.max_new_tokens or r._length >= self.max_len:
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

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest usable prefix with `prompt`."""
        best, best_reuse = self._active, -1
        for slot in range(self._active, self.max_batch):
            held = self._held[slot]
            n = _common_prefix(held, prompt, limit=len(prompt) - 1)  # the last token is always fed
            if n and not self.cache.resumable(len(held), n):
                n = 0
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
        row = self._rows.index(request, 0, self._active)
        last = self._active - 1
        self._swap(row, last)
        self._rows[last] = None
        self._held[last] = (request.prompt_ids + request.output_ids)[:request._length]
        self._active -= 1

    def _swap(self, i: int, j: int) -> None:
        if i != j:
            self.cache.swap(i, j)
            self._rows[i], self._rows[j] = self._rows[j], self._rows[i]
            self._held[i], self._held[j] = self._held[j], self._held[i]


@functools.lru_cache(maxsize=None)
def compiled_forward():
    """`Gemma.forward` under torch.compile, called with the module as its first argument: one
    compiled function for every engine (and no reference to any model kept here).

    Dynamic shapes: the batch and the cache's span change from step to step. The first steps of a
    process compile (about a minute on 2 cores; batch 1 and larger batches are two graphs), later
    processes read inductor's on-disk cache.
    """
    return torch.compile(Gemma.forward, dynamic=True)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TextStream:
    """Generated ids -> text pieces that never split a character nor reveal (part of) a stop string.

    Incremental detokenization: the ids since the last release are decoded together with the ones
    before them (so that SentencePiece's spaces and byte-fallback sequences come out as in a full
    decode) and only the new suffix is released; while the tail still decodes to U+FFFD (an
    unfinished UTF-8 character) nothing is. Text that could be the start of a stop string is held
    back until it is not. The pieces join to exactly the final text.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int], stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.start = 0  # ids[start:read] decode to `self._before`
        self.read = len(self.ids)
        self._before = tokenizer.decode(self.ids)
        self.text = ""  # decoded so far (released or held)
        self.released = 0  # length of the released prefix of `text`
        self.stop_strings = tuple(stop_strings)
        self.stopped = False

    def push(self, token: int) -> str:
        """Adds one generated token; returns the text it releases (may be "")."""
        self.ids.append(token)
        decoded = self.tokenizer.decode(self.ids[self.start:])
        if len(decoded) > len(self._before) and not decoded.endswith("\ufffd"):
            self._advance(decoded)
        return self._release(final=False)

    def close(self) -> str:
        """The rest of the text at the end of generation (an unfinished character included)."""
        if self.read < len(self.ids):
            self._advance(self.tokenizer.decode(self.ids[self.start:]))
        return self._release(final=True)

    def _advance(self, decoded: str) -> None:
        self.text += decoded[len(self._before):]
        self.start, self.read = self.read, len(self.ids)
        self._before = self.tokenizer.decode(self.ids[self.start:self.read])

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        for s in self.stop_strings:
            hit = self.text.find(s, self.released)
            if hit != -1 and hit < end:
                end = hit
                self.stopped = True
        if self.stopped:
            self.text = self.text[:end]
        elif not final:
            end -= _held_back(self.text, self.released, self.stop_strings)
        piece = self.text[self.released:end]
        self.released = end
        return piece


def _held_back(text: str, start: int, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of a stop string."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text) - start), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
