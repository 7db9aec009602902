"""The OpenAI wire format: request bodies (validated by pydantic), response bodies, error bodies.

Requests are validated strictly (a string where a number belongs is a 400, not a coercion). Every
OpenAI field is honoured or refused: `functions`/`function_call` (the deprecated form of tools)
are a 400 naming the field when set; `best_of` is taken when it equals `n`. Other unknown fields
are ignored, as clients send metadata we have no use for (`user`, `metadata`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """`error_body`'s shape, for the OpenAPI schema: every 4xx and 5xx answer has it."""

    error: ErrorDetail


def _unpaired_surrogate(value) -> str | None:
    """The path of the first string in a parsed JSON body that holds an unpaired UTF-16 surrogate
    (JSON's "\\ud800" escape parses to one): no Unicode text, which the tokenizer and the UTF-8
    encoder of every answer refuse. Iterative: the body may be as deep as the JSON parser allows."""
    todo = [("", value)]
    while todo:
        path, v = todo.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "body"
        elif isinstance(v, dict):
            todo += ((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
            todo += (("key of " + (path or "body"), k) for k in v)
        elif isinstance(v, list):
            todo += ((f"{path}.{i}", x) for i, x in enumerate(v))
    return None


class _Body(BaseModel):
    """A request body: strict types, unknown fields ignored, text that is Unicode."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        where = _unpaired_surrogate(data)
        if where is not None:
            raise PydanticCustomError("unpaired_surrogate", "{field}: a string holds an unpaired UTF-16 surrogate "
                                      "(a \\ud800-\\udfff escape alone), which is no Unicode text", {"field": where})
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


# field -> the values that change nothing, which clients send by default
_UNSUPPORTED = {"functions": (None, []), "function_call": (None, "none", "auto")}
MAX_N = 16  # choices per request


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None  # {"name": ..., "schema": {...}, "strict": ...}

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v):
        if v is not None and not isinstance(v.get("schema", {}), dict):
            raise ValueError("json_schema.schema must be a JSON schema object")
        return v

    @property
    def schema(self) -> dict | None:
        """The schema a json_schema format asks for ({} without one: any JSON)."""
        if self.type != "json_schema":
            return None
        if self.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema", param="response_format")
        return self.json_schema.get("schema") or {}


class Function(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments (None: no arguments)


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: Function


class _Sampled(_Body):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Not in OpenAI's API; llama.cpp's server and vLLM accept them under these names.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    # json_schema_extra: what the validators below check, told in the OpenAPI schema too
    stop: str | list[str] | None = Field(None, json_schema_extra={"minLength": 1, "maxItems": 4,
                                                                  "items": {"minLength": 1}})
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={  # token id (as a string) -> bias
        "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": {"minimum": -100, "maximum": 100}})
    response_format: ResponseFormat | None = None
    functions: Any = None
    function_call: Any = None

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info):
        if not any(v == ok and type(v) is not bool for ok in _UNSUPPORTED[info.field_name]):
            raise ValueError(f"{info.field_name} is not supported by this server (use tools and tool_choice)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in [-100, 100], got {bias} for token {key}")
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

    @property
    def bias(self) -> dict[int, float]:
        return {int(k): b for k, b in (self.logit_bias or {}).items()}


class CompletionRequest(_Sampled):
    # text, token ids, or a list of either: one choice (n of them) per prompt
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # fill-in-the-middle
    best_of: int | None = None
    tools: Any = None  # a chat completions field; refused here rather than ignored
    tool_choice: Any = None

    @field_validator("tools", "tool_choice")
    @classmethod
    def _chat_only(cls, v, info):
        if v not in (None, [], "none"):
            raise ValueError(f"{info.field_name} belong to /v1/chat/completions")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and any(isinstance(p, (str, list)) and not p for p in v):
            raise ValueError("prompts must not be empty")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        one = isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt)
        return [self.prompt] if one else list(self.prompt)


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: dict  # {"name": ..., "arguments": a JSON string}


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore",
                              json_schema_extra={"anyOf": [  # content, or (an assistant's) calls instead
                                  {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                                  {"required": ["tool_calls"], "properties": {"tool_calls": {"minItems": 1}}}]})
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    content: str | list[dict] | None = Field(None, validate_default=True)  # None only beside tool_calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v, info):
        if v is None and not info.data.get("tool_calls"):
            raise ValueError("Field required")
        return v

    def text(self) -> str:
        """Content as text; the list form holds parts, of which we can read only text ones."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool = True  # one call per answer either way (see tools.py)


class TokenizeRequest(_Body):
    """vLLM's /tokenize body (`prompt`, or `messages` rendered with the chat template), with
    llama.cpp's server's name for the text, `content`."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(None, json_schema_extra={"minItems": 1})
    add_special_tokens: bool = True  # <bos> before a prompt

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v):
        if v is not None and not v:
            raise ValueError("messages must not be empty")
        return v


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
