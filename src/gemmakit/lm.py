"""`load`, the one way in, and `LM`, the loaded model with its tokenizer that it returns."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from typing import Iterator, Sequence

import torch

from . import checkpoints, kernels
from .chat import ChatSession
from .chat_template import ChatFormat
from .checkpoints import converted
from .checkpoints.metadata import Metadata
from .config import PRESETS, GemmaConfig
from .errors import ConfigError, GenerationError, TokenizerError
from .model import Gemma
from .model.quantized import Quantization, mode_of, quantized_parameters
from .model.quantized import quantize as quantize_module
from .runtime.engine import Engine
from .runtime.sampling import Sampling
from .runtime.steps import Compile, compiles_ahead
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
_IDLE_ENGINES = 4  # engines of generate/stream kept for later calls


def load(source: str | os.PathLike | GemmaConfig, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         quantize: str | None = "auto", compile: Compile | str | None = "auto", tokenizer: str | os.PathLike | None = None,
         variant: str | None = None, seed: int = 0, progress: bool = True) -> LM:
    """A model ready to run, from a Hugging Face folder, an official .ckpt/.bin, a .gguf file,
    or a preset name or a GemmaConfig (random weights, drawn after torch.manual_seed(seed); see
    gemmakit.PRESETS).

    The defaults are the fast mode that keeps the checkpoint's quality; `quantize=None,
    compile=None` (and `dtype=torch.float32`) is the exact one.

    dtype: of the weights, or with `quantize` of the activations (default: float32; int4's bfloat16).
    quantize: "int8" or "int4" weight-only; a file is converted once and read from the cache
    directory after that (checkpoints/converted.py). "auto": int8 on the CPU where the file's own
    weights are quantized (a GGUF of Q4_K, Q8_0... blocks), else the weights as they are.
    compile: how the model's engines run a decode step: None or "eager", "torch" (torch.compile),
    "aot" (compiled ahead of time, cached on disk), "auto": the AOT step for int8 models on the
    CPU, compiled in the background while decoding starts eagerly; see runtime/steps.py.
    tokenizer: a tokenizer.model / tokenizer.json to use instead of (or where there is none) the
    checkpoint's own.
    variant: the preset an official checkpoint belongs to, where its shapes do not tell.
    """
    mode = Compile.of(compile)
    device = _device(device)
    name = f"random {source.family}" if isinstance(source, GemmaConfig) else str(source)  # what servers show
    if isinstance(source, str) and source in PRESETS and not os.path.exists(source):
        source = PRESETS[source]
    if quantize == "auto":  # random weights stay as they are
        q = None if isinstance(source, GemmaConfig) else converted.auto(source, device)
        quantize = q and q.mode
    q = Quantization(quantize, dtype=_dtype(dtype) if dtype is not None else None) if quantize else None
    # A first run: the kernels compile on one core while the file converts on the other (torch's
    # threads on both cores would spin against the compiler: 18 s to a first token, not 13).
    building = q is not None and q.mode == "int8" and device.type == "cpu" and kernels.build_in_background()
    dtype = q.dtype if q else _dtype(dtype) if dtype is not None else torch.float32
    if q and device.type != "cpu" and q.mode == "int4":
        raise ConfigError(f"int4 runs on torch's CPU int4 kernel; it cannot run on {device} (use int8)")
    tok = Tokenizer.from_file(tokenizer) if tokenizer is not None else None
    metadata = Metadata()
    if isinstance(source, GemmaConfig):
        config = source
        with torch.device(device):
            torch.manual_seed(seed)
            module = Gemma(config)  # initialised: random matrices, norms at 0 (a scale of 1)
        module = module.to(torch.float32 if q else dtype).eval()
        if q:  # random weights: nothing worth caching
            quantize_module(module, q.mode, q.group_size, q.dtype)
    else:
        with threads(1) if building else contextlib.nullcontext():
            ckpt = converted.read(source, q, variant, progress) if q else checkpoints.read(source, variant=variant)
        tok = tok or ckpt.tokenizer
        module = checkpoints.build(ckpt, dtype=dtype, device=device, progress=progress)
        config, metadata = ckpt.config, ckpt.metadata
    if tok is not None:
        tok.family = config.family
        if tok.vocab_size > config.vocab_size:
            raise TokenizerError(f"{tokenizer or source}: the tokenizer has {tok.vocab_size} tokens but the "
                                 f"model's embedding has {config.vocab_size} rows")
        generation = metadata.generation
        bad = next((i for i in (*(generation.eos_ids or ()), generation.bos_id, generation.pad_id)
                    if i is not None and i >= tok.vocab_size), None)
        if bad is not None:
            raise TokenizerError(f"{generation.origin}: token id {bad} is outside the "
                                 f"{tok.vocab_size}-token vocabulary")
    return LM(module, tok, source=name, compile=mode, metadata=metadata)


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op threads set to n for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(device: str | torch.device) -> torch.device:
    """The device, checked before anything is built on it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device}: this torch build has no CUDA, or no GPU is visible")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if name in ("float16", "fp16", "half"):
        # Gemma's activations outgrow float16's range (transformers issue #36822; vLLM refuses float16
        # for Gemma 2 and 3): the logits would turn to inf and NaN partway through a text.
        raise ConfigError("dtype float16 overflows Gemma's activations; use bfloat16 (same memory, float32's range)")
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


class LM:
    def __init__(self, module: Gemma, tokenizer: Tokenizer | None, source: str = "",
                 compile: Compile | str | None = None, metadata: Metadata | None = None):
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.metadata = metadata or Metadata()  # the checkpoint's chat template and generation defaults
        self._compile = Compile.of(compile)
        # Idle engines of generate/stream, by shape, newest last: a compiled step loads once, and
        # a prompt that repeats an earlier one's start reuses its cached keys and values.
        self._idle: collections.OrderedDict[tuple[int, int], Engine] = collections.OrderedDict()
        self._idle_lock = threading.Lock()

    @property
    def config(self) -> GemmaConfig:
        return self.module.config

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def compile(self) -> Compile:
        """How this model's engines run a decode step (fixed at load)."""
        return self._compile

    @property
    def quantization(self) -> str | None:
        """"int8" or "int4" for a quantized model, None for a float one."""
        return mode_of(self.module)

    @property
    def chat_format(self) -> ChatFormat:
        """How conversations become token ids: the checkpoint's chat template, or Gemma's built-in one."""
        if self.tokenizer is None:
            raise GenerationError("chat needs a tokenizer; this model has none")
        return ChatFormat(self.tokenizer, self.metadata.chat_template)

    def default_sampling(self) -> Sampling:
        """The checkpoint's sampling defaults (generation_config.json, as transformers reads it:
        greedy unless do_sample), the sampling of calls that pass none."""
        g = self.metadata.generation
        if not g.do_sample:
            return Sampling()
        return Sampling(temperature=1.0 if g.temperature is None else float(g.temperature),
                        top_k=50 if g.top_k is None else g.top_k or None,
                        top_p=None if g.top_p in (None, 1, 1.0) else float(g.top_p))

    def default_max_new_tokens(self, prompt_tokens: int, fallback: int) -> int:
        """generation_config.json's max_new_tokens, or what its max_length leaves after the prompt
        (at least 1), or `fallback`."""
        g = self.metadata.generation
        if g.max_new_tokens is not None:
            return g.max_new_tokens
        if g.max_length is not None:
            return max(1, g.max_length - prompt_tokens)
        return fallback

    @property
    def stop_ids(self) -> list[int]:
        """Where generation ends by default: generation_config.json's eos ids, else the tokenizer's stop ids."""
        eos = self.metadata.generation.eos_ids
        if eos is not None:
            return list(eos)
        return self.tokenizer.stop_ids if self.tokenizer is not None else []

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Token ids (B, T) -> float32 logits (B, T, V) from one full forward, no cache."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        return self.module(ids).float()

    # -- generation (the engine does the work: runtime/engine.py) ---------------------------------
    def engine(self, max_batch: int = 1, max_len: int | None = None, prefill_budget: int | None = None,
               prefix_cache: int | None = None, prefill_share: float | None = None,
               kv_dtype: torch.dtype | None = None) -> Engine:
        """A generation engine over this model, in its compile mode (see Engine for the
        arguments). max_len: tokens per request (default: the model's context); under
        compile="aot" it rounds up to a power of two (>= 256), since a step is compiled per cache
        shape and jobs of similar size then share one."""
        return Engine(self.module, self.tokenizer, max_batch=max_batch, max_len=self._cache_len(max_len),
                      compile=self.compile, prefill_budget=prefill_budget, prefix_cache=prefix_cache,
                      prefill_share=prefill_share, kv_dtype=kv_dtype)

    def _cache_len(self, max_len: int | None):
        limit = self.config.max_seq_len
        needed = limit if max_len is None else max_len
        if compiles_ahead(self.compile, self.module) and isinstance(needed, int) and needed > 0:
            needed = max(256, 1 << (needed - 1).bit_length())
        return min(needed, limit) if isinstance(needed, int) else needed

    def prepare(self, max_batch: int = 1, max_len: int | None = None) -> None:
        """Readies the engine that generate/stream use for these sizes (max_len: prompt + new
        tokens), waiting for its compiled step where one is being compiled in the background:
        a warm-up, for servers and measurements."""
        engine = self._take(max_batch, max_len)
        engine.decode_step.wait()
        self._give(engine)

    def _take(self, max_batch: int, max_len: int | None) -> Engine:
        """An idle engine of this shape, or a new one: one caller's until it `_give`s it back."""
        with self._idle_lock:
            engine = self._idle.pop((max_batch, self._cache_len(max_len)), None)
        return engine or self.engine(max_batch, max_len)

    def _give(self, engine: Engine) -> None:
        for r in engine.requests + engine.waiting:  # an interrupted call leaves an idle engine behind
            engine.cancel(r)
        with self._idle_lock:
            self._idle[(engine.max_batch, engine.max_len)] = engine
            while len(self._idle) > _IDLE_ENGINES:
                self._idle.popitem(last=False)

    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int | None = None, sampling: Sampling | None = None,
                 stop: Sequence[str] | None = None, *, stop_ids: Sequence[int] | None = None,
                 max_batch: int = 16, **sampling_fields):
        """The continuation of a prompt (str), or of each prompt of a list, batched in one engine.

        Prompts are strings (encoded with <bos>) or lists of token ids (used as they are).
        sampling: a Sampling (default: the checkpoint's, `default_sampling`); keyword fields
        (temperature=0.7, seed=1, ...) override its fields.
        max_new_tokens: default the checkpoint's (`default_max_new_tokens`), else 64.
        stop: stop strings (not part of the result); stop_ids default to `stop_ids`.
        Returns the continuation text without the stop id or string; an LM without a tokenizer
        takes token ids and returns the generated ids (a list, or a list of lists).
        """
        prompts, single = self._prompts(prompt)
        sampling = self._sampling(sampling, sampling_fields)
        longest = max(len(p) for p in prompts)
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens(longest, 64)
        engine = self._take(min(max_batch, len(prompts)), longest + max_new_tokens)
        try:
            requests = [engine.submit(ids, max_new_tokens, sampling, self._stop_ids(stop_ids), stop or ())
                        for ids in prompts]
            while engine.busy:
                engine.step()
        finally:
            self._give(engine)
        results = [r.text if self.tokenizer else r.generated_ids for r in requests]
        return results[0] if single else results

    def stream(self, prompt: Prompt, max_new_tokens: int | None = None, sampling: Sampling | None = None,
               stop: Sequence[str] | None = None, *, stop_ids: Sequence[int] | None = None,
               **sampling_fields) -> Iterator[str]:
        """The continuation of one prompt in pieces as they are generated (see `generate`); the
        pieces never split a character and join to `generate`'s text. Without a tokenizer it yields
        token ids."""
        prompts, single = self._prompts(prompt)
        if not single:
            raise GenerationError("stream takes one prompt; use generate for a list")
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens(len(prompts[0]), 64)
        engine = self._take(1, len(prompts[0]) + max_new_tokens)
        try:  # a request the engine refuses fails here, not at the first piece
            request = engine.submit(prompts[0], max_new_tokens, self._sampling(sampling, sampling_fields),
                                    self._stop_ids(stop_ids), stop or ())
        except BaseException:
            self._give(engine)
            raise
        return self._pieces(engine, request)

    def _pieces(self, engine: Engine, request) -> Iterator:
        try:
            for d in engine.stream(request):  # cancelled if the reader stops early
                if self.tokenizer is None:
                    if d.token_id not in request.stop_ids:
                        yield d.token_id
                elif d.text:
                    yield d.text
        finally:
            self._give(engine)

    def chat(self, system: str | None = None, sampling: Sampling | None = None, max_new_tokens: int | None = None,
             max_len: int | None = None, **sampling_fields):
        """A ChatSession (send/stream/reset/messages) that keeps its KV cache between turns, in the
        checkpoint's chat template (`chat_format`); sampling and max_new_tokens default to the
        checkpoint's (else greedy, and 512 tokens a reply).

        max_len: the longest conversation in tokens (default: the model's context).
        """
        fmt = self.chat_format
        stop_ids = list(dict.fromkeys(self.stop_ids + self.tokenizer.stop_ids))  # a turn's end stops a reply too
        return ChatSession(self.engine(1, max_len), system, self._sampling(sampling, sampling_fields),
                           self.default_max_new_tokens(0, 512) if max_new_tokens is None else max_new_tokens, fmt,
                           stop_ids)

    def save(self, folder: str | os.PathLike, progress: bool = True):
        """Writes the model and its tokenizer as a Hugging Face folder (checkpoints.hf.save)."""
        from .checkpoints import hf

        return hf.save(self.module, folder, tokenizer=self.tokenizer, progress=progress, meta=self.metadata)

    def save_gguf(self, path: str | os.PathLike, type: str = "f16", progress: bool = True):
        """Writes the model and its tokenizer as one GGUF file in llama.cpp's layout; `type` is f32, f16,
        bf16, q8_0 or q4_k_m (llama.cpp's mixture, made by llama-cpp-python); checkpoints.gguf_writer."""
        from .checkpoints import gguf_writer

        return gguf_writer.save(self.module, path, type=type, tokenizer=self.tokenizer,
                                chat_template=self.metadata.chat_template, progress=progress)

    def _stop_ids(self, stop_ids: Sequence[int] | None) -> Sequence[int]:
        return stop_ids if stop_ids is not None else self.stop_ids

    def _sampling(self, sampling: Sampling | None, fields: dict) -> Sampling:
        sampling = sampling or self.default_sampling()
        return sampling.replace(**fields) if fields else sampling

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
        return quantized_parameters(self.module) + sum(p.numel() for p in self.module.parameters())

    def nbytes(self) -> int:
        """Bytes of the weights; quantized weights and their scales are buffers, so those count too."""
        return sum(t.numel() * t.element_size() for t in (*self.module.parameters(), *self.module.buffers()))

    def __repr__(self) -> str:
        return f"LM({self.source or self.config.family}, {self.num_parameters():,} parameters, {self.dtype})"
