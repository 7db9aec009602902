"""What a checkpoint says about how it is used, besides its weights: the chat template and the
generation defaults (`generation_config.json`). Read from a Hugging Face folder or GGUF metadata;
kept as `Metadata` on the Checkpoint and on the loaded LM."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..chat_template import ChatTemplate
from ..errors import CheckpointError
from ..tokenizer import CHAT_TEMPLATE

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json's fields that gemmakit honours; None where the file is silent.

    As in transformers: sampling only when do_sample is true (then temperature 1.0 and top_k 50
    unless the file says otherwise); max_length counts the prompt, max_new_tokens does not."""

    eos_ids: tuple[int, ...] | None = None
    bos_id: int | None = None
    pad_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    origin: str | None = None  # the file, for messages and `gemmakit info`

    @classmethod
    def read(cls, path: Path) -> GenerationDefaults:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")

        def get(key: str, kinds: tuple, rule: str, ok=lambda v: True):
            v = raw.get(key)
            if v is None:
                return None
            if not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds or not ok(v):
                raise CheckpointError(f"{path}: {key} must be {rule}, got {v!r}")
            return v

        def token(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        eos = get("eos_token_id", (int, list), "a token id or a list of them",
                  lambda v: all(map(token, v if isinstance(v, list) else [v])) and v != [])
        positive = (lambda v: v > 0)
        return cls(eos_ids=None if eos is None else tuple(eos if isinstance(eos, list) else [eos]),
                   bos_id=get("bos_token_id", (int,), "a token id", token),
                   pad_id=get("pad_token_id", (int,), "a token id", token),
                   do_sample=get("do_sample", (bool,), "true or false"),
                   temperature=get("temperature", (int, float), "a number >= 0", lambda v: v >= 0),
                   top_k=get("top_k", (int,), "an integer >= 0", lambda v: v >= 0),
                   top_p=get("top_p", (int, float), "a number in (0, 1]", lambda v: 0 < v <= 1),
                   max_new_tokens=get("max_new_tokens", (int,), "a positive integer", positive),
                   max_length=get("max_length", (int,), "a positive integer", positive),
                   origin=str(path))

    def fields(self) -> dict:
        """The fields the file set (for `gemmakit info`)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v is not None and k != "origin"}

    def to_json(self) -> dict:
        """generation_config.json's own names, for a folder that is written."""
        names = {"eos_ids": "eos_token_id", "bos_id": "bos_token_id", "pad_id": "pad_token_id"}
        out = {names.get(k, k): v for k, v in self.fields().items()}
        if isinstance(out.get("eos_token_id"), list) and len(out["eos_token_id"]) == 1:
            out["eos_token_id"] = out["eos_token_id"][0]
        return out


@dataclass(frozen=True)
class Metadata:
    chat_template: ChatTemplate | None = None  # None: the built-in Gemma format
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)


def from_folder(folder: Path) -> Metadata:
    """A Hugging Face folder's: chat_template.jinja (transformers' own file since 4.49) before
    tokenizer_config.json's chat_template; generation_config.json."""
    template = None
    jinja = folder / "chat_template.jinja"
    config = folder / "tokenizer_config.json"
    if jinja.is_file():
        try:
            template = ChatTemplate.of(jinja.read_text(encoding="utf-8"), str(jinja))
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja}: unreadable ({e})") from None
    elif config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{config}: not a valid JSON object ({e})") from None
        # gemmakit writes its built-in template into the folders it saves: that one is no template of the checkpoint's
        if value is not None and value != CHAT_TEMPLATE:
            template = ChatTemplate.of(value, f"{config} (chat_template)")
    generation = folder / GENERATION_CONFIG
    return Metadata(template, GenerationDefaults.read(generation) if generation.is_file() else GenerationDefaults())


def from_gguf(meta, path: Path) -> Metadata:
    """GGUF's tokenizer.chat_template (and a named tokenizer.chat_template.tool_use), and the
    eos/bos/pad ids its tokenizer metadata names (GGUF keeps no sampling defaults)."""
    text = meta.get("tokenizer.chat_template", str, None)
    template = None
    if text is not None and text != CHAT_TEMPLATE:
        variants = [("default", text)]
        tool_use = meta.get("tokenizer.chat_template.tool_use", str, None)
        if tool_use is not None:
            variants.append(("tool_use", tool_use))
        template = ChatTemplate(tuple(variants), f"{path} (tokenizer.chat_template)")
    return Metadata(template)


def save(metadata: Metadata, folder: Path) -> None:
    """Writes generation_config.json where the checkpoint had defaults (the template goes into
    tokenizer_config.json with the tokenizer: Tokenizer.save)."""
    fields = metadata.generation.to_json()
    if fields:
        (folder / GENERATION_CONFIG).write_text(json.dumps(fields, indent=2) + "\n")


def template_value(metadata: Metadata) -> str | list:
    """tokenizer_config.json's chat_template for a folder that is written: the checkpoint's own, or the built-in."""
    t = metadata.chat_template
    if t is None:
        return CHAT_TEMPLATE
    if len(t.variants) == 1:
        return t.text
    return [{"name": name, "template": text} for name, text in t.variants]
