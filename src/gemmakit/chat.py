"""ChatSession: a multi-turn conversation that keeps its own KV cache between turns.

Each turn prefills only what is new (the user turn and "<start_of_turn>model\\n"); the earlier
turns, the model's replies included, stay in the cache exactly as they were generated. With a
checkpoint's own template, what is new is the text its rendering of the longer conversation adds
to the rendering so far; a template that rewrites earlier turns gets the whole conversation again.
"""

from __future__ import annotations

from typing import Iterator

from .chat_template import ChatFormat
from .errors import GenerationError
from .runtime.engine import Engine
from .runtime.sampling import Sampling


class ChatSession:
    def __init__(self, engine: Engine, system: str | None = None, sampling: Sampling | None = None,
                 max_new_tokens: int = 512, format: ChatFormat | None = None, stop_ids: list[int] | None = None):
        """engine: one of its own (`LM.chat` makes one), with the model's tokenizer. format: the
        checkpoint's chat format (default: Gemma's built-in); stop_ids: default the tokenizer's."""
        if engine.tokenizer is None:
            raise GenerationError("chat needs a tokenizer; this model has none")
        self.tokenizer = engine.tokenizer
        self.format = format or ChatFormat(self.tokenizer)
        self.stop_ids = stop_ids if stop_ids is not None else self.tokenizer.stop_ids
        self.system = system
        self.sampling = sampling or Sampling()
        self.max_new_tokens = max_new_tokens
        self.engine = engine
        if system is not None:  # a family without a system role fails now, not at the first message
            self.format.chat_ids([{"role": "system", "content": system}, {"role": "user", "content": ""}])
        self._end_turn = [self.tokenizer.token_id("<end_of_turn>"), *self.tokenizer.encode("\n", add_bos=False)]
        self._open = False  # a reply is being streamed
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (the system message stays)."""
        if self._open:
            self.engine.cancel(self.request)
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.ids: list[int] = []  # the conversation as the model has seen it
        self._text = ""  # with a checkpoint's template: its rendering of self.ids (the reply as generated)
        self.request = None
        self._open = False  # a reply is being streamed

    def send(self, text: str) -> str:
        """The model's reply to `text`."""
        return "".join(self.stream(text))

    def stream(self, text: str) -> Iterator[str]:
        """The model's reply to `text`, in pieces as they are generated.

        Raises GenerationError (before generating) when the conversation no longer fits the
        context; reset() to start over.
        """
        self._end_reply()  # a previous stream() that was dropped unread ends here
        user = {"role": "user", "content": text}
        prompt_text = None
        if self.format.template is not None:
            prompt_text = self.format.render([*self.messages, user])
            if self.ids and prompt_text.startswith(self._text):
                ids = self.ids + self.tokenizer.encode_special(prompt_text[len(self._text):])
            else:
                ids = self.format.chat_ids([*self.messages, user])
        elif self.ids:
            ids = self.ids + self.tokenizer.chat_ids([user], add_bos=False)
        else:
            ids = self.tokenizer.chat_ids([*self.messages, user])
        if len(ids) >= self.engine.max_len:
            raise GenerationError(f"the conversation ({len(ids)} tokens with this message) has outgrown the "
                                  f"context of {self.engine.max_len} tokens; reset() to start over")
        request = self.engine.submit(ids, self.max_new_tokens, self.sampling, stop_ids=self.stop_ids)
        self.request = request  # the latest turn: finish_reason, output_ids, reused
        self._prompt_text = prompt_text
        self.messages.append(user)
        self._open = True
        return self._reply(request)

    def _reply(self, request) -> Iterator[str]:
        try:
            for delta in self.engine.stream(request):
                if delta.text:
                    yield delta.text
        finally:
            self._end_reply()

    def _end_reply(self) -> None:
        """Records the latest reply (cut short if its reader stopped early) and closes its turn."""
        if not self._open:
            return
        self._open = False
        request = self.request
        self.engine.cancel(request)  # no-op when it finished
        self.messages.append({"role": "model", "content": request.text})
        if self.format.template is not None:  # the next rendering says how this turn closes
            self.ids = request.prompt_ids + request.generated_ids
            self._text = self._prompt_text + request.text
            return
        # The template closes every model turn with <end_of_turn>\n, whatever stopped the reply.
        self.ids = request.prompt_ids + request.generated_ids + self._end_turn
