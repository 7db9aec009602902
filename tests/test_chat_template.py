"""Chat templates and generation defaults from the checkpoint (chat_template.py, checkpoints/metadata.py):
Google's own Gemma templates render as the built-in format does and as transformers renders them;
a checkpoint's other template changes what chat, the server and SFT see; a template that raises or
runs away is a one-line error; generation_config.json is the default of generate, chat, serve."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import gemmakit
from gemmakit import LM, Gemma, GemmaConfig, Tokenizer
from gemmakit.chat import ChatSession
from gemmakit.chat_template import ChatFormat, ChatTemplate, ChatTemplateError
from gemmakit.checkpoints.metadata import GenerationDefaults
from gemmakit.runtime.sampling import Sampling
from gemmakit.train import conversations

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
GEMMA = (TEMPLATES / "gemma.jinja").read_text()  # Gemma 1 and 2 (google/gemma-*-it)
GEMMA3 = (TEMPLATES / "gemma3.jinja").read_text()  # google/gemma-3-*-it
CUSTOM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<start_of_turn>USER: {{ m['content'] }}"
          "{% else %}<start_of_turn>model\n{{ m['content'] }}{% endif %}<end_of_turn>\n{% endfor %}"
          "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# writes earlier turns otherwise than the prompt it gave: a chat renders the whole conversation again
REWRITING = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] | upper }}: {{ m['content'] }}"
             "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  Write x = 42 in Python.\n"}],
    [{"role": "user", "content": "émoji 🤖 and <b>tags</b>"}, {"role": "model", "content": " spaced \n"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}],
]
SYSTEM = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module", params=["tokenizer.json", "sentencepiece"])
def tokenizers(request, gemma_tokenizer_json, sentencepiece_model, tmp_path_factory):
    """Ours and transformers' tokenizer of the same files (the real Gemma tokenizer.json, or the tiny
    SentencePiece model), read once: the real one takes seconds."""
    if request.param == "tokenizer.json":  # (AutoTokenizer on a folder takes 3 times as long to read it)
        theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(gemma_tokenizer_json), bos_token="<bos>",
                                                      eos_token="<eos>", pad_token="<pad>")
        return Tokenizer.from_file(gemma_tokenizer_json), theirs
    tok = Tokenizer.from_file(sentencepiece_model)
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(folder)
    return tok, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_googles_templates_render_as_the_built_in_one(family, tokenizers):
    tok, theirs = tokenizers
    tok.family = family  # the built-in format's system rule
    source = GEMMA if family == "gemma" else GEMMA3
    fmt = ChatFormat(tok, ChatTemplate.of(source, "test"))
    theirs.chat_template = source
    conversations_ = CONVERSATIONS + ([SYSTEM] if family == "gemma3" else [])
    for messages in conversations_:
        for prompt in (True, False):
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
            assert fmt.render(messages, prompt) == text == tok.render_chat(messages, prompt)
            assert fmt.chat_ids(messages, prompt) == list(ids) == tok.chat_ids(messages, prompt)
    # the same mistakes are refused: by the template's raise_exception, naming where it came from
    with pytest.raises(ChatTemplateError, match="^test: chat template: Conversation roles must alternate"):
        fmt.chat_ids([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    if family == "gemma":
        with pytest.raises(ChatTemplateError, match="^test: chat template: System role not supported$"):
            fmt.chat_ids(SYSTEM)


TINY_GEMMA3 = GemmaConfig(family="gemma3", vocab_size=256, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                          head_dim=16, ffn_dim=128, max_seq_len=256, query_pre_attn_scalar=16, sliding_window=8,
                          global_every=2, post_norms=True, qk_norm=True)


def _folder(tmp_path: Path, sentencepiece_model: Path, family: str = "gemma3", **files) -> Path:
    """A tiny random model saved as a Hugging Face folder, with extra files (name -> text)."""
    tok = Tokenizer.from_file(sentencepiece_model, family=family)
    torch.manual_seed(0)
    module = Gemma(TINY_GEMMA3.replace(vocab_size=tok.vocab_size))
    module.reset_parameters()
    folder = LM(module.eval(), tok).save(tmp_path / "model", progress=False)
    for name, text in files.items():
        (folder / name.replace("_jinja", ".jinja").replace("_json", ".json")).write_text(text)
    return folder


def test_a_checkpoints_own_template_is_what_chat_serve_and_sft_render(tmp_path, sentencepiece_model):
    plain = gemmakit.load(_folder(tmp_path / "a", sentencepiece_model), quantize=None, compile=None, progress=False)
    assert plain.metadata.chat_template is None  # gemmakit's own saved template is the built-in one
    folder = _folder(tmp_path / "b", sentencepiece_model, chat_template_jinja=CUSTOM)
    lm = gemmakit.load(folder, quantize=None, compile=None, progress=False)
    assert lm.metadata.chat_template.origin == str(folder / "chat_template.jinja")
    tok, messages = lm.tokenizer, CONVERSATIONS[1]
    text = lm.chat_format.render(messages)
    assert text == ("<bos><start_of_turn>USER: Hi<end_of_turn>\n<start_of_turn>model\nHello! How can I help?"
                    "<end_of_turn>\n<start_of_turn>USER:   Write x = 42 in Python.\n<end_of_turn>\n"
                    "<start_of_turn>model\n")
    ids = lm.chat_format.chat_ids(messages)
    assert ids[0] == tok.bos_id and ids != tok.chat_ids(messages) and tok.decode(ids) == tok.decode(
        [tok.bos_id] + tok.encode_special(text.removeprefix("<bos>")))

    # chat: every turn's prompt is the template's rendering, the earlier reply's ids kept as generated
    session = lm.chat(max_new_tokens=4)
    reply = session.send("Hi")
    assert session.request.prompt_ids == lm.chat_format.chat_ids([{"role": "user", "content": "Hi"}])
    first = session.request.prompt_ids + session.request.generated_ids
    session.send("more")
    second = session.request.prompt_ids
    assert second[:len(first)] == first
    rendered = lm.chat_format.render([{"role": "user", "content": "Hi"}, {"role": "model", "content": reply},
                                      {"role": "user", "content": "more"}])
    assert tok.decode(second) == tok.decode(tok.encode_special(rendered))
    rewriting = ChatFormat(tok, ChatTemplate.of(REWRITING, "x"))
    session = ChatSession(lm.engine(1, 256), max_new_tokens=4, format=rewriting)
    reply = session.send("Hi")
    session.send("more")
    assert session.request.prompt_ids == rewriting.chat_ids([{"role": "user", "content": "Hi"}, {
        "role": "model", "content": reply}, {"role": "user", "content": "more"}])

    # SFT: the ids are the template's, the mask covers each reply and its <end_of_turn>
    ids, mask = conversations.render(lm.chat_format, messages[:2])
    assert ids == lm.chat_format.chat_ids(messages[:2], add_generation_prompt=False)
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned[:-1]) == "Hello! How can I help?" and learned[-1] == tok.token_id("<end_of_turn>")

    # saved again, the template goes with it
    again = gemmakit.load(lm.save(tmp_path / "again", progress=False), quantize=None, compile=None, progress=False)
    assert again.chat_format.render(messages) == text


def test_the_server_renders_the_checkpoints_template(tmp_path, sentencepiece_model):
    from fastapi.testclient import TestClient

    from gemmakit.serve import create_app

    folder = _folder(tmp_path, sentencepiece_model, chat_template_jinja=CUSTOM)
    lm = gemmakit.load(folder, quantize=None, compile=None, progress=False)
    with TestClient(create_app(lm, max_batch=1, max_len=128)) as http:
        messages = CONVERSATIONS[0]
        assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == lm.chat_format.chat_ids(messages)
        assert http.get("/tokenizer_info").json()["chat_template"] == CUSTOM


RUNAWAY = {
    "a loop that writes nothing": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "a loop that writes too much": "{% for i in range(100000) %}{% for j in range(100) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "a huge string": "{{ 'x' * 1000000000 }}",
    "a huge power": "{{ 10 ** 100000000 }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


@pytest.mark.parametrize("case", list(RUNAWAY))
def test_a_runaway_template_is_stopped(case, sentencepiece_model):
    tok = Tokenizer.from_file(sentencepiece_model, family="gemma3")
    template = ChatTemplate((("default", RUNAWAY[case]),), "model/tokenizer_config.json (chat_template)",
                            max_seconds=0.5, max_chars=1 << 20)
    with pytest.raises(ChatTemplateError) as e:
        ChatFormat(tok, template).chat_ids(CONVERSATIONS[0])
    message = str(e.value)
    assert message.startswith("model/tokenizer_config.json (chat_template): chat template stopped: ")
    assert "\n" not in message


def test_bad_templates_are_one_line_errors(tmp_path, sentencepiece_model):
    tok = Tokenizer.from_file(sentencepiece_model, family="gemma3")
    with pytest.raises(ChatTemplateError, match=r"^x: chat template line 2: "):
        ChatFormat(tok, ChatTemplate.of("ok\n{% for %}", "x")).chat_ids(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match=r"^x: chat template: .*unsafe"):  # the sandbox holds
        ChatFormat(tok, ChatTemplate.of("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
                                        "x")).chat_ids(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        ChatTemplate.of([{"name": "tool_use", "template": "x"}], "x")
    with pytest.raises(ChatTemplateError, match="must be a string or a list"):
        ChatTemplate.of(42, "x")
    named = ChatTemplate.of([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}], "x")
    assert named.render([], tools=None) == "D" and named.render([], tools=[{"type": "function"}]) == "T"
    # transformers' helpers: tojson keeps non-ASCII text, strftime_now
    t = ChatTemplate.of("{{ messages[0] | tojson }} {{ strftime_now('%Y') | length }}", "x")
    assert t.render([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"} 4'

    # at the CLI: one line naming the file and the template's message, exit 1
    folder = _folder(tmp_path, sentencepiece_model,
                     chat_template_jinja="{{ raise_exception('this template takes no ' + messages[0].role) }}")
    r = subprocess.run([sys.executable, "-m", "gemmakit.cli", "chat", "--model", str(folder), "--exact"], input="hi\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (  # after the progress bar
        f"gemmakit: error: {folder / 'chat_template.jinja'}: chat template: this template takes no user")


def test_generation_config_is_read_and_checked(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "do_sample": True,
                                "top_k": 64, "top_p": 0.95, "cache_implementation": "hybrid"}))  # Gemma 3's own
    g = GenerationDefaults.read(path)
    assert (g.eos_ids, g.bos_id, g.pad_id, g.do_sample, g.top_k, g.top_p, g.temperature) == \
        ((1, 106), 2, 0, True, 64, 0.95, None)
    for bad, field in (({"temperature": "hot"}, "temperature"), ({"eos_token_id": [1, -2]}, "eos_token_id"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": True}, "top_k"),
                       ({"do_sample": "yes"}, "do_sample"), ({"top_p": 1.5}, "top_p")):
        path.write_text(json.dumps(bad))
        with pytest.raises(gemmakit.errors.CheckpointError, match=f"^{path}: {field} must be "):
            GenerationDefaults.read(path)
    path.write_text("{not json")
    with pytest.raises(gemmakit.errors.CheckpointError, match=f"^{path}: not valid JSON"):
        GenerationDefaults.read(path)


def _cli(*args, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True, timeout=180,
                          input=input)


def test_generation_defaults_in_generate_chat_serve_and_info(tmp_path, sentencepiece_model):
    from fastapi.testclient import TestClient

    from gemmakit.serve import create_app

    base = gemmakit.load(_folder(tmp_path / "base", sentencepiece_model), quantize=None, compile=None, progress=False)
    prompt = "the cat sat on"
    greedy = base.generate(prompt, max_new_tokens=6, stop_ids=[])
    greedy_ids = LM(base.module, None).generate(base.tokenizer.encode(prompt), max_new_tokens=6, stop_ids=[])
    config = {"do_sample": True, "temperature": 0.8, "top_k": 7, "top_p": 0.9, "max_new_tokens": 5}
    folder = _folder(tmp_path / "sampled", sentencepiece_model, generation_config_json=json.dumps(config))
    lm = gemmakit.load(folder, quantize=None, compile=None, progress=False)
    expected = Sampling(temperature=0.8, top_k=7, top_p=0.9)
    assert lm.default_sampling() == expected and lm.stop_ids == lm.tokenizer.stop_ids

    # generate: the file's sampling and length unless the call says otherwise
    ids = lm.tokenizer.encode(prompt)
    sampled = lm.generate(ids, seed=3)  # token ids in, token ids out
    assert sampled == LM(lm.module, lm.tokenizer).generate(ids, max_new_tokens=5, sampling=expected.replace(seed=3))
    assert lm.generate(ids, seed=3, temperature=0, max_new_tokens=6, stop_ids=[]) == base.generate(
        ids, max_new_tokens=6, stop_ids=[])
    r = _cli("generate", "--model", str(folder), "--exact", "--prompt", prompt, "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == lm.generate(prompt, seed=3)
    r = _cli("generate", "--model", str(folder), "--exact", "--prompt", prompt, "--temperature", "0",
             "--max-new-tokens", "6", "--json")
    assert json.loads(r.stdout)["text"] == base.generate(prompt, max_new_tokens=6)  # flags win

    # chat: the file's sampling and length too
    session = lm.chat(seed=3)
    session.send("hi")
    assert session.sampling == expected.replace(seed=3) and len(session.request.output_ids) <= 5

    # serve: a request that leaves sampling out gets the file's; its own fields win
    with TestClient(create_app(lm, max_batch=1, max_len=128)) as http:
        body = {"model": http.get("/v1/models").json()["data"][0]["id"], "prompt": prompt, "seed": 3}
        out = http.post("/v1/completions", json=body).json()
        assert out["choices"][0]["text"] == lm.generate(prompt, seed=3)
        assert out["usage"]["completion_tokens"] <= 5
        out = http.post("/v1/completions", json={**body, "temperature": 0, "max_tokens": 6, "ignore_eos": True}).json()
        assert out["choices"][0]["text"] == greedy

    # eos ids: generation stops at the file's
    k = next(k for k in range(1, 6) if greedy_ids[k] not in greedy_ids[:k])  # the first new token ends it
    stop = greedy_ids[k]
    folder = _folder(tmp_path / "eos", sentencepiece_model, generation_config_json=json.dumps({"eos_token_id": stop}))
    lm = gemmakit.load(folder, quantize=None, compile=None, progress=False)
    assert lm.stop_ids == [stop] and lm.default_sampling() == Sampling()
    assert LM(lm.module, None, metadata=lm.metadata).generate(lm.tokenizer.encode(prompt), max_new_tokens=6) == \
        greedy_ids[:k]

    r = _cli("info", "--model", str(folder), "--json")
    info = json.loads(r.stdout)
    assert info["generation_config"] == {"eos_ids": [stop]} and info["tokenizer"]["stop_ids"] == [stop]

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 99999}))
    r = _cli("info", "--model", str(folder))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"gemmakit: error: {folder / 'generation_config.json'}: token id 99999 is outside the "
        f"{lm.tokenizer.vocab_size}-token vocabulary")
