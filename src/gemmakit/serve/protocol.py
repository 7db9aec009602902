"""The OpenAI wire format: request bodies (validated by pydantic), response bodies, error bodies.

Requests are validated strictly (a string where a number belongs is a 400, not a coercion). OpenAI
fields this server cannot honour yet (penalties, logit_bias, response_format, tools, suffix,
best_of) are a 400 naming the field when set to anything but their no-op value: a client that
sets one relies on it. Other unknown fields are ignored, as clients send metadata we have no use
for (`user`, `metadata`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


# field -> the values that change nothing, which clients send by default
_UNSUPPORTED = {"frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
                "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
                "functions": (None, []), "function_call": (None, "none", "auto"), "best_of": (None, 1), "suffix": (None, "")}


class _Sampled(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Not in OpenAI's API; llama.cpp's server and vLLM accept them under these names.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1  # one choice per request; ask again for more
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info):
        if not any(v == ok and type(v) is not bool for ok in _UNSUPPORTED[info.field_name]):
            raise ValueError(f"{info.field_name} is not supported by this server yet (it would change the "
                             f"answer); leave it out or send {_UNSUPPORTED[info.field_name][1]!r}")
        return v

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:  # refuse rather than answer without them: a client that asked relies on them
            raise ValueError("log probabilities are not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None:
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(s == "" for s in v):
                raise ValueError("stop sequences must not be empty")
        return v or None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampled):
    prompt: str | list[int] = Field(min_length=1)  # text, or token ids
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            raise ValueError("one prompt per request (a string or a list of token ids); send the others "
                             "as requests of their own, they are batched together")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[dict]

    def text(self) -> str:
        """Content as text; the list form holds parts, of which we can read only text ones."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"content parts of type {part.get('type')!r} are not supported; "
                                    "this model reads text only", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name for max_tokens


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body (`prompt`, or `messages` rendered with the chat template), with
    llama.cpp's server's name for the text, `content`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # <bos> before a prompt

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v):
        if v is not None and not v:
            raise ValueError("messages must not be empty")
        return v


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
