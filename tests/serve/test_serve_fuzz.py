"""The server fuzzed: schemathesis over its own OpenAPI schema, every route; then the hostile
clients a schema does not describe (oversized, chunked, deep, not UTF-8, huge numbers, slow,
vanishing). Each gets a 4xx with OpenAI's error body, or a clean close, and the server goes on
giving a normal request the same answer as before."""

import json
import os
import socket
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, seed, settings
from schemathesis.checks import positive_data_acceptance

from gemmakit.serve import create_app
from gemmakit.serve.app import MAX_BODY_BYTES

NAME = "gemma-tiny"
NORMAL = {"model": NAME, "prompt": "hello world", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_lm, server_type, one_torch_thread):
    """one_torch_thread first: the scheduler's thread keeps the thread count torch had when it started."""
    s = server_type(create_app(tiny_lm, max_batch=4, max_queue=8, max_len=40))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def baseline(http):
    """A normal request's answer before anything hostile was sent."""
    return http.post("/v1/completions", json=NORMAL).json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def api_schema(server, baseline):
    """The server's own /openapi.json, `model` pinned to the one it serves: the schema (rightly)
    says any string, and a generated name only ever meets the 404; negative cases still send others."""
    spec = httpx.get(server.url + "/openapi.json").json()
    for name, component in spec["components"]["schemas"].items():
        if name in ("CompletionRequest", "ChatRequest"):
            component["properties"]["model"] = {"type": "string", "enum": [NAME]}
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=server.url)
    return schema


def assert_openai_error(response, sent=None) -> None:
    assert 400 <= response.status_code < 500, f"{response.status_code} {response.text[:300]} for {json.dumps(sent, default=str)}"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)


def assert_still_serving(http, baseline) -> None:
    after = http.post("/v1/completions", json=NORMAL)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == baseline
    health = http.get("/health").json()
    assert health["running"] == health["waiting"] == 0 and health["free_slots"] == health["max_batch"]


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
# A few examples a route in the suite; scripts/fuzz_server.py sets more (and a seed of its own).
@settings(max_examples=int(os.environ.get("GEMMAKIT_FUZZ_EXAMPLES", 12)), deadline=None,
          derandomize="GEMMAKIT_FUZZ_SEED" not in os.environ, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate])  # no shrinking: a failure names its body as it came
@(seed(int(os.environ["GEMMAKIT_FUZZ_SEED"])) if "GEMMAKIT_FUZZ_SEED" in os.environ else (lambda f: f))
def test_every_route_under_schemathesis(case):
    """No 5xx; every answer conforms to the schema (status, content type, body: errors are OpenAI's
    ErrorResponse); data the schema forbids is refused. Not checked: that data the schema allows is
    accepted (a prompt plus max_tokens beyond the context is valid JSON the server must refuse)."""
    response = case.call(timeout=60)
    if response.status_code >= 400:
        assert_openai_error(response, case.body)
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


def test_still_serving_after_the_fuzzing(http, baseline, server):
    """Runs after the schemathesis cases (file order): nothing they sent left a row, a block or a
    changed answer behind."""
    assert_still_serving(http, baseline)
    blocks = http.get("/health").json()["prefix_cache"]
    assert blocks["blocks"] + blocks["free"] == blocks["capacity"]


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def completion(**fields) -> bytes:
    return json.dumps({**NORMAL, **fields}).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_an_oversized_body_is_a_413(http, baseline, chunked):
    """A body over the limit, its length declared or not (chunked: no length, read until it is over)."""
    def sent(body: bytes):
        if not chunked:
            return body
        return (body[i:i + (1 << 16)] for i in range(0, len(body), 1 << 16))  # httpx sends a generator chunked

    headers = {"Content-Type": "application/json"}
    r = http.post("/v1/completions", content=sent(completion(prompt="x" * MAX_BODY_BYTES)), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = http.post("/v1/completions", content=sent(completion()), headers=headers)  # within the limit: answered
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == baseline
    assert_still_serving(http, baseline)


BAD_BODIES = {
    "deep JSON": b'{"model": "gemma-tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep JSON within the parser's reach": b'{"model": "gemma-tiny", "prompt": ' + b"[" * 900 + b"]" * 900 + b"}",
    "deep schema": json.dumps({**NORMAL, "response_format": {"type": "json_schema", "json_schema": {
        "schema": json.loads('{"type": "array", "items": ' * 900 + "{}" + "}" * 900)}}}).encode(),
    "invalid UTF-8": b'{"model": "gemma-tiny", "prompt": "\xff\xfe\xc3", "max_tokens": 3}',
    "an unpaired surrogate": b'{"model": "gemma-tiny", "prompt": "hi \\ud800", "max_tokens": 3}',
    "a surrogate in a stop string": b'{"model": "gemma-tiny", "prompt": "hi", "stop": ["\\udfff"], "max_tokens": 3}',
    "a surrogate in a message": b'{"model": "gemma-tiny", "messages": [{"role": "user", "content": "\\udc00"}]}',
    "not JSON": b"{'model': 'gemma-tiny'",
    "a JSON list": b"[1, 2, 3]",
    "NaN temperature": completion()[:-1] + b', "temperature": NaN}',
    "huge max_tokens": completion(max_tokens=10**40),
    "max_tokens 2^63": completion(max_tokens=2**63),
    "huge n": completion(n=10**30),
    "n beyond the queue": completion(n=16),
    "huge logprobs": completion(logprobs=10**6),
    "huge token id": completion(prompt=[10**30]),
    "huge logit_bias id": completion(logit_bias={str(10**30): 1}),
    "many stop strings": completion(stop=[f"s{i}" for i in range(10_000)]),
    "huge seed": completion(seed=2**64, temperature=1),
}


