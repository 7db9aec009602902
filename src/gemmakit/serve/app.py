"""The HTTP app: OpenAI-compatible routes over one continuous-batching scheduler.

`create_app(lm)` returns a FastAPI app; `gemmakit serve` runs it with uvicorn. Handlers only
validate, tokenize and format: generation happens on the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GemmaError, TokenizerError
from ..runtime.grammar import Grammar
from ..runtime.sampling import Sampling
from ..tokenizer import BYTE_PIECE
from . import tools
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
    error_body,
    new_id,
    now,
    usage,
)
from .scheduler import Failed, Finished, Job, Piece, Scheduler

log = logging.getLogger("gemmakit.serve")


def create_app(lm, model_name: str | None = None, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_len: int | None = None, prefill_budget: int = 512,
               prefill_share: float | None = 1.0, prefix_cache: int | None = None, own_thread: bool = True) -> FastAPI:
    """An app serving `lm` (a gemmakit.LM with a tokenizer) under `model_name`.

    max_batch: engine rows, the requests decoded together; max_queue: requests that may wait for a
    row before new ones are refused with 503; max_len: context (prompt + completion) per request;
    prefill_budget, prefill_share: how much prompt a step prefills while others decode, in tokens
    and as a share of a decode step's time; prefix_cache: tokens the prefix cache keeps (Engine's). own_thread=False: the caller drives the engine with
    `app.state.scheduler.run()` on the thread that loaded the model (see scheduler.py: faster),
    and the app only stops it at shutdown.
    """
    if lm.tokenizer is None:
        raise TokenizerError("the model has no tokenizer; pass one with --tokenizer")
    max_len = min(max_len or lm.config.max_seq_len, lm.config.max_seq_len)
    engine = lm.engine(max_batch=max_batch, max_len=max_len, prefill_budget=prefill_budget, prefix_cache=prefix_cache,
                       prefill_share=prefill_share)
    metrics = ServerMetrics(lambda: scheduler.stats())
    scheduler = Scheduler(engine, max_queue=max_queue, metrics=metrics)
    name = model_name or default_model_name(lm.source)
    server = _Server(lm, scheduler, name, max_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own_thread:
            scheduler.start()
        yield
        scheduler.stop()  # after uvicorn's graceful wait: whatever is still running is cancelled

    # "default": every error answer has OpenAI's body (and FastAPI then declares no 422 of its own)
    app = FastAPI(title="gemmakit", lifespan=lifespan,
                  responses={"default": {"model": ErrorResponse, "description": "An error, in OpenAI's shape"}})
    app.state.scheduler = scheduler
    app.state.model_name = name
    if api_key:
        app.add_middleware(_APIKey, api_key=api_key)
    app.add_middleware(_BodyLimit, max_bytes=MAX_BODY_BYTES)
    for exc_type, handler in _handlers().items():
        app.add_exception_handler(exc_type, handler)

    @app.get("/", include_in_schema=False)
    async def page():
        return Response(_page_file("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/page/{name}", include_in_schema=False)
    async def page_asset(name: str):
        if name not in _PAGE_TYPES:
            raise StarletteHTTPException(404, f"no page file {name!r}")
        return Response(_page_file(name), media_type=_PAGE_TYPES[name])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **scheduler.stats()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    # the answer, or with "stream": true its server-sent events
    streamed = {200: {"description": "The answer", "content": {"application/json": {}, "text/event-stream": {}}}}

    @app.post("/v1/completions", responses=streamed)
    async def completions(body: CompletionRequest, request: Request):
        return await server.complete(body, request)

    @app.post("/v1/chat/completions", responses=streamed)
    async def chat_completions(body: ChatRequest, request: Request):
        return await server.chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return server.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return server.tokenizer_info()

    return app


MAX_BODY_BYTES = 8 << 20  # a full 32k-token context is well under 1 MiB of JSON
# The chat page at / (plain files shipped in the package: serve/page/), and its two assets.
_PAGE_TYPES = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}


def _page_file(name: str) -> bytes:
    from importlib.resources import files

    return (files(__package__) / "page" / name).read_bytes()


def default_model_name(source: str) -> str:
    """The id clients pass as `model`: the checkpoint's file or folder name, or the preset name."""
    return Path(str(source)).stem or "gemma"


