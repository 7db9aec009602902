"""Continuous batching under load: concurrent requests, late joiners, disconnects, a full queue, shutdown."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from gemmakit.serve import create_app

PROMPTS = ["hello world", "the quick brown fox", "a lazy dog", "def f(x):", "gemma reads tokens",
           "while the model answers", "print 42", "héllo wörld"]


def wait_until(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def health(server):
    return httpx.get(server.url + "/health").json()


def test_concurrent_greedy_outputs_equal_solo_outputs(tiny_lm, start_server):
    server = start_server(create_app(tiny_lm, max_batch=8, max_queue=32, max_len=96))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 4 + (i * 5) % 13, i % 3 == 0) for i in range(32)]

    def run(job):
        prompt, max_tokens, stream = job
        kw = dict(model="gemma-tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(8) as pool:  # 8 clients, 32 requests
        together = list(pool.map(run, jobs))
    stats = health(server)
    batched_rows = server.scheduler.rows_stepped / server.scheduler.steps
    alone = [run(job) for job in jobs]  # one at a time: every step decodes a single row
    assert together == alone
    assert stats["running"] == stats["waiting"] == 0
    assert batched_rows > 2, f"requests did not share decode steps ({batched_rows:.2f} rows a step)"


def test_a_request_arriving_mid_generation_joins_the_batch(tiny_lm, start_server):
    server = start_server(create_app(tiny_lm, max_batch=2, max_len=128))
    long_body = {"model": "gemma-tiny", "prompt": "hello", "max_tokens": 100, "temperature": 0, "stream": True}
    seen_after_short = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long_body) as r:
            lines = r.iter_lines()
            got = 0
            while got < 3:
                got += next(lines).startswith("data: {")
            short = http.post("/v1/completions", json={"model": "gemma-tiny", "prompt": "a lazy dog", "max_tokens": 3,
                                                       "temperature": 0})
            # The long request is still running: the short one did not wait for it to finish.
            seen_after_short = [line for line in lines if line.startswith("data: ")]
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] >= 1
    assert seen_after_short[-1] == "data: [DONE]"
    assert json.loads(seen_after_short[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(seen_after_short) > 3


def test_client_disconnect_frees_its_slot(tiny_lm, start_server):
    server = start_server(create_app(tiny_lm, max_batch=4, max_len=512))
    body = {"model": "gemma-tiny", "prompt": "hello", "max_tokens": 400, "temperature": 0}
    for _ in range(4):  # streams abandoned after their first chunks
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data: {"):
                    pass
    raw = socket.create_connection(("127.0.0.1", server.port))  # a plain request abandoned mid-generation
    payload = json.dumps(body).encode()
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    wait_until(lambda: health(server)["running"] >= 1, what="the plain request to start")
    raw.close()
    wait_until(lambda: health(server)["running"] == 0, what="abandoned requests to leave the batch")
    assert server.scheduler.engine.free_slots == 4

    # The next requests still run at full batch.
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, server.url + "/v1/completions", json={**body, "max_tokens": 120}, timeout=60)
                   for _ in range(4)]
        wait_until(lambda: health(server)["running"] == 4, what="four requests running together")
        assert all(f.result().status_code == 200 for f in futures)


def test_full_queue_answers_503(tiny_lm, start_server):
    server = start_server(create_app(tiny_lm, max_batch=1, max_queue=1, max_len=512))
    body = {"model": "gemma-tiny", "prompt": "hello", "max_tokens": 250, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=60)
        wait_until(lambda: health(server)["running"] == 1, what="the first request to run")
        second = pool.submit(httpx.post, server.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
        wait_until(lambda: health(server)["waiting"] == 1, what="the second request to wait")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="gemma-tiny", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert client.completions.create(model="gemma-tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def test_graceful_shutdown_finishes_the_stream_in_flight(tiny_lm, start_server):
    server = start_server(create_app(tiny_lm, max_batch=2, max_len=128), graceful_timeout=60)
    body = {"model": "gemma-tiny", "prompt": "hello", "max_tokens": 20, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            rest = [line for line in lines if line]
    stopper.join(30)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert not server.thread.is_alive() and not server.scheduler._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


def test_shutdown_cancels_what_does_not_finish_in_time(tiny_lm, start_server):
    server = start_server(create_app(tiny_lm, max_batch=2, max_len=1024), graceful_timeout=0.5)
    body = {"model": "gemma-tiny", "prompt": "hello", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            started = time.monotonic()
            server.stop()  # returns once uvicorn and the scheduler thread are done
            with pytest.raises(httpx.HTTPError):  # the stream is cut, not finished
                for line in lines:
                    assert line != "data: [DONE]"
    assert time.monotonic() - started < 15
    assert not server.scheduler._thread.is_alive()
    assert server.scheduler.engine.requests == []
