"""Gemma's tokenizer (SentencePiece, or a Hugging Face tokenizer.json) and the chat template.

Every source ends in one of two backends: a SentencePiece model (`tokenizer.model`, or one rebuilt
from GGUF metadata) or the `tokenizers` library (`tokenizer.json`). Both give the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import TokenizerError

ROLES = {"user": "user", "model": "model", "assistant": "model"}  # OpenAI's name for the model's turn


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
        if path.suffix == ".json":
            import tokenizers

            try:
                return cls(tokenizers.Tokenizer.from_file(str(path)), family)
            except Exception as e:  # the library raises a bare Exception on malformed JSON
                raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls.from_sentencepiece(path.read_bytes(), family, name=str(path))

    @classmethod
    def from_sentencepiece(cls, model: bytes, family: str | None = None, name: str = "tokenizer") -> Tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
            raise TokenizerError(f"{name}: not a valid SentencePiece model ({e})") from None
        return cls(sp, family)

    def save(self, folder: str | os.PathLike) -> Path:
        """Writes tokenizer.model (SentencePiece) or tokenizer.json into `folder`; returns the file."""
        folder = Path(folder)
        if self._sp is not None:
            out = folder / "tokenizer.model"
            out.write_bytes(self._sp.serialized_model_proto())
        else:
            out = folder / "tokenizer.json"
            self._hf.save(str(out))
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

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.DecodeIds(ids)
        return self._hf.decode(ids, skip_special_tokens=False).replace("<bos>", "").replace("<eos>", "")

    def piece(self, token: int) -> str:
        return self._sp.IdToPiece(token) if self._sp is not None else self._hf.id_to_token(token)

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
        turns = []
        system = None
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and string 'content'")
            if m["role"] == "system":
                if self.family in ("gemma", "gemma2"):
                    raise TokenizerError(f"{self.family} has no system role; put the instructions in the first user turn")
                if i != 0:
                    raise TokenizerError("a system message must come first")
                system = m["content"]
                continue
            if m["role"] not in ROLES:
                raise TokenizerError(f"message {i}: unknown role {m['role']!r} (use user, model/assistant or system)")
            turns.append([ROLES[m["role"]], m["content"]])
        if system is not None:
            # Gemma 3 has no system turn either; its template folds the system text into the first user turn.
            if not turns or turns[0][0] != "user":
                raise TokenizerError("a system message must be followed by a user message")
            turns[0][1] = f"{system}\n\n{turns[0][1]}"
        return [tuple(t) for t in turns]
