"""Constrained decoding: a `Grammar` (a JSON schema, any JSON object, a regex, a Lark/GBNF grammar)
compiled once against a tokenizer, and per request a `Constraint`, which says which tokens may come
next (`mask`, for `next_tokens(..., allowed=...)`) and follows the tokens chosen (`accept`).

The grammar engine is llguidance (guidance-ai's, one of vLLM's structured-output backends), chosen
over xgrammar by measuring both on Gemma 3's real 262,144-token vocabulary (2-core Xeon VM, busy;
a schema of an object with a string, an integer, an enum and an array of strings; 34 tokens of answer):

| | llguidance 1.9.1 | xgrammar 0.2.8 |
|---|---|---|
| tokenizer info, once per tokenizer | 1.05 s (+ 0.26 s for `token_bytes`) | 0.16 s (+ 0.9 s to import it) |
| compiling the schema, per request | 0.5-1.0 ms | 34-39 ms (any JSON: 75-86 ms); cached per schema |
| filling the bitmask, per token | 21 us median, 90-340 us at most | 4 us median, 40-180 us at most |
| accepting a token | 4 us | 4 us |
| what it installs | one 3 MB wheel, no dependencies | transformers, pydantic, apache-tvm-ffi, triton |

Both cost next to nothing beside a decode step (milliseconds); llguidance compiles a request's
schema 35x faster (a server compiles one for each request with a new schema) and is one light
wheel. Through this module: `Grammar.json_schema` + `constraint()` about 1 ms, `mask()` 40-50 us
(the bitmask, then numpy's unpackbits into a bool tensor: ~20 us, where unpacking with torch shifts
took 0.7-20 ms), `accept()` 4-9 us.

JSON is written with fixed separators, as `json.dumps` writes it (", " and ": ", no other
whitespace: `JSON_LAYOUT`), so that a small model cannot loop on whitespace; llguidance's default,
and vLLM's, allows any whitespace between tokens. Once the grammar is complete the mask allows only
the tokenizer's stop ids (<eos>, <end_of_turn>), and `done` says so.
"""

from __future__ import annotations

import threading
import weakref

import llguidance
import numpy as np
import torch

from ..errors import GenerationError
from ..tokenizer import Tokenizer

_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
# JSON as json.dumps writes it; llguidance's default (and vLLM's) allows any whitespace between
# tokens, on which a small model loops ("{\n\n\t\t  \n...").
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary, built once per tokenizer (about 1.3 s for Gemma 3's)."""
    with _LOCK:
        ll = _LL_TOKENIZERS.get(tokenizer)
        if ll is None:
            ll = _LL_TOKENIZERS[tokenizer] = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_Vocabulary(tokenizer)), eos_token=tokenizer.stop_ids)
    return ll


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: every token's bytes (a control token as 0xFF and its
    name, llguidance's mark for tokens that are no text) and a way to encode text."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [b"\xff" + tokenizer.piece(i).encode() if text is None else text
                       for i, text in enumerate(tokenizer.token_bytes())]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False)


class Grammar:
    """A grammar compiled against one tokenizer; immutable, so any number of requests and threads
    may share it. Each request takes its own `constraint()`."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, what: str):
        """`grammar` in llguidance's format (from its grammar_from_* functions); use the classmethods."""
        self.tokenizer = tokenizer
        self._ll = _ll_tokenizer(tokenizer)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._ll)
        if is_error:
            raise GenerationError(f"invalid {what}: {_one_line(messages[0])}")
        self._grammar = grammar

    @classmethod
    def json_schema(cls, tokenizer: Tokenizer, schema: dict) -> Grammar:
        """JSON that validates against `schema` (OpenAI's response_format json_schema)."""
        if not isinstance(schema, dict):
            raise GenerationError(f"invalid JSON schema: it must be an object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except (TypeError, ValueError) as e:  # not serializable as JSON
            raise GenerationError(f"invalid JSON schema: {_one_line(str(e))}") from None
        return cls(tokenizer, grammar, "JSON schema")

    @classmethod
    def json_object(cls, tokenizer: Tokenizer) -> Grammar:
        """Any JSON object (OpenAI's response_format json_object)."""
        return cls.json_schema(tokenizer, {"type": "object"})

    @classmethod
    def regex(cls, tokenizer: Tokenizer, pattern: str) -> Grammar:
        """Text that matches `pattern` whole (Rust's regex syntax)."""
        return cls(tokenizer, llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    @classmethod
    def ebnf(cls, tokenizer: Tokenizer, grammar: str) -> Grammar:
        """Text in a context-free grammar, written in Lark's syntax or llama.cpp's GBNF."""
        try:
            text = llguidance.grammar_from("grammar", grammar)
        except ValueError as e:
            raise GenerationError(f"invalid grammar: {_one_line(str(e))}") from None
        return cls(tokenizer, text, "grammar")

    def constraint(self) -> Constraint:
        return Constraint(self)


class Constraint:
    """One request's place in a grammar (not shared between threads)."""

    def __init__(self, grammar: Grammar):
        self._tokenizer = grammar.tokenizer
        self._matcher = llguidance.LLMatcher(grammar._ll, grammar._grammar, log_level=0)
        self._size = grammar._ll.vocab_size
        self._stops = set(grammar._ll.eos_tokens)
        # One bit per token, token 32w + b at bit b of word w; read as little-endian bytes below.
        self._bitmask = np.zeros((self._size + 31) // 32, dtype=np.int32)

    def mask(self, vocab_size: int) -> torch.Tensor:
        """The tokens allowed now: bool (vocab_size,); ids past the tokenizer's (a model's padded
        embedding) are never allowed."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        n = min(vocab_size, self._size)
        bits = torch.from_numpy(np.unpackbits(self._bitmask.view(np.uint8), count=n, bitorder="little").view(np.bool_))
        if n == vocab_size:
            return bits
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[:n] = bits
        return mask

    def accept(self, token: int) -> None:
        """Advances past `token`; GenerationError if the grammar does not allow it here."""
        token = int(token)
        # A complete grammar validates nothing more, yet takes a stop token (as its mask says).
        allowed = (token in self._stops if self._matcher.is_stopped()
                   else 0 <= token < self._size and self._matcher.validate_tokens([token]) == 1)
        if not allowed:
            piece = self._tokenizer.piece(token) if 0 <= token < self._tokenizer.vocab_size else "?"
            raise GenerationError(f"token {token} ({piece!r}) is not allowed by the grammar here")
        if not self._matcher.consume_token(token):
            error = self._matcher.get_error().splitlines()  # its first line; a parser state dump follows
            raise GenerationError(f"the grammar failed at token {token}: {error[0] if error else 'unknown error'}")

    @property
    def done(self) -> bool:
        """Whether the grammar is complete and nothing may follow but a stop token (or one was taken)."""
        return self._matcher.is_stopped()
