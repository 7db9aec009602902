"""Preference pairs: JSONL records of a prompt and two answers, the preferred one first.

One record a line: `{"prompt": ..., "chosen": ..., "rejected": ...}` or `{"messages": [...], ...}`.
A prompt given as a list of messages (or `messages`) is rendered with Gemma's chat template, and
each answer (a string, or a list of one model/assistant message, trl's conversational form) is
the model turn that follows: its text and <end_of_turn>, as SFT trains it. A prompt given as a
string is plain text: <bos> + the prompt, and the answer + <eos> (trl's convention).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat_template import ChatFormat
from ..errors import DataError
from ..model.loss import IGNORE
from ..tokenizer import Tokenizer
from . import conversations, jsonl


@dataclass(frozen=True)
class Pair:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]  # the completion's ids, after the prompt
    rejected: tuple[int, ...]
    where: str  # file:line, for messages about it


def _answer(value: object, where: str, field: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        if message.get("role") not in ("model", "assistant"):
            raise DataError(f"{where}: '{field}' must be a model message, got role {message.get('role')!r}")
        value = message.get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{field}' must be a string (or a list of one model message)")
    if not value.strip():
        raise DataError(f"{where}: '{field}' is empty")
    return value


def render(chat: ChatFormat | Tokenizer, prompt: str | list[dict], answer: str,
           where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one answer to a prompt (see the module docstring); chat: the
    model's ChatFormat (its checkpoint's template), or a Tokenizer for Gemma's built-in one."""
    chat = chat if isinstance(chat, ChatFormat) else ChatFormat(chat)
    tokenizer = chat.tokenizer
    if isinstance(prompt, str):
        return tokenizer.encode(prompt), tokenizer.encode(answer, add_bos=False) + [tokenizer.eos_id]
    ids, mask = conversations.render(chat, [*prompt, {"role": "model", "content": answer}], where)
    n_prompt = len(chat.chat_ids(prompt, add_generation_prompt=True))
    return ids[:n_prompt], [t for t, m in zip(ids[n_prompt:], mask[n_prompt:]) if m]


def parse(record: object, tokenizer: ChatFormat | Tokenizer, where: str) -> Pair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON object with 'prompt' (or 'messages'), 'chosen' and 'rejected' was expected")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise DataError(f"{where}: exactly one of 'prompt' and 'messages' is needed")
    for field in ("chosen", "rejected"):
        if field not in record:
            raise DataError(f"{where}: missing field '{field}'")
    prompt = record["prompt"] if has_prompt else record["messages"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
    elif not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
        raise DataError(f"{where}: '{'prompt' if has_prompt else 'messages'}' must be a string or a non-empty "
                        "list of messages")
    chosen, rejected = _answer(record["chosen"], where, "chosen"), _answer(record["rejected"], where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer")
    prompt_ids, chosen_ids = render(tokenizer, prompt, chosen, where)
    _, rejected_ids = render(tokenizer, prompt, rejected, where)
    return Pair(tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids), where)


def read(path: str | Path, tokenizer: ChatFormat | Tokenizer, max_len: int) -> list[Pair]:
    """Every pair of a JSONL file, checked and tokenized; the first bad line fails the whole file
    (nothing is trained on a file half read)."""
    pairs = []
    for where, record in jsonl.records(path):
        pair = parse(record, tokenizer, where)
        longest = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
        if longest > max_len:
            raise DataError(f"{where}: {longest} tokens, longer than max_len {max_len}; raise --max-len or shorten it")
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out): a seeded random `fraction` of the pairs held out (at least one when
    fraction > 0 and there are two or more)."""
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = min(len(pairs) - 1, max(1, round(len(pairs) * fraction)))
    held = set(order[:n_held])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def digest(pairs: list[Pair]) -> str:
    """A fingerprint of the pairs' token ids: what a cache or a checkpoint made from them depends on."""
    return hashlib.sha256(json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs]).encode()).hexdigest()


@dataclass
class Batch:
    """B pairs as 2B right-padded rows, the B chosen ones first: row i and row B + i are a pair."""
    tokens: torch.Tensor  # (2B, T) prompt + completion, without its last token
    targets: torch.Tensor  # (2B, T) the next token on the completion's positions, IGNORE elsewhere
    lengths: torch.Tensor  # (2B,) tokens of each row before the padding

    @property
    def n_pairs(self) -> int:
        return self.tokens.shape[0] // 2


def collate(pairs: list[Pair], pad_id: int, full: bool = False) -> Batch:
    """full=False: inputs for log-probs of the completions (the last token is only a target);
    full=True: the whole sequences as inputs (a reward model reads the last token)."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    drop = 0 if full else 1
    T = max(len(a) + len(b) for a, b in rows) - drop
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    lengths = torch.empty(len(rows), dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        ids = torch.tensor(prompt + completion)
        n = len(ids) - drop
        tokens[r, :n] = ids[:n]
        lengths[r] = n
        # position t predicts token t + 1: the completion's tokens are targets from len(prompt) - 1 on
        targets[r, len(prompt) - 1: len(ids) - 1] = ids[len(prompt):]
    return Batch(tokens, targets, lengths)