@pytest.mark.parametrize("raw", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_hostile_bodies_are_4xx(server, http, baseline, raw):
    path = "/v1/chat/completions" if b'"messages"' in raw else "/v1/completions"
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response)
    assert_still_serving(http, baseline)


GOOD_BUT_EXTREME = {
    "huge stop strings": dict(stop=["x" * 1_000_000, "y" * 1_000_000]),
    "a stop string the answer starts": dict(stop=None),  # filled in below: the answer itself, and more
    "huge top_k": dict(top_k=2**62, temperature=1, seed=3),
    "tiny temperature": dict(temperature=1e-300, seed=3),
    "huge repetition penalty": dict(repetition_penalty=1e308),
    "tiny repetition penalty": dict(repetition_penalty=1e-300, temperature=1, seed=3),
    "tiny top_p": dict(top_p=1e-300, temperature=1, seed=3),
    "the largest seed": dict(seed=2**64 - 1, temperature=1, n=3),
    "every logprob": dict(logprobs=20, echo=True),
}


@pytest.mark.parametrize("fields", GOOD_BUT_EXTREME.values(), ids=GOOD_BUT_EXTREME.keys())
def test_extreme_but_valid_requests_are_answered(http, baseline, fields):
    held_back = fields.get("stop", 0) is None
    if held_back:  # all of the answer is held back as the start of a stop string, and released at the end
        fields = dict(stop=[baseline + "z" * 10_000])
    response = http.post("/v1/completions", json={**NORMAL, **fields})
    assert response.status_code == 200, response.text[:300]
    choices = response.json()["choices"]
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    if held_back:
        assert choices[0]["text"] == baseline
    assert_still_serving(http, baseline)


def test_a_client_that_vanishes_mid_stream(server, http, baseline):
    """The socket closes after the first events of an SSE stream: the request is cancelled and its
    row freed; a chunked request cut mid-body and a request cut mid-headers leave nothing either."""
    body = json.dumps({**NORMAL, "max_tokens": 30, "stream": True, "n": 2}).encode()
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: {") < 2:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
        s.close()
    for cut in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"model\":",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Len"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(cut)
    deadline = time.monotonic() + 20
    while http.get("/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_still_serving(http, baseline)


def test_slow_clients(server, http, baseline):
    """A body sent a few bytes at a time, and a stream read long after it was asked for: both get
    their whole answer, and a normal request is answered meanwhile."""
    body = completion()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 8):
            slow.sendall(body[i:i + 8])
            time.sleep(0.01)
            if i == 40:  # half way through its body, another client is served
                assert http.post("/v1/completions", json=NORMAL).json()["choices"][0]["text"] == baseline
        out = b""
        while chunk := slow.recv(65536):
            out += chunk
    status, answer = status_and_body(out)
    assert status == 200 and answer["choices"][0]["text"] == baseline

    with httpx.Client(base_url=server.url, timeout=60) as reader:
        with reader.stream("POST", "/v1/completions", json={**NORMAL, "stream": True}) as r:
            time.sleep(1.0)  # the whole answer is generated while nobody reads
            assert http.post("/v1/completions", json=NORMAL).json()["choices"][0]["text"] == baseline
            text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {"))
    assert text == baseline
    assert_still_serving(http, baseline)
