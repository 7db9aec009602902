"""LM: a loaded model with its tokenizer, the object `gemmakit.load` returns."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .config import GemmaConfig
from .errors import GenerationError
from .model import Gemma
from .sampling import Sampling
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]


class LM:
    def __init__(self, module: Gemma, tokenizer: Tokenizer | None, source: str = "", compile: bool | str = False):
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.compile = compile  # engines made for this LM compile their decode step (engine.compiled)

    @property
    def config(self) -> GemmaConfig:
        return self.module.config

    @property
    def dtype(self) -> torch.dtype:
        return self.module.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.embed.weight.device

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Token ids (B, T) -> float32 logits (B, T, V) from one full forward, no cache."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        return self.module(ids).float()

    # -- generation (the engine does the work: gemmakit.engine) -----------------------------------
    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 64, sampling: Sampling | None = None,
                 stop: Sequence[str] | None = None, *, stop_ids: Sequence[int] | None = None,
                 max_batch: int = 16, **sampling_fields):
        """The continuation of a prompt (str), or of each prompt of a list, batched in one engine.

        Prompts are strings (encoded with <bos>) or lists of token ids (used as they are).
        sampling: a Sampling; keyword fields (temperature=0.7, seed=1, ...) override its fields.
        stop: stop strings (not part of the result); stop_ids default to the tokenizer's stop ids.
        Returns the continuation text without the stop id or string; an LM without a tokenizer
        takes token ids and returns the generated ids (a list, or a list of lists).
        """
        prompts, single = self._prompts(prompt)
        sampling = _sampling(sampling, sampling_fields)
        longest = max(len(p) for p in prompts)
        engine = self._engine(min(max_batch, len(prompts)), longest + max_new_tokens)
        results: list = [None] * len(prompts)
        waiting = list(enumerate(prompts))[::-1]
        running = {}
        while waiting or running:
            while waiting and engine.free_slots:
                i, ids = waiting.pop()
                running[engine.add(ids, max_new_tokens, sampling, self._stop_ids(stop_ids), stop or ())] = i
            engine.step()
            for request in [r for r in running if r.finished]:
                results[running.pop(request)] = request.text if self.tokenizer else request.generated_ids
        return results[0] if single else results

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, sampling: Sampling | None = None,
               stop: Sequence[str] | None = None, *, stop_ids: Sequence[int] | None = None,
               **sampling_fields) -> Iterator[str]:
        """The continuation of one prompt in pieces as they are generated (see `generate`); the
        pieces never split a character and join to `generate`'s text. Without a tokenizer it yields
        token ids."""
        prompts, single = self._prompts(prompt)
        if not single:
            raise GenerationError("stream takes one prompt; use generate for a list")
        engine = self._engine(1, len(prompts[0]) + max_new_tokens)
        request = engine.add(prompts[0], max_new_tokens, _sampling(sampling, sampling_fields),
                             self._stop_ids(stop_ids), stop or ())
        return _pieces(engine, request, as_ids=self.tokenizer is None)

    def chat(self, system: str | None = None, sampling: Sampling | None = None, max_new_tokens: int = 512,
             max_len: int | None = None, **sampling_fields):
        """A ChatSession (send/stream/reset/messages) that keeps its KV cache between turns.

        max_len: the longest conversation in tokens (default: the model's context).
        """
        from .chat import ChatSession

        return ChatSession(self, system, _sampling(sampling, sampling_fields), max_new_tokens, max_len)

    def _engine(self, max_batch: int, needed: int):
        from .engine import Engine

        # Size the cache for the job (its memory is allocated up front). An AOT step is
        # compiled per cache shape: a power of two (>= 256) lets jobs of similar size share one.
        if self.compile == "aot":
            needed = max(256, 1 << (needed - 1).bit_length())
        return Engine(self.module, self.tokenizer, max_batch=max_batch, max_len=min(needed, self.config.max_seq_len),
                      compile=self.compile)

    def _stop_ids(self, stop_ids: Sequence[int] | None) -> Sequence[int]:
        if stop_ids is not None:
            return stop_ids
        return self.tokenizer.stop_ids if self.tokenizer is not None else ()

    def _prompts(self, prompt) -> tuple[list[list[int]], bool]:
        """[token ids per prompt], and whether one prompt (not a list of them) was given."""
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        single = isinstance(prompt, str) or (isinstance(prompt, Sequence) and len(prompt) > 0
                                             and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise GenerationError("no prompt given")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise GenerationError("this model has no tokenizer: pass token ids, not text")
                p = self.tokenizer.encode(p, add_bos=True)
            elif not isinstance(p, Sequence) or not all(isinstance(t, int) for t in p):
                raise GenerationError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
            out.append(list(p))
        return out, single

    def num_parameters(self) -> int:
        """The model's weights, counted as the float model's would be (quantized ones are buffers)."""
        from .quantize import QuantizedLinear

        quantized = sum(m.in_features * m.out_features for m in self.module.modules() if isinstance(m, QuantizedLinear))
        return quantized + sum(p.numel() for p in self.module.parameters())

    def nbytes(self) -> int:
        """Bytes of the weights; quantized weights and their scales are buffers, so those count too."""
        return sum(t.numel() * t.element_size() for t in (*self.module.parameters(), *self.module.buffers()))

    def __repr__(self) -> str:
        return f"LM({self.source or self.config.family}, {self.num_parameters():,} parameters, {self.dtype})"


def _sampling(sampling: Sampling | None, fields: dict) -> Sampling:
    return (sampling or Sampling()).replace(**fields) if fields else (sampling or Sampling())


def _pieces(engine, request, as_ids: bool) -> Iterator:
    try:
        while not request.finished:
            for delta in engine.step():
                if as_ids and delta.token_id not in request.stop_ids:
                    yield delta.token_id
                elif delta.text:
                    yield delta.text
    finally:
        engine.cancel(request)  # the reader stopped early