class _Server:
    """What the routes do, apart from FastAPI's plumbing."""

    def __init__(self, lm, scheduler: Scheduler, name: str, max_len: int):
        self.lm, self.tok, self.scheduler, self.name, self.max_len = lm, lm.tokenizer, scheduler, name, max_len
        self.vocab = min(lm.config.vocab_size, self.tok.vocab_size)
        self.format = lm.chat_format  # the checkpoint's chat template, or Gemma's
        g = lm.metadata.generation
        # generation_config.json's defaults for the fields a request leaves out, where the file
        # says whether to sample (else OpenAI's: temperature 1)
        self.defaults = {}
        if g.do_sample is not None:
            s = lm.default_sampling()
            self.defaults = {"temperature": s.temperature, "top_p": s.top_p or 1.0, "top_k": s.top_k}
        self.default_max_tokens = g.max_new_tokens
        self.chat_stops = list(dict.fromkeys(lm.stop_ids + self.tok.stop_ids))  # a turn's end stops a reply too
        self.created = now()
        self._pieces: dict[int, tuple[str, list[int]]] = {}  # token id -> its text and bytes (logprobs)

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gemmakit",
                "context_length": self.max_len}

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.name}`",
                           param="model", code="model_not_found")

    # -- /v1/completions ------------------------------------------------------------------------
    async def complete(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of must equal n or be left out: every choice sampled is returned", param="best_of")
        if body.suffix and any(not isinstance(p, str) for p in body.prompts):
            raise APIError(400, "suffix needs a text prompt", param="suffix")
        prompts = [self._fim(p, body.suffix) if body.suffix else self._prompt_ids(p) for p in body.prompts]
        score_only = body.max_tokens == 0  # echo's logprobs of the prompt and nothing generated
        if score_only and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        options = {"logprobs": body.logprobs,
                   "prompt_logprobs": body.logprobs if body.echo and body.logprobs is not None else None}
        jobs = self._jobs(body, prompts, 1 if score_only else body.max_tokens,
                          default_max_tokens=self.default_max_tokens or 16, options=options,
                          stop_ids=self.fim_stops if body.suffix else self.lm.stop_ids)
        echoes = [(p if isinstance(p, str) else self.tok.decode(ids)) if body.echo else ""
                  for p, ids in zip(body.prompts, prompts)]
        rid = new_id("cmpl")

        def chunk(choices: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": now(), "model": self.name, "choices": choices}

        def choice(job: Job, text: str, tokens: list, finish: str | None, offset: int = 0) -> dict:
            logprobs = self._completion_logprobs(tokens, offset) if body.logprobs is not None else None
            return {"index": job.index, "text": text, "finish_reason": finish, "logprobs": logprobs}

        def echoed(job: Job) -> tuple[str, list]:
            """The prompt's text and scored tokens (the first token is predicted by nothing)."""
            prompt = job.prompt_ids
            scores = job.handle.input_logprobs if body.logprobs is not None else []
            return echoes[job.index // body.n], [(t, *(s or (None, None))) for t, s in zip(prompt, scores)]

        if body.stream:
            offsets = {job.index: 0 for job in jobs}  # text_offset counts from the choice's start

            def sent(job: Job, text: str, tokens: list, finish: str | None) -> list[dict]:
                out = choice(job, text, tokens, finish, offsets[job.index])
                offsets[job.index] += sum(len(self._piece(t)[0]) for t, *_ in tokens)
                return [chunk([out])]

            def first(job: Job) -> list[dict]:  # sent once the job's prefill is done (its scores are there)
                return sent(job, *echoed(job), None) if body.echo else []

            def piece(job: Job, text: str, tokens: list, finish: str | None) -> list[dict]:
                if score_only:
                    text, tokens = "", []
                return sent(job, text, tokens, finish) if text or tokens or finish else []

            return self._stream(jobs, request, rid, "text_completion", first, piece,
                                sum(map(len, prompts)) if body.include_usage else None)
        results = await self._collect(jobs, request)
        choices = []
        for job, (text, tokens, finished) in zip(jobs, results):
            if score_only:
                text, tokens = "", []
            echo_text, echo_tokens = echoed(job)
            choices.append(choice(job, echo_text + text, echo_tokens + tokens, finished.reason))
        out = chunk(choices)
        out["usage"] = usage(sum(map(len, prompts)), 0 if score_only else sum(f.completion_tokens for *_, f in results))
        return out

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt)
        bad = [i for i in prompt if not 0 <= i < self.lm.config.vocab_size]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                f"(0..{self.lm.config.vocab_size - 1})", param="prompt")
        return list(prompt)

    _FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")

    def _fim(self, prefix: str, suffix: str) -> list[int]:
        """CodeGemma's fill-in-the-middle prompt: <bos><|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>."""
        if not all(self.tok.has_token(t) for t in self._FIM):
            raise APIError(400, "suffix (fill-in-the-middle) needs a model whose vocabulary has CodeGemma's "
                                "<|fim_prefix|>, <|fim_suffix|> and <|fim_middle|>; this one has not", param="suffix")
        pre, suf, mid = (self.tok.token_id(t) for t in self._FIM)
        return [self.tok.bos_id, pre, *self.tok.encode(prefix, add_bos=False), suf,
                *self.tok.encode(suffix, add_bos=False), mid]

    @property
    def fim_stops(self) -> list[int]:
        """A middle ends at <eos> or where CodeGemma starts the next file or fill."""
        extra = [self.tok.token_id(t) for t in ("<|file_separator|>", "<|fim_prefix|>") if self.tok.has_token(t)]
        return self.lm.stop_ids + extra

    # -- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, body: ChatRequest, request: Request):
        self.check_model(body.model)
        calls, tool_mode = tools.chosen(body.tools, body.tool_choice)
        if calls and body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "response_format cannot be combined with tools (a call is JSON already)",
                           param="response_format")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        ids = self._chat_ids(tools.messages(body.messages, calls))
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        try:
            grammar = Grammar.json_schema(self.tok, tools.call_schema(calls)) if tool_mode == "required" else None
        except GemmaError as e:  # a tool's parameters that are no JSON schema the grammar engine takes
            raise APIError(400, f"tools: {e}", param="tools") from None
        jobs = self._jobs(body, [ids], getattr(body, field), default_max_tokens=self.default_max_tokens, field=field,
                          grammar=grammar, options={"logprobs": (body.top_logprobs or 0) if body.logprobs else None},
                          stop_ids=self.chat_stops)
        rid = new_id("chatcmpl")

        def chunk(choices: list[dict]) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": self.name,
                    "choices": choices}

        def logprobs(tokens: list) -> dict | None:
            return {"content": self._chat_logprobs(tokens)} if body.logprobs else None

        def answer(text: str, finish: str) -> tuple[dict, str]:
            """The message: text, or the call it makes; and the finish reason."""
            found = tools.parse(text, calls) if calls else None
            if found:
                return {"role": "assistant", "content": None, "tool_calls": found}, "tool_calls"
            return {"role": "assistant", "content": text}, finish

        if body.stream:
            held: dict[int, tuple[str, list]] = {job.index: ("", []) for job in jobs}  # a possible call, held back

            def first(job: Job) -> list[dict]:
                return [chunk([{"index": job.index, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None, "logprobs": None}])]

            def piece(job: Job, text: str, tokens: list, finish: str | None) -> list[dict]:
                if calls and held[job.index] is not None:
                    text, tokens = held[job.index][0] + text, held[job.index][1] + tokens
                    if finish is None and tools.may_be_call(text):
                        held[job.index] = (text, tokens)
                        return []
                    held[job.index] = None  # plain text from here on
                    message, reason = answer(text, finish) if finish else ({"content": text}, None)
                    if "tool_calls" in message:
                        delta = {"tool_calls": [{"index": 0, **c} for c in message["tool_calls"]]}
                        return [chunk([{"index": job.index, "delta": delta, "finish_reason": reason, "logprobs": None}])]
                    text, finish = message["content"], reason
                delta = {"content": text} if text else {}
                if not (delta or tokens or finish):
                    return []
                return [chunk([{"index": job.index, "delta": delta, "finish_reason": finish,
                                "logprobs": logprobs(tokens) if tokens else None}])]

            return self._stream(jobs, request, rid, "chat.completion.chunk", first, piece,
                                len(ids) if body.include_usage else None)
        results = await self._collect(jobs, request)
        choices = []
        for job, (text, tokens, finished) in zip(jobs, results):
            message, reason = answer(text, finished.reason)
            choices.append({"index": job.index, "message": message, "finish_reason": reason,
                            "logprobs": logprobs(tokens)})
        return {"id": rid, "object": "chat.completion", "created": now(), "model": self.name, "choices": choices,
                "usage": usage(len(ids), sum(f.completion_tokens for *_, f in results))}

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            return self.format.chat_ids(messages)
        except TokenizerError as e:
            raise APIError(400, str(e), param="messages") from None

    # -- /tokenize, /detokenize, /tokenizer_info -----------------------------------------------
    def tokenize(self, body: TokenizeRequest) -> dict:
        if body.model is not None:
            self.check_model(body.model)
        texts = [t for t in (body.prompt, body.content) if t is not None]
        if len(texts) + (body.messages is not None) != 1:
            raise APIError(400, "send one of prompt (or content) and messages", param="prompt")
        ids = self._chat_ids(tools.messages(body.messages, [])) if body.messages is not None else \
            self.tok.encode(texts[0], add_bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_len}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        if body.model is not None:
            self.check_model(body.model)
        bad = [i for i in body.tokens if not 0 <= i < self.tok.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.tok.vocab_size - 1})",
                           param="tokens")
        text = self.tok.decode(body.tokens)
        return {"prompt": text, "content": text}  # vLLM's name, llama.cpp's server's

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info, which lm-eval's remote tokenizer reads."""
        piece = self.tok.piece
        return {"tokenizer_class": "GemmaTokenizer", "bos_token": piece(self.tok.bos_id),
                "eos_token": piece(self.tok.eos_id), "pad_token": piece(self.tok.pad_id),
                "model_max_length": self.max_len, "vocab_size": self.tok.vocab_size,
                "chat_template": self.format.jinja}

    # -- shared by both endpoints -------------------------------------------------------------
    def _jobs(self, body, prompts: list[list[int]], max_tokens: int | None, default_max_tokens: int | None,
              field: str = "max_tokens", options: dict | None = None, grammar: Grammar | None = None,
              stop_ids: list[int] | None = None) -> list[Job]:
        """One job per prompt and sample (choice index = prompt * n + sample), checked and
        submitted together: a request is refused whole or runs whole."""
        for ids in prompts:
            room = self.max_len - len(ids)
            if room <= 0:
                raise APIError(400, f"This model's maximum context length is {self.max_len} tokens; the prompt has "
                                    f"{len(ids)}", param="messages" if isinstance(body, ChatRequest) else "prompt",
                               code="context_length_exceeded")
            wanted = min(default_max_tokens or room, room) if max_tokens is None else max_tokens
            if wanted < 1:
                raise APIError(400, f"{field} must be at least 1, got {wanted}", param=field)
            if wanted > room:
                raise APIError(400, f"This model's maximum context length is {self.max_len} tokens; you requested "
                                    f"{len(ids) + wanted} ({len(ids)} in the prompt, {wanted} for the "
                                    "completion)", param=field, code="context_length_exceeded")
        bad = next((i for i in body.bias if i >= self.vocab), None)
        if bad is not None:
            raise APIError(400, f"logit_bias token id {bad} is outside the vocabulary (0..{self.vocab - 1})",
                           param="logit_bias")
        grammar = grammar or self._grammar(body.response_format)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for p, ids in enumerate(prompts):
            room = self.max_len - len(ids)
            wanted = min(default_max_tokens or room, room) if max_tokens is None else max_tokens
            for k in range(body.n):
                # n samples of one seed differ from each other and repeat from run to run
                seed = None if body.seed is None else (body.seed + k) % 2**64
                given = {f: getattr(body, f) if f in body.model_fields_set else self.defaults.get(f, getattr(body, f))
                         for f in ("temperature", "top_p", "top_k")}
                try:
                    sampling = Sampling(temperature=given["temperature"],
                                        top_p=None if given["top_p"] == 1.0 else given["top_p"],
                                        top_k=given["top_k"] or None, min_p=body.min_p,
                                        repetition_penalty=body.repetition_penalty,
                                        presence_penalty=body.presence_penalty,
                                        frequency_penalty=body.frequency_penalty, logit_bias=body.bias, seed=seed)
                except GemmaError as e:
                    raise APIError(400, str(e)) from None
                job_options = dict(options or {}, constraint=grammar.constraint() if grammar else None)
                jobs.append(Job(ids, wanted, sampling, body.stop, loop, events=events, index=p * body.n + k,
                                options=job_options, stop_ids=[] if body.ignore_eos else stop_ids))
        self.scheduler.submit_all(jobs)
        return jobs

    def _grammar(self, response_format) -> Grammar | None:
        if response_format is None or response_format.type == "text":
            return None
        try:
            if response_format.type == "json_object":
                return Grammar.json_object(self.tok)
            return Grammar.json_schema(self.tok, response_format.schema)
        except GemmaError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from None

    async def _collect(self, jobs: list[Job], request: Request) -> list[tuple[str, list, Finished]]:
        """Every job's text, scored tokens and end, in job order; if the client hangs up first,
        their rows are freed."""
        work, gone = asyncio.ensure_future(_gather(jobs)), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                for job in jobs:
                    self.scheduler.cancel(job)
        if not work.done() or work.cancelled():
            raise APIError(499, "the client closed the connection")  # nobody reads this
        return work.result()

    def _stream(self, jobs: list[Job], request: Request, rid: str, object: str, first, piece,
                prompt_tokens: int | None) -> StreamingResponse:
        """Server-sent events: `first(job)` once a job's first token is out, then `piece(job, text,
        tokens, finish)` per piece; the chunks they return are sent in the order they come; a
        usage chunk at the end when prompt_tokens is given (stream_options.include_usage)."""
        events_queue = jobs[0].events

        async def events():
            live = set(range(len(jobs)))
            started: set[int] = set()
            completion_tokens = 0
            try:
                while live:
                    event = await events_queue.get()
                    job = event.job
                    if isinstance(event, Failed):
                        live.clear()  # the scheduler already dropped it; the others are cancelled below
                        yield _sse(event.error.body())
                        break
                    if job.index not in started:
                        started.add(job.index)
                        for c in first(job):
                            yield _sse(c)
                    if isinstance(event, Piece):
                        chunks = piece(job, event.text, event.tokens, None)
                    else:
                        live.discard(job.index)
                        completion_tokens += event.completion_tokens
                        chunks = piece(job, "", [], event.reason)
                    for c in chunks:
                        yield _sse(c)
                if prompt_tokens is not None and completion_tokens:
                    yield _sse({"id": rid, "object": object, "created": now(), "model": self.name, "choices": [],
                                "usage": usage(prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"
            finally:
                for job in jobs:  # the client hung up (Starlette cancels this generator), or a job failed
                    if job.index in live or not job.handle or not job.handle.finished:
                        self.scheduler.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- logprobs in OpenAI's two shapes --------------------------------------------------------
    def _piece(self, token: int) -> tuple[str, list[int]]:
        """A token's text (SentencePiece's '▁' a space; a byte token its byte) and its bytes."""
        if token not in self._pieces:
            piece = self.tok.piece(token)
            byte = BYTE_PIECE.fullmatch(piece)
            raw = bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
            self._pieces[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._pieces[token]

    def _completion_logprobs(self, tokens: list, offset: int = 0) -> dict:
        """The completions endpoint's: parallel lists (None for the first prompt token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in tokens:
            text = self._piece(token)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self._piece(i)[0]: v for i, v in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _chat_logprobs(self, tokens: list) -> list[dict]:
        """The chat endpoint's: one entry per token of the answer (a final stop token is not part of it)."""
        stops = set(self.chat_stops)
        out = []
        for token, lp, top in tokens:
            if token in stops:
                continue
            text, raw = self._piece(token)
            out.append({"token": text, "logprob": lp, "bytes": raw,
                        "top_logprobs": [{"token": self._piece(i)[0], "logprob": v, "bytes": self._piece(i)[1]}
                                         for i, v in top]})
        return out


async def _gather(jobs: list[Job]) -> list[tuple[str, list, Finished]]:
    """Reads the events the jobs share until every job has finished; raises the first failure."""
    texts: dict[int, list[str]] = {job.index: [] for job in jobs}
    tokens: dict[int, list] = {job.index: [] for job in jobs}
    ends: dict[int, Finished] = {}
    events = jobs[0].events
    while len(ends) < len(jobs):
        event = await events.get()
        i = event.job.index
        if isinstance(event, Piece):
            texts[i].append(event.text)
            tokens[i] += event.tokens
        elif isinstance(event, Finished):
            ends[i] = event
        else:
            raise event.error
    return [("".join(texts[j.index]), tokens[j.index], ends[j.index]) for j in jobs]


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- errors in OpenAI's shape -----------------------------------------------------------------
def _handlers() -> dict:
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        err = errors[0]
        param = _param(err.get("loc", ()))
        if err.get("type") == "unpaired_surrogate":
            message, param = err["msg"], err["ctx"]["field"]
        elif err.get("type") == "json_invalid":
            message, param = f"could not parse the JSON body: {err.get('ctx', {}).get('error', err['msg'])}", None
        elif err.get("type") == "missing":
            message = f"missing required field '{param}'" if param else "missing JSON body"
        elif param:
            # A union (stop: str | list[str]) reports one error per alternative: say them all.
            msgs = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors
                                 if _param(e.get("loc", ())) == param)
            message = f"{param}: {' or '.join(msgs)}, got {json.dumps(err.get('input'))[:80]}"
        else:
            message = f"the body must be a JSON object ({err['msg']})"
        return JSONResponse(error_body(message, param=param), status_code=400)

    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message, cause = str(exc.detail), exc.__cause__  # FastAPI's "error parsing the body" says no more
        if isinstance(cause, UnicodeDecodeError):
            message = f"the body is not UTF-8 text: {cause.reason} at byte {cause.start}"
        elif isinstance(cause, RecursionError):
            message = "the JSON body is nested too deeply"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    async def refused(request: Request, exc: GemmaError):
        # gemmakit's own errors describe the request (a schema, a prompt), never a server fault
        return JSONResponse(error_body(str(exc)), status_code=400)

    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    return {APIError: api_error, RequestValidationError: invalid, StarletteHTTPException: http_error,
            GemmaError: refused, Exception: internal}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _param(loc) -> str | None:
    """The field an error is about, without pydantic's union-member tags ('stop.list[str]' -> 'stop')."""
    parts = [str(p) for p in loc if p != "body" and str(p) not in _TYPE_TAGS and "[" not in str(p)]
    return ".".join(parts) or None


class _APIKey:
    """Bearer-key check on /v1, /tokenize and /detokenize before anything else is read (a pure ASGI
    middleware, so streams and disconnect detection pass through untouched). /health stays open for
    load balancers."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(("/v1", "/tokenize", "/detokenize")):  # and /tokenizer_info
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = JSONResponse(error_body("Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                                                   code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """Refuses a body beyond any context with 413: one whose declared length is, before a byte of
    it is read; a chunked one (no length declared), as soon as what came exceeds the limit, so
    that no body held in memory is larger than the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        parts, size, more = [], 0, True
        while more:  # a chunked body is read here, whole, then handed on
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(parts), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()  # what follows the body: the disconnect
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = JSONResponse(error_body(f"request body over {self.max_bytes} bytes", code="body_too_large"),
                                status_code=413)
        await response(scope, receive, send)
