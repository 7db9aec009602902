"""Chat data for supervised fine-tuning: a conversation rendered with Gemma's template, and the
mask of the tokens the model is trained to produce (its replies and their <end_of_turn>)."""

from __future__ import annotations

from ..errors import DataError, TokenizerError
from ..tokenizer import ROLES, Tokenizer


def render(tokenizer: Tokenizer, messages: object, where: str = "conversation") -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation, and for each id whether it is the model's.

    Each model turn is found as the difference between the conversation up to that turn and the
    same conversation with a generation prompt instead, so the ids are exactly the template's.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    try:
        ids = tokenizer.chat_ids(messages, add_generation_prompt=False)
        mask = [False] * len(ids)
        newline = len(tokenizer.encode("\n", add_bos=False))
        for i, m in enumerate(messages):
            if ROLES.get(m["role"]) != "model":
                continue
            prompt = tokenizer.chat_ids(messages[:i], add_generation_prompt=True)
            upto = tokenizer.chat_ids(messages[: i + 1], add_generation_prompt=False)
            if upto[: len(prompt)] != prompt or ids[: len(upto)] != upto:
                raise DataError(f"{where}: turn {i} does not tokenize the same alone as in the conversation")
            for j in range(len(prompt), len(upto) - newline):  # the reply and its <end_of_turn>
                mask[j] = True
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(mask):
        raise DataError(f"{where}: no model turn to learn from")
    return ids, mask
