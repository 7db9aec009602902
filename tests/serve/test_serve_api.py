"""The OpenAI-compatible routes, called with the official `openai` client and with raw HTTP."""

import httpx
import openai
import pytest

from gemmakit.serve import create_app

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(tiny_lm, server_type):
    """One server for the module (with an API key), on a free loopback port."""
    s = server_type(create_app(tiny_lm, api_key=KEY, max_batch=4, max_queue=8, max_len=128))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def reference(lm, prompt_ids, max_tokens):
    """The greedy continuation the engine gives this prompt on its own, straight from Python."""
    from gemmakit.runtime.engine import Engine

    engine = Engine(lm.module, lm.tokenizer, max_batch=1, max_len=128)
    request = engine.add(prompt_ids, max_tokens, stop_ids=lm.tokenizer.stop_ids)
    while engine.requests:
        engine.step()
    return request.text, len(request.output_ids)


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == ["gemma-tiny"]
    health = httpx.get(http.base_url.join("/health")).json()  # no key needed
    assert health["status"] == "ok" and health["max_batch"] == 4


def test_completion(client, tiny_lm):
    out = client.completions.create(model="gemma-tiny", prompt="hello world", max_tokens=7, temperature=0)
    text, n = reference(tiny_lm, tiny_lm.tokenizer.encode("hello world"), 7)
    assert out.object == "text_completion"
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == ("length" if n == 7 else "stop")
    assert out.usage.prompt_tokens == len(tiny_lm.tokenizer.encode("hello world"))
    assert out.usage.completion_tokens == n
    assert out.usage.total_tokens == out.usage.prompt_tokens + n


def test_completion_stream(client, tiny_lm):
    chunks = list(client.completions.create(model="gemma-tiny", prompt="the quick brown", max_tokens=9,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text, n = reference(tiny_lm, tiny_lm.tokenizer.encode("the quick brown"), 9)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_completion_from_token_ids_with_echo(client, tiny_lm):
    ids = tiny_lm.tokenizer.encode("hello world")
    out = client.completions.create(model="gemma-tiny", prompt=ids, max_tokens=5, temperature=0, echo=True)
    text, _ = reference(tiny_lm, ids, 5)
    assert out.choices[0].text == tiny_lm.tokenizer.decode(ids) + text


def test_chat(client, tiny_lm):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "tell me more"}]
    out = client.chat.completions.create(model="gemma-tiny", messages=messages, max_tokens=6, temperature=0)
    ids = tiny_lm.tokenizer.chat_ids(messages)  # the assistant turn is Gemma's `model` turn
    text, n = reference(tiny_lm, ids, 6)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)


