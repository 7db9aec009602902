"""Chat templates that checkpoints ship (Jinja, as transformers renders them), and `ChatFormat`:
a conversation's token ids, from the checkpoint's template or the built-in Gemma one.

Templates are code from a file: they run in jinja2's immutable sandbox with transformers' globals
(raise_exception, strftime_now, tojson), and a render that runs too long or writes too much is
stopped, so that a hostile or broken template costs a one-line error, not a hung server.
"""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from .errors import TokenizerError
from .tokenizer import Tokenizer


class ChatTemplateError(TokenizerError):
    """A checkpoint's chat template that does not parse, raises, or runs away."""


MAX_SECONDS = 2.0  # a real template renders a long conversation in milliseconds
MAX_CHARS = 8 << 20  # the server's largest request body; no context holds more text


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's template(s): `variants` are (name, Jinja source) pairs, "default" first;
    `origin` is the file (and field) they came from, for error messages."""

    variants: tuple[tuple[str, str], ...]
    origin: str
    max_seconds: float = MAX_SECONDS
    max_chars: int = MAX_CHARS

    @classmethod
    def of(cls, value, origin: str) -> ChatTemplate:
        """From tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"}."""
        if isinstance(value, str):
            return cls((("default", value),), origin)
        if not isinstance(value, list) or not all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in value):
            raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of "
                                    "{\"name\": ..., \"template\": ...} objects")
        named = {t["name"]: t["template"] for t in value}
        if "default" not in named:
            raise ChatTemplateError(f"{origin}: chat_template lists {', '.join(named) or 'no templates'} "
                                    "but none named 'default'")
        return cls((("default", named.pop("default")), *named.items()), origin)

    @property
    def text(self) -> str:
        return self.variants[0][1]

    def source(self, tools: list | None = None) -> str:
        """The template a conversation uses: "tool_use" where there are tools and one by that name (as transformers)."""
        named = dict(self.variants)
        return named["tool_use"] if tools and "tool_use" in named else self.text

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
               **special_tokens: str) -> str:
        """The conversation as the template writes it (special_tokens: bos_token=..., eos_token=...)."""
        template = _compile(self.source(tools), self.origin)
        context = {"messages": messages, "add_generation_prompt": add_generation_prompt, **special_tokens}
        if tools:
            context["tools"] = tools
        deadline = time.monotonic() + self.max_seconds
        out, size = [], 0
        try:
            with _limits(deadline, self):
                for chunk in template.generate(**context):
                    size += len(chunk)
                    if size > self.max_chars:
                        raise _Runaway(f"output over {self.max_chars:,} characters")
                    if time.monotonic() > deadline:
                        raise _Runaway(f"still rendering after {self.max_seconds:g} s")
                    out.append(chunk)
        except _Runaway as e:
            raise ChatTemplateError(f"{self.origin}: chat template stopped: {e}") from None
        except RecursionError:
            raise ChatTemplateError(f"{self.origin}: chat template stopped: it recursed too deeply") from None
        except Exception as e:  # TemplateError, SecurityError, and whatever a template's expressions raise
            raise ChatTemplateError(f"{self.origin}: chat template: {_one_line(e)}") from None
        return "".join(out)


class _Runaway(Exception):
    pass


def _one_line(e: Exception) -> str:
    message = " ".join(str(e).split()) or type(e).__name__
    return message if len(message) < 300 else message[:297] + "..."


_active: ContextVar[_limits | None] = ContextVar("chat_template_limits", default=None)


class _limits:
    """Checks the deadline wherever a template calls, reads or multiplies: a loop that writes
    nothing is still stopped (the sandbox already caps range() at 100,000 items)."""

    def __init__(self, deadline: float, template: ChatTemplate):
        self.deadline, self.template = deadline, template

    def __enter__(self):
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc):
        _active.reset(self._token)

    def check(self, value=None):
        if time.monotonic() > self.deadline:
            raise _Runaway(f"still rendering after {self.template.max_seconds:g} s")
        if isinstance(value, (str, list, tuple)) and len(value) > self.template.max_chars:
            raise _Runaway(f"a value over {self.template.max_chars:,} items")
        return value


@lru_cache(maxsize=16)
def _compile(source: str, origin: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def _check(self, value=None):
            limits = _active.get()
            return limits.check(value) if limits is not None else value

        def call(self, context, obj, *args, **kwargs):
            self._check()
            return self._check(super().call(context, obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise _Runaway(f"an exponent of {right}")
            limits = _active.get()
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                    and len(left) * right > (limits.template.max_chars if limits else MAX_CHARS):
                raise _Runaway("a repeated value over the size limit")
            return self._check(super().call_binop(context, operator, left, right))

        def getattr(self, obj, attribute):
            self._check()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self._check()
            return super().getitem(obj, argument)

    class Generation(jinja2.ext.Extension):
        """transformers' {% generation %} block (it marks the assistant's tokens); renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own: Jinja's escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: chat template line {e.lineno}: {_one_line(e)}") from None


class ChatFormat:
    """A conversation's token ids: the checkpoint's template when it has one, else the built-in
    Gemma format (Tokenizer.chat_ids, which checks roles and the family's system rule itself)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None = None):
        self.tokenizer, self.template = tokenizer, template

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, add_bos: bool = True,
                 tools: list | None = None) -> list[int]:
        if self.template is None:
            return self.tokenizer.chat_ids(messages, add_generation_prompt, add_bos)
        ids = self.tokenizer.encode_special(self.render(messages, add_generation_prompt, tools))
        return ids if add_bos or ids[:1] != [self.tokenizer.bos_id] else ids[1:]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The conversation as text (with its special tokens written out)."""
        if self.template is None:
            return self.tokenizer.render_chat(messages, add_generation_prompt)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content'")
        tok = self.tokenizer
        return self.template.render(messages, add_generation_prompt, tools, bos_token=tok.piece(tok.bos_id),
                                    eos_token=tok.piece(tok.eos_id), pad_token=tok.piece(tok.pad_id))

    @property
    def jinja(self) -> str:
        """The template as Jinja source, for clients that render it themselves."""
        from .tokenizer import CHAT_TEMPLATE

        return self.template.text if self.template is not None else CHAT_TEMPLATE
