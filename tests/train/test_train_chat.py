"""gemmakit.train.chat: Gemma's template, and a loss mask over exactly the model's tokens."""

import pytest

from gemmakit.errors import DataError
from gemmakit.train import conversations as chat


def test_mask_covers_exactly_the_model_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "what is the cat"}, {"role": "model", "content": "a cat sat"},
                {"role": "user", "content": "and the dog"}, {"role": "assistant", "content": "far from home"}]
    ids, mask = chat.render(tok, messages)
    assert ids == tok.chat_ids(messages, add_generation_prompt=False)
    eot = tok.token_id("<end_of_turn>")
    spans, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append(ids[start:i])
            start = None
    assert [tok.decode(s[:-1]) for s in spans] == ["a cat sat", "far from home"]
    assert all(s[-1] == eot for s in spans)  # each reply ends with <end_of_turn>, learned too
    assert sum(mask) == sum(len(s) for s in spans)


def test_bad_conversations(tiny_tokenizer):
    with pytest.raises(DataError, match="line 3: no model turn"):
        chat.render(tiny_tokenizer, [{"role": "user", "content": "hi"}], "line 3")
    with pytest.raises(DataError, match="non-empty list"):
        chat.render(tiny_tokenizer, "hello", "x")
    with pytest.raises(DataError, match="unknown role 'bot'"):
        chat.render(tiny_tokenizer, [{"role": "bot", "content": "hi"}], "x")