def test_chat_stream(client, tiny_lm):
    messages = [{"role": "user", "content": "the lazy dog"}]
    stream = client.chat.completions.create(model="gemma-tiny", messages=messages, max_completion_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    text, _ = reference(tiny_lm, tiny_lm.tokenizer.chat_ids(messages), 8)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_sse_wire_format(http):
    with http.stream("POST", "/v1/completions", json={"model": "gemma-tiny", "prompt": "hello", "max_tokens": 3,
                                                      "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_seeded_sampling_repeats_and_stop_strings_cut(client):
    kw = dict(model="gemma-tiny", prompt="hello", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    greedy = client.completions.create(model="gemma-tiny", prompt="hello", max_tokens=12, temperature=0)
    full = greedy.choices[0].text
    assert len(full) > 3
    stop = full[2:4]
    cut = client.completions.create(model="gemma-tiny", prompt="hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


GOOD = {"model": "gemma-tiny", "prompt": "hello", "max_tokens": 4}


@pytest.mark.parametrize("body, status, param, code", [
    ('{"model": "gemma-tiny", "prompt": ', 400, None, None),  # malformed JSON
    ("[1, 2]", 400, None, None),  # not an object
    ({"model": "gemma-tiny"}, 400, "prompt", None),  # missing field
    ({"prompt": "hello"}, 400, "model", None),
    ({**GOOD, "max_tokens": "4"}, 400, "max_tokens", None),  # mistyped
    ({**GOOD, "temperature": "hot"}, 400, "temperature", None),
    ({**GOOD, "stream": "yes"}, 400, "stream", None),
    ({**GOOD, "stop": 5}, 400, "stop", None),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens", None),
    ({**GOOD, "max_tokens": -3}, 400, "max_tokens", None),
    ({**GOOD, "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),  # absurd
    ({**GOOD, "prompt": "hello " * 200}, 400, "prompt", "context_length_exceeded"),  # longer than the context
    ({**GOOD, "prompt": [2, 9999]}, 400, "prompt", None),  # token id outside the vocabulary
    ({**GOOD, "top_p": 0}, 400, "top_p", None),
    ({**GOOD, "seed": -1}, 400, "seed", None),
    ({**GOOD, "prompt": ["hello", ""]}, 400, "prompt", None),  # an empty prompt in a list
    ({**GOOD, "prompt": [[2, 5], [2, 9999]]}, 400, "prompt", None),
    ({**GOOD, "n": 0}, 400, "n", None),
    ({**GOOD, "n": 17}, 400, "n", None),
    ({**GOOD, "logprobs": 21}, 400, "logprobs", None),
    ({**GOOD, "frequency_penalty": 2.5}, 400, "frequency_penalty", None),
    ({**GOOD, "presence_penalty": "x"}, 400, "presence_penalty", None),
    ({**GOOD, "logit_bias": {"five": 1}}, 400, "logit_bias", None),
    ({**GOOD, "logit_bias": {"5": 101}}, 400, "logit_bias", None),
    ({**GOOD, "logit_bias": {"99999": 1}}, 400, "logit_bias", None),  # outside the vocabulary
    ({**GOOD, "suffix": "return x"}, 400, "suffix", None),  # this tokenizer has no FIM tokens
    ({**GOOD, "best_of": 3}, 400, "best_of", None),  # only best_of == n
    ({**GOOD, "response_format": {"type": "json_schema"}}, 400, "response_format", None),  # no schema
    ({**GOOD, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}}, 400,
     "response_format", None),
    ({**GOOD, "response_format": {"type": "yaml"}}, 400, "response_format.type", None),
    ({**GOOD, "functions": [{"name": "f"}]}, 400, "functions", None),  # the deprecated form of tools
    ({**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),  # chat only
    ({**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found"),  # unknown model
])
def test_bad_completion_requests(http, body, status, param, code):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = http.post("/v1/completions", **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert http.post("/v1/completions", json=GOOD).status_code == 200  # and the server goes on serving


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "user"}], "messages.0.content"),
    ([{"role": "robot", "content": "hi"}], "messages.0.role"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "messages"),  # Gemma 1: no system
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages"),
    ([{"role": "user", "content": "hello " * 200}], "messages"),
])
def test_bad_chat_requests(client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma-tiny", messages=messages, max_tokens=4)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["message"]


def test_the_default_values_clients_send_are_accepted(http):
    """Clients send these by default (0 penalties, an empty logit_bias, text answers, no functions)."""
    body = {**GOOD, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "best_of": 1, "suffix": None,
            "response_format": {"type": "text"}, "functions": [], "function_call": "none", "user": "someone"}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_bad_completion_budget_names_the_field_the_client_used(http):
    body = {"model": "gemma-tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = http.post("/v1/chat/completions", json={**body, "max_completion_tokens": 10**9})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", json=GOOD, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_oversized_body_is_refused_unread(http):
    r = http.post("/v1/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_unknown_route_has_an_error_body(http):
    r = http.get("/v1/engines")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_tokenize_and_detokenize(http, server, tiny_lm):
    tok = tiny_lm.tokenizer
    r = http.post("/tokenize", json={"model": "gemma-tiny", "prompt": "hello world"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tokens": tok.encode("hello world"), "count": len(tok.encode("hello world")), "max_model_len": 128}
    r = http.post("/tokenize", json={"content": "hello", "add_special_tokens": False})  # llama.cpp's server's name
    assert r.json()["tokens"] == tok.encode("hello", add_bos=False)
    messages = [{"role": "user", "content": "hi"}]
    assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == tok.chat_ids(messages)
    ids = tok.encode("the quick brown fox")
    r = http.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json()["prompt"] == tok.decode(ids) == r.json()["content"]
    # refused with a 4xx naming the field, and behind the API key like /v1
    assert http.post("/tokenize", json={"prompt": "a", "messages": messages}).status_code == 400
    r = http.post("/detokenize", json={"tokens": [2, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"model": "gpt-4", "prompt": "a"}).status_code == 404
    assert httpx.post(server.url + "/tokenize", json={"prompt": "a"}).status_code == 401


def test_prometheus_metrics_count_what_was_served(http, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}

    before = scrape()
    out = client.completions.create(model="gemma-tiny", prompt="the quick brown fox", max_tokens=5, temperature=0)
    after = scrape()
    assert after["gemmakit_completion_tokens_total"] - before["gemmakit_completion_tokens_total"] == out.usage.completion_tokens
    assert after["gemmakit_prompt_tokens_total"] - before["gemmakit_prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["gemmakit_time_to_first_token_seconds_count"] == before["gemmakit_time_to_first_token_seconds_count"] + 1
    assert (after["gemmakit_inter_token_latency_seconds_count"] - before["gemmakit_inter_token_latency_seconds_count"]
            == out.usage.completion_tokens - 1)
    assert after["gemmakit_requests_running"] == 0 and after["gemmakit_requests_waiting"] == 0
    assert "gemmakit_prefix_cache_hit_tokens_total" in after
