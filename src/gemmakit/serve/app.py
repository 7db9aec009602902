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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GemmaError, TokenizerError
from ..runtime.sampling import Sampling
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    new_id,
    now,
    usage,
)
from .scheduler import Finished, Job, Piece, Scheduler

log = logging.getLogger("gemmakit.serve")


def create_app(lm, model_name: str | None = None, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_len: int | None = None) -> FastAPI:
    """An app serving `lm` (a gemmakit.LM with a tokenizer) under `model_name`.

    max_batch: engine rows, the requests decoded together; max_queue: requests that may wait for a
    row before new ones are refused with 503; max_len: context (prompt + completion) per request.
    """
    if lm.tokenizer is None:
        raise TokenizerError("the model has no tokenizer; pass one with --tokenizer")
    max_len = min(max_len or lm.config.max_seq_len, lm.config.max_seq_len)
    # At most 512 prompt tokens are admitted between two decode steps: a burst of long prompts
    # joins over several steps instead of stalling the running streams for all of them.
    engine = lm.engine(max_batch=max_batch, max_len=max_len, prefill_budget=512)
    metrics = ServerMetrics(lambda: scheduler.stats())
    scheduler = Scheduler(engine, max_queue=max_queue, metrics=metrics)
    name = model_name or default_model_name(lm.source)
    server = _Server(lm, scheduler, name, max_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()  # after uvicorn's graceful wait: whatever is still running is cancelled

    app = FastAPI(title="gemmakit", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.model_name = name
    if api_key:
        app.add_middleware(_APIKey, api_key=api_key)
    app.add_middleware(_BodyLimit, max_bytes=MAX_BODY_BYTES)
    for exc_type, handler in _handlers().items():
        app.add_exception_handler(exc_type, handler)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **scheduler.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.complete(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await server.chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return server.detokenize(body)

    return app


MAX_BODY_BYTES = 8 << 20  # a full 32k-token context is well under 1 MiB of JSON


def default_model_name(source: str) -> str:
    """The id clients pass as `model`: the checkpoint's file or folder name, or the preset name."""
    return Path(str(source)).stem or "gemma"


class _Server:
    """What the routes do, apart from FastAPI's plumbing."""

    def __init__(self, lm, scheduler: Scheduler, name: str, max_len: int):
        self.lm, self.tok, self.scheduler, self.name, self.max_len = lm, lm.tokenizer, scheduler, name, max_len
        self.created = now()

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gemmakit",
                "context_length": self.max_len}

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.name}`",
                           param="model", code="model_not_found")

    async def complete(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        if isinstance(body.prompt, str):
            ids = self.tok.encode(body.prompt)
        else:
            bad = [i for i in body.prompt if not 0 <= i < self.lm.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"(0..{self.lm.config.vocab_size - 1})", param="prompt")
            ids = list(body.prompt)
        job = self._job(body, ids, body.max_tokens, default_max_tokens=16)  # OpenAI's default for completions
        echo = (body.prompt if isinstance(body.prompt, str) else self.tok.decode(ids)) if body.echo else ""
        rid = new_id("cmpl")

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": now(), "model": self.name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        if body.stream:
            return self._stream(job, request, rid, chunk, first=chunk(echo, None) if echo else None,
                                include_usage=body.include_usage)
        text, finished = await self._collect(job, request)
        out = chunk(echo + text, finished.reason)
        out["usage"] = usage(len(ids), finished.completion_tokens)
        return out

    def tokenize(self, body: TokenizeRequest) -> dict:
        if body.model is not None:
            self.check_model(body.model)
        texts = [t for t in (body.prompt, body.content) if t is not None]
        if len(texts) + (body.messages is not None) != 1:
            raise APIError(400, "send one of prompt (or content) and messages", param="prompt")
        ids = self._chat_ids(body.messages) if body.messages is not None else \
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

    def _chat_ids(self, messages) -> list[int]:
        try:
            return self.tok.chat_ids([{"role": m.role, "content": m.text()} for m in messages])
        except TokenizerError as e:
            raise APIError(400, str(e), param="messages") from None

    async def chat(self, body: ChatRequest, request: Request):
        self.check_model(body.model)
        ids = self._chat_ids(body.messages)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        job = self._job(body, ids, getattr(body, field), default_max_tokens=None, field=field)
        rid = new_id("chatcmpl")

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": self.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        if body.stream:
            return self._stream(job, request, rid,
                                lambda text, finish: chunk({"content": text} if text else {}, finish),
                                first=chunk({"role": "assistant", "content": ""}, None),
                                include_usage=body.include_usage, object="chat.completion.chunk")
        text, finished = await self._collect(job, request)
        return {"id": rid, "object": "chat.completion", "created": now(), "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finished.reason, "logprobs": None}],
                "usage": usage(len(ids), finished.completion_tokens)}

    # -- shared by both endpoints -------------------------------------------------------------
    def _job(self, body, ids: list[int], max_tokens: int | None, default_max_tokens: int | None,
             field: str = "max_tokens") -> Job:
        room = self.max_len - len(ids)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens; the prompt has "
                                f"{len(ids)}", param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens or room, room)
        if max_tokens < 1:
            raise APIError(400, f"{field} must be at least 1, got {max_tokens}", param=field)
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens; you requested "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the "
                                "completion)", param=field, code="context_length_exceeded")
        try:
            sampling = Sampling(temperature=body.temperature, top_p=None if body.top_p == 1.0 else body.top_p,
                                top_k=body.top_k or None, min_p=body.min_p,
                                repetition_penalty=body.repetition_penalty, seed=body.seed)
        except GemmaError as e:
            raise APIError(400, str(e)) from None
        job = Job(ids, max_tokens, sampling, body.stop, asyncio.get_running_loop())
        self.scheduler.submit(job)
        return job

    async def _collect(self, job: Job, request: Request) -> tuple[str, Finished]:
        """The whole completion; if the client hangs up first, its row is freed."""

        work, gone = asyncio.ensure_future(job.result()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                self.scheduler.cancel(job)
        if not work.done() or work.cancelled():
            raise APIError(499, "the client closed the connection")  # nobody reads this
        return work.result()

    def _stream(self, job: Job, request: Request, rid: str, chunk, first: dict | None, include_usage: bool,
                object: str = "text_completion") -> StreamingResponse:
        async def events():
            finished = False
            try:
                if first is not None:
                    yield _sse(first)
                completion_tokens = 0
                while True:
                    event = await job.events.get()
                    if isinstance(event, Piece):
                        yield _sse(chunk(event.text, None))
                    elif isinstance(event, Finished):
                        finished = True
                        completion_tokens = event.completion_tokens
                        yield _sse(chunk("", event.reason))
                        break
                    else:
                        finished = True  # the scheduler already dropped it
                        yield _sse(event.error.body())
                        break
                if include_usage and completion_tokens:
                    yield _sse({"id": rid, "object": object, "created": now(), "model": self.name, "choices": [],
                                "usage": usage(len(job.prompt_ids), completion_tokens)})
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client hung up (Starlette cancels this generator)
                    self.scheduler.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
        if err.get("type") == "json_invalid":
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
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    return {APIError: api_error, RequestValidationError: invalid, StarletteHTTPException: http_error,
            Exception: internal}


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
        if scope["type"] == "http" and scope["path"].startswith(("/v1", "/tokenize", "/detokenize")):
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
    """Refuses a body whose declared length is beyond any context before a byte of it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_bytes:
                response = JSONResponse(error_body(f"request body over {self.max_bytes} bytes", code="body_too_large"),
                                        status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
