"""Chat data for supervised fine-tuning: a conversation rendered with the checkpoint's chat template
(or Gemma's), and the mask of the tokens the model is trained to produce (its replies and the
<end_of_turn> that closes each)."""

from __future__ import annotations

from ..chat_template import ChatFormat
from ..errors import DataError, TokenizerError
from ..tokenizer import ROLES, Tokenizer


def render(chat: ChatFormat | Tokenizer, messages: object, where: str = "conversation") -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation, and for each id whether it is the model's.

    chat: the model's ChatFormat (a Tokenizer: Gemma's built-in format). Each model turn is found
    as the difference between the conversation up to that turn and the same conversation with a
    generation prompt instead, so the ids are exactly the template's; what follows the reply's
    last stop token (<end_of_turn>'s newline) is the template's, not the model's.
    """
    chat = chat if isinstance(chat, ChatFormat) else ChatFormat(chat)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    stops = set(chat.tokenizer.stop_ids)
    try:
        ids = chat.chat_ids(messages, add_generation_prompt=False)
        mask = [False] * len(ids)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or ROLES.get(m.get("role")) != "model":
                continue
            prompt = chat.chat_ids(messages[:i], add_generation_prompt=True)
            upto = chat.chat_ids(messages[: i + 1], add_generation_prompt=False)
            if upto[: len(prompt)] != prompt or ids[: len(upto)] != upto:
                raise DataError(f"{where}: turn {i} does not tokenize the same alone as in the conversation")
            end = max((j + 1 for j in range(len(prompt), len(upto)) if upto[j] in stops), default=len(upto))
            for j in range(len(prompt), end):  # the reply and its <end_of_turn>
                mask[j] = True
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(mask):
        raise DataError(f"{where}: no model turn to learn from")
    return ids, mask
