"""Generated token ids -> text pieces, for streaming: `TextStream`."""

from __future__ import annotations

from typing import Sequence

from ..tokenizer import Tokenizer


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
