"""`gemmakit serve` as a user runs it: a process that binds loopback, checks the key and stops on Ctrl-C."""

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from gemmakit.cli.main import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_starts_answers_and_stops_cleanly(sentencepiece_model):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--model", "gemma-tiny",
                             "--tokenizer", str(sentencepiece_model), "--port", str(port), "--api-key", "k",
                             "--max-batch", "2", "--context", "64", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "gemma-tiny" and models["data"][0]["context_length"] == 64
        answer = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                            json={"model": "gemma-tiny", "prompt": "hello", "max_tokens": 3}).json()
        assert answer["usage"]["completion_tokens"] == 3  # the engine runs on the main thread
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert f"serving gemma-tiny on http://127.0.0.1:{port}/v1" in out


@pytest.mark.parametrize("flag", ["--max-batch", "--max-queue", "--context", "--port"])
def test_serve_command_rejects_bad_sizes(flag, capsys):
    assert main(["serve", "--model", "gemma-tiny", flag, "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemmakit: error:") and flag in err
