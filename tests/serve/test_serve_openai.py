"""The OpenAI surface beyond one greedy answer: prompt lists, n, logprobs and echo, penalties and
logit_bias, structured outputs, tools, fill-in-the-middle; and real clients (the openai package's
structured-output helper, lm-eval's local-completions model) against a running server."""

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from gemmakit.runtime.engine import Engine
from gemmakit.runtime.sampling import Sampling
from gemmakit.serve import create_app
from gemmakit.serve import tools as serve_tools
from gemmakit.serve.protocol import ChatMessage, Tool

GOOD = {"model": "gemma-tiny", "prompt": "hello", "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_lm, server_type):
    s = server_type(create_app(tiny_lm, max_batch=4, max_queue=32, max_len=1024))  # room for the tools
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def alone(lm, ids, n, sampling=None, stop=True):
    engine = Engine(lm.module, lm.tokenizer, max_batch=1, max_len=128, prefix_cache=0)
    request = engine.add(ids, n, sampling, stop_ids=lm.tokenizer.stop_ids if stop else ())
    while engine.busy:
        engine.step()
    return request


@torch.inference_mode()
def model_logprobs(lm, ids):
    """log_softmax of one full forward: row p predicts token p + 1."""
    return lm.logits(ids)[0].float().log_softmax(-1)


def test_a_list_of_prompts_times_n_choices(http, tiny_lm):
    prompts = ["hello", "the quick brown fox"]
    ids = [tiny_lm.tokenizer.encode("def f(x):")[:5]]
    r = http.post("/v1/completions", json={**GOOD, "prompt": prompts, "n": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:  # greedy: both samples of a prompt are its one answer
        assert c["text"] == alone(tiny_lm, tiny_lm.tokenizer.encode(prompts[c["index"] // 2]), 4).text
    r = http.post("/v1/completions", json={**GOOD, "prompt": ids * 2, "temperature": 0})  # a list of token prompts
    assert [c["text"] for c in r.json()["choices"]] == [alone(tiny_lm, ids[0], 4).text] * 2
    assert r.json()["usage"]["prompt_tokens"] == 10


def test_n_seeded_samples_differ_and_repeat(http, tiny_lm):
    body = {**GOOD, "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}
    first = [c["text"] for c in http.post("/v1/completions", json=body).json()["choices"]]
    again = [c["text"] for c in http.post("/v1/completions", json=body).json()["choices"]]
    assert first == again and len(set(first)) == 3
    ids = tiny_lm.tokenizer.encode("hello")
    assert first[1] == alone(tiny_lm, ids, 12, Sampling(temperature=1.0, seed=8)).text  # sample k: seed + k


def test_echo_with_logprobs_scores_the_prompt_and_the_answer(http, tiny_lm):
    """What lm-eval's local-completions sends to score a continuation."""
    ids = tiny_lm.tokenizer.encode("the quick brown fox jumps over")
    r = http.post("/v1/completions", json={"model": "gemma-tiny", "prompt": [ids], "max_tokens": 1, "logprobs": 2,
                                            "echo": True, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = model_logprobs(tiny_lm, ids)
    answer = alone(tiny_lm, ids, 1, stop=False).output_ids[0]
    for p, token in enumerate(ids[1:] + [answer], start=1):
        assert lp["token_logprobs"][p] == pytest.approx(want[p - 1, token].item(), abs=1e-4)
        assert len(lp["top_logprobs"][p]) <= 2
        assert max(lp["top_logprobs"][p].values()) == pytest.approx(want[p - 1].max().item(), abs=1e-4)
    assert choice["text"] == tiny_lm.tokenizer.decode(ids) + tiny_lm.tokenizer.decode([answer])
    assert lp["text_offset"] == sorted(lp["text_offset"])
    scored = http.post("/v1/completions", json={"model": "gemma-tiny", "prompt": [ids], "max_tokens": 0,
                                                 "logprobs": 0, "echo": True}).json()["choices"][0]
    assert scored["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:-1], abs=1e-6)


def test_chat_logprobs_through_the_client(client, tiny_lm):
    out = client.chat.completions.create(model="gemma-tiny", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token


def test_penalties_and_logit_bias_change_the_answer_as_the_engine_does(http, tiny_lm):
    ids = tiny_lm.tokenizer.encode("hello")
    biased = http.post("/v1/completions", json={**GOOD, "temperature": 0, "logit_bias": {"300": 100}}).json()
    assert biased["choices"][0]["text"] == tiny_lm.tokenizer.decode([300] * 4)
    body = {**GOOD, "max_tokens": 16, "temperature": 0, "frequency_penalty": 2.0, "presence_penalty": 1.0}
    text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    want = alone(tiny_lm, ids, 16, Sampling(frequency_penalty=2.0, presence_penalty=1.0)).text
    assert text == want != alone(tiny_lm, ids, 16).text


class Pet(BaseModel):
    name: str = Field(max_length=8)  # a random model never closes a string of its own accord
    legs: int = Field(ge=0, le=8)
    kind: str = Field(json_schema_extra={"enum": ["cat", "dog"]})


def test_structured_output_through_the_clients_parse_helper(client):
    for seed in range(3):
        out = client.chat.completions.parse(model="gemma-tiny", messages=[{"role": "user", "content": "a pet"}],
                                            response_format=Pet, max_tokens=60, temperature=1.0, seed=seed)
        pet = out.choices[0].message.parsed
        assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and 0 <= pet.legs <= 8


def test_json_schema_answers_validate_streamed_or_not(http):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "maxItems": 2,
              "items": {"type": "string", "enum": ["a", "b"]}}}, "required": ["ok", "tags"],
              "additionalProperties": False}
    body = {"model": "gemma-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "n": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}
    for choice in http.post("/v1/chat/completions", json=body).json()["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    texts = {0: "", 1: ""}
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["delta"].get("content", "")
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)
    r = http.post("/v1/completions", json={**GOOD, "max_tokens": 30, "response_format": {"type": "json_object"},
                                            "logit_bias": {str(_quote_id(http)): 5}})
    assert isinstance(json.loads(r.json()["choices"][0]["text"]), dict)


def _quote_id(http) -> int:
    return http.post("/tokenize", json={"prompt": '"', "add_special_tokens": False}).json()["tokens"][0]


WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 6},
                                                "unit": {"enum": ["C", "F"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}


def test_a_required_tool_call_parses_and_validates(client):
    for choice in ("required", {"type": "function", "function": {"name": "weather"}}):
        out = client.chat.completions.create(model="gemma-tiny", max_tokens=150, temperature=1.0, seed=1,
                                             messages=[{"role": "user", "content": "weather in Oslo?"}],
                                             tools=[WEATHER], tool_choice=choice)
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        assert call.function.name == "weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_a_conversation_with_calls_and_results_renders_as_gemma_turns(client):
    tools = [Tool.model_validate(WEATHER)]
    history = [{"role": "user", "content": "weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "weather",
                                                                     "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snow"}]
    turns = serve_tools.messages([ChatMessage.model_validate(m) for m in history], tools)
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[0]["content"].startswith("You can call these functions") and '"name": "weather"' in turns[0]["content"]
    assert json.loads(turns[1]["content"]) == {"name": "weather", "arguments": {"city": "Oslo", "unit": "C"}}
    assert "-3 and snow" in turns[2]["content"]
    out = client.chat.completions.create(model="gemma-tiny", messages=history, tools=[WEATHER], max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # "auto": an answer that is a call of a known tool becomes tool_calls; other text stays text
    assert serve_tools.parse('```json\n{"name": "weather", "arguments": {"city": "Rome"}}\n```', tools)
    assert serve_tools.parse('{"name": "other", "arguments": {}}', tools) is None
    assert serve_tools.parse("It is sunny.", tools) is None


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools"),  # parameters that are no JSON schema
])
def test_bad_tool_and_logprob_requests(http, body, param):
    r = http.post("/v1/chat/completions", json={"model": "gemma-tiny", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_more_choices_than_the_queue_holds_is_a_400(http):
    r = http.post("/v1/completions", json={**GOOD, "prompt": ["a", "b"], "n": 16})  # 32: what the queue holds
    assert r.status_code == 200 and len(r.json()["choices"]) == 32
    r = http.post("/v1/completions", json={**GOOD, "prompt": ["a", "b", "c"], "n": 11})  # 33 > 32
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_streamed_choices_join_to_the_unstreamed_ones(http):
    body = {**GOOD, "prompt": ["hello", "the quick"], "max_tokens": 8, "temperature": 0,
            "stream_options": {"include_usage": True}}
    whole = http.post("/v1/completions", json=body).json()
    texts, usage = {}, None
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(2)] == [c["text"] for c in whole["choices"]]
    assert usage == whole["usage"]
    offsets = []  # with logprobs, text_offset runs on from chunk to chunk
    with http.stream("POST", "/v1/completions", json={**body, "prompt": "hello", "stream": True, "logprobs": 1,
                                                       "echo": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    offsets += (c["logprobs"] or {}).get("text_offset", [])
    unstreamed = http.post("/v1/completions", json={**body, "prompt": "hello", "logprobs": 1, "echo": True}).json()
    assert offsets == unstreamed["choices"][0]["logprobs"]["text_offset"]


def test_fill_in_the_middle_with_codegemmas_tokens(tmp_path, start_server):
    """suffix: <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>, for a vocabulary that has them."""
    import sentencepiece as spm

    from gemmakit import LM, PRESETS, Gemma, Tokenizer

    fim = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"]
    lines = ["def add(a, b):\n    return a + b", "x = 1", "print(x)"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "fim"), vocab_size=320,
                                   model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                                   eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
                                   user_defined_symbols=fim, minloglevel=2)
    tokenizer = Tokenizer.from_file(tmp_path / "fim.model", family="gemma")
    torch.manual_seed(0)
    module = Gemma(PRESETS["gemma-tiny"].replace(vocab_size=tokenizer.vocab_size))
    module.reset_parameters()
    lm = LM(module.eval(), tokenizer, source="fim-tiny")
    s = start_server(create_app(lm, max_batch=1, max_len=128))
    r = httpx.post(s.url + "/v1/completions", json={"model": "fim-tiny", "prompt": "def add(a, b):\n",
                                                     "suffix": "\nprint(add(1, 2))", "max_tokens": 5, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    pre, suf, mid = (tokenizer.token_id(t) for t in fim[:3])
    ids = [2, pre, *tokenizer.encode("def add(a, b):\n", add_bos=False), suf,
           *tokenizer.encode("\nprint(add(1, 2))", add_bos=False), mid]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    stops = tokenizer.stop_ids + [tokenizer.token_id("<|file_separator|>"), pre]
    engine = Engine(lm.module, tokenizer, max_batch=1, max_len=128)
    want = engine.add(ids, 5, stop_ids=stops)
    while engine.busy:
        engine.step()
    assert r.json()["choices"][0]["text"] == want.text


def test_tokenizer_info_and_its_template(http, tiny_lm):
    import jinja2

    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"}]
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=messages,
                                                                              add_generation_prompt=True)
    assert rendered == tiny_lm.tokenizer.render_chat(messages)


def test_lm_eval_local_completions_scores_against_the_server(server, tiny_lm, tmp_path, monkeypatch):
    """lm-eval's own OpenAI-completions model (remote tokenizer: /tokenizer_info, /tokenize; echo +
    logprobs) scores MMLU items against the server: each choice gets the log-likelihood the model
    gives those tokens in-process. (lm-eval's remote tokenizer sends no <bos>, as it does to vLLM.)"""
    pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from gemmakit.eval.lm_eval_bridge import evaluate_local, local_mc_task
    from gemmakit.eval.mc import mmlu_rows

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    items = sorted(mmlu_rows(), key=lambda r: len(r["question"]) + sum(map(len, r["options"])))[:3]  # the shortest
    rows = [{"question": r["question"] + "".join(f"\n{letter}. {o}" for letter, o in zip("ABCD", r["options"])),
             "choices": list("ABCD"), "answer": r["answer"]} for r in items]
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    local_mc_task(tmp_path / "tasks", "gemmakit_served_mc", data, text="Question: {{question}}\nAnswer:")
    model = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="gemma-tiny", tokenizer_backend="remote",
                                num_concurrent=2, max_length=1024)
    out = evaluate_local(model, tmp_path / "tasks", "gemmakit_served_mc")
    tok = tiny_lm.tokenizer
    for sample in sorted(out["samples"]["gemmakit_served_mc"], key=lambda s: s["doc_id"]):
        row = rows[sample["doc_id"]]
        context = tok.encode(f"Question: {row['question']}\nAnswer:", add_bos=False)
        for choice, resp in zip(row["choices"], sample["resps"]):
            continuation = tok.encode(f" {choice}", add_bos=False)
            ids = context + continuation
            want = model_logprobs(tiny_lm, ids)
            expected = sum(want[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3)
