"""Rollouts for online RL: the prompt file, and k completions per prompt sampled by gemmakit's
own engine (runtime/engine.py: KV-cached continuous batching, one seeded generator per
request, the prompt prefilled once and shared by its k samples through the prefix cache).

The engine runs eagerly on the module it is given: the policy itself, or a bfloat16 copy of it
that train/rl.py refreshes before each rollout, so every rollout sees the weights as the last
optimizer step left them. A fresh engine each call, so that its prefix cache never serves keys
and values computed with older weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..chat_template import ChatFormat
from ..errors import DataError, TokenizerError
from ..model import Gemma
from ..runtime.engine import Engine, Request
from ..runtime.sampling import Sampling
from ..tokenizer import Tokenizer
from . import jsonl


@dataclass(frozen=True)
class Prompt:
    prompt: object  # as the file has it, for the reward function: a string or a list of messages
    ids: list[int]  # what the model is given: <bos> + text, or the chat template with a model turn opened
    fields: dict = field(default_factory=dict)  # the line's other fields (an answer to check, say)


def read_prompts(path: str | Path, tokenizer: ChatFormat | Tokenizer) -> list[Prompt]:
    """JSONL, one object a line: {"prompt": "..."} or {"messages": [...]} (rendered with the
    model's chat template — a ChatFormat, or a Tokenizer for Gemma's built-in one — ending with the
    model's turn opened), plus any fields the reward reads."""
    chat = tokenizer if isinstance(tokenizer, ChatFormat) else ChatFormat(tokenizer)
    tokenizer = chat.tokenizer
    prompts = []
    for where, row in jsonl.records(path, "prompt file"):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with 'prompt' or 'messages'")
        if "prompt" in row:
            text = row.pop("prompt")
            if not isinstance(text, str) or not text:
                raise DataError(f"{where}: 'prompt' must be a non-empty string")
            prompts.append(Prompt(text, tokenizer.encode(text, add_bos=True), row))
        elif "messages" in row:
            messages = row.pop("messages")
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{where}: 'messages' must be a non-empty list")
            try:
                ids = chat.chat_ids(messages, add_generation_prompt=True)
            except (TokenizerError, KeyError, TypeError) as e:
                raise DataError(f"{where}: bad messages ({e})") from None
            prompts.append(Prompt(messages, ids, row))
        else:
            raise DataError(f"{where}: no 'prompt' or 'messages' field")
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def sample_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """The seed of one completion: the same whichever process or batch row draws it."""
    digest = hashlib.blake2b(f"{seed}/{step}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def generate(module: Gemma, tokenizer: Tokenizer, prompts: Sequence[Prompt], samples: int, max_new_tokens: int,
             sampling: Sampling, seeds: Sequence[Sequence[int]] | None = None, stop: Sequence[str] = (),
             max_batch: int | None = None, stop_ids: Sequence[int] | None = None) -> list[list[Request]]:
    """`samples` completions of each prompt, [prompt][sample], in one engine over `module`.

    sampling: the Sampling of every request; seeds[p][j], where given, replaces its seed.
    Completions end at a stop id (default: the tokenizer's), a stop string, or max_new_tokens.
    """
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    longest = max(len(p.ids) for p in prompts)
    max_len = min(module.config.max_seq_len, longest + max_new_tokens)
    training = module.training
    engine = Engine(module, tokenizer, max_batch=max_batch or len(prompts) * samples, max_len=max_len, compile=None)
    try:
        requests = [[engine.submit(p.ids, max_new_tokens,
                                   sampling if seeds is None else sampling.replace(seed=seeds[i][j]),
                                   stop_ids, stop)
                     for j in range(samples)] for i, p in enumerate(prompts)]
        while engine.busy:
            engine.step()
    finally:
        module.train(training)  # the engine put it in eval mode
    return requests
