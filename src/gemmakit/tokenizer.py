"""Gemma's tokenizer (SentencePiece, or a Hugging Face tokenizer.json) and the chat template.

Every source ends in one of two backends: a SentencePiece model (`tokenizer.model`, or one rebuilt
from GGUF metadata) or the `tokenizers` library (`tokenizer.json`). Both give the same ids.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from .errors import TokenizerError
from .paths import atomic_path

ROLES = {"user": "user", "model": "model", "assistant": "model"}  # OpenAI's name for the model's turn
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback: one byte of UTF-8
# Gemma's chat format (chat_ids) as a Jinja template, for clients that render it themselves (a
# server's /tokenizer_info): a system message goes before the first user turn, as Gemma 3's does.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}<bos>"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] in ('assistant', 'model') else m['role'] }}\n"
    "{{ ns.system + (m['content'] | trim) }}<end_of_turn>\n{% set ns.system = '' %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CONTROL_PIECE = re.compile(r"<start_of_turn>|<end_of_turn>|<mask>|<unused\d+>")  # no text, whatever the file says


class Tokenizer:
    def __init__(self, backend, family: str | None = None):
        self._sp = backend if hasattr(backend, "EncodeAsIds") else None
        self._hf = None if self._sp is not None else backend
        self.family = family  # decides whether a system message is allowed in chats
        self.vocab_size = self._sp.get_piece_size() if self._sp else self._hf.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = (self.token_id(t) for t in ("<bos>", "<eos>", "<pad>"))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, family: str | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
        if not data:
            raise TokenizerError(f"{path}: the tokenizer file is empty")
        if path.suffix == ".json":
            import tokenizers

            try:
                backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            except Exception as e:  # the library raises a bare Exception on malformed JSON
                raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
            return cls._named(backend, family, str(path))
        return cls.from_sentencepiece(data, family, name=str(path))

    @classmethod
    def from_sentencepiece(cls, model: bytes, family: str | None = None, name: str = "tokenizer") -> Tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
            raise TokenizerError(f"{name}: not a valid SentencePiece model ({e})") from None
        return cls._named(sp, family, name)

    @classmethod
    def _named(cls, backend, family: str | None, name: str) -> Tokenizer:
        try:
            return cls(backend, family)
        except TokenizerError as e:  # e.g. no <bos>: not a Gemma tokenizer; say which file
            raise TokenizerError(f"{name}: {e}") from None

    def save(self, folder: str | os.PathLike, chat_template: str | list = CHAT_TEMPLATE) -> Path:
        """Writes tokenizer.model (SentencePiece) or tokenizer.json into `folder`, and the
        tokenizer_config.json that tells transformers and vLLM to put <bos> first (without it
        they add none, and Gemma's answers are garbage) and the chat template (the built-in
        one unless the checkpoint had its own); returns the file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / ("tokenizer.model" if self._sp is not None else "tokenizer.json")
        with atomic_path(out) as tmp:  # never a half-written tokenizer under the real name
            if self._sp is not None:
                tmp.write_bytes(self._sp.serialized_model_proto())
            else:
                self._hf.save(str(tmp))
        settings = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    **{f"{name}_token": self.piece(i) for name, i in
                       (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))},
                    "chat_template": chat_template}
        with atomic_path(folder / "tokenizer_config.json") as tmp:
            tmp.write_text(json.dumps(settings, indent=2))
        return out

    def sentencepiece_proto(self) -> bytes | None:
        return self._sp.serialized_model_proto() if self._sp is not None else None

    # -- ids and text -------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        """The id of a special token such as '<eos>' or '<end_of_turn>'."""
        if self._sp is not None:
            i = self._sp.PieceToId(token)
            found = i != self._sp.unk_id() or token == "<unk>"
        else:
            i = self._hf.token_to_id(token)
            found = i is not None
        if not found:
            raise TokenizerError(f"the tokenizer has no token {token!r}")
        return i

    def has_token(self, token: str) -> bool:
        try:
            self.token_id(token)
            return True
        except TokenizerError:
            return False

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if self._sp is not None:
            ids = self._sp.EncodeAsIds(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_special(self, text: str) -> list[int]:
        """Ids of text in which special tokens are written out (a rendered chat template's
        "<bos><start_of_turn>user..."), as transformers tokenizes it: each special token's text is
        its id, the text between them is encoded as usual. No <bos> is added."""
        if self._hf is not None:  # the tokenizers library matches its added tokens itself
            return self._hf.encode(text, add_special_tokens=False).ids
        ids = []
        for i, part in enumerate(self._control_split.split(text)):
            if i % 2:
                ids.append(self.token_id(part))
            elif part:
                ids += self._sp.EncodeAsIds(part)  # SentencePiece matches the user-defined ones (turn markers)
        return ids

    @functools.cached_property
    def _control_split(self) -> re.Pattern:
        """SentencePiece's control pieces (<bos>, <eos>, <pad>...), which it never reads from text."""
        pieces = [self._sp.IdToPiece(i) for i in range(self.vocab_size) if self._sp.IsControl(i)]
        pieces = sorted((p for p in pieces if p), key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else re.compile("(?!)")

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise TokenizerError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self._sp is not None:
            return self._sp.DecodeIds(ids)
        # SentencePiece decodes its control tokens to nothing; do the same here, so that both
        # backends give the same text (turn markers stay: they are text in both).
        control = (self.bos_id, self.eos_id, self.pad_id)
        return self._hf.decode([i for i in ids if i not in control], skip_special_tokens=False)

    def piece(self, token: int) -> str:
        return self._sp.IdToPiece(token) if self._sp is not None else self._hf.id_to_token(token)

    def token_bytes(self) -> list[bytes | None]:
        """Every token's text as bytes, by id, for what matches bytes (constrained decoding):
        SentencePiece's '▁' is a space and <0xNN> the byte NN; None for control tokens (<pad>,
        <bos>, <eos>, the turn markers, <unusedN>), which stand for no text. About 0.3 s for 262k ids."""
        if self._sp is not None:
            control = {i for i in range(self.vocab_size) if self._sp.IsControl(i) or self._sp.IsUnknown(i)}
        else:
            control = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
        control |= {self.bos_id, self.eos_id, self.pad_id, *self.stop_ids}
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            piece = self.piece(i)
            if i in control or CONTROL_PIECE.fullmatch(piece):
                out.append(None)
            elif byte := BYTE_PIECE.fullmatch(piece):
                out.append(bytes([int(byte[1], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    @property
    def stop_ids(self) -> list[int]:
        """Generation ends on any of these: <eos> and, where the vocabulary has it, <end_of_turn>."""
        return [self.eos_id] + ([self.token_id("<end_of_turn>")] if self.has_token("<end_of_turn>") else [])

    # -- chat -----------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, add_bos: bool = True) -> list[int]:
        """Token ids of a conversation in Gemma's format, ending with the opened model turn.

        <bos><start_of_turn>user\\n{message}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n
        """
        sot, eot = self.token_id("<start_of_turn>"), self.token_id("<end_of_turn>")
        ids = [self.bos_id] if add_bos else []
        for role, content in self._turns(messages):
            ids += [sot, *self.encode(f"{role}\n{content}", add_bos=False), eot, *self.encode("\n", add_bos=False)]
        if add_generation_prompt:
            ids += [sot, *self.encode("model\n", add_bos=False)]
        return ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The same conversation as text, for display and for other tools' templates."""
        text = "<bos>" + "".join(f"<start_of_turn>{r}\n{c}<end_of_turn>\n" for r, c in self._turns(messages))
        return text + ("<start_of_turn>model\n" if add_generation_prompt else "")

    def _turns(self, messages: list[dict]) -> list[tuple[str, str]]:
        """(role, text) per turn, as Google's chat templates build them: roles alternate, starting
        with the user; each message is stripped of surrounding whitespace."""
        turns = []
        system = None
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and string 'content'")
            if m["role"] == "system":
                if self.family in ("gemma", "gemma2"):
                    raise TokenizerError(f"{self.family} has no system role; put the instructions in the first user turn")
                if i != 0:
                    raise TokenizerError(f"message {i}: a system message must come first")
                system = m["content"]
                continue
            if m["role"] not in ROLES:
                raise TokenizerError(f"message {i}: unknown role {m['role']!r} (use user, model/assistant or system)")
            role = ROLES[m["role"]]
            expected = "user" if len(turns) % 2 == 0 else "model"
            if role != expected:
                raise TokenizerError(f"message {i}: expected a {expected} message here; "
                                     "roles must alternate user/model, starting with user")
            turns.append([role, m["content"].strip()])
        if system is not None:
            # Gemma 3 has no system turn either; its template puts the (unstripped) system text
            # before the first user message.
            if not turns:
                raise TokenizerError("a system message must be followed by a user message")
            turns[0][1] = f"{system}\n\n{turns[0][1]}"
        return [tuple(t) for t in turns]
