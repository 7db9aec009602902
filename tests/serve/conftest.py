"""Fixtures for the server tests: a small random model and a server on a free loopback port,
started and stopped by the test."""

import socket
import threading
import time

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """The server's thread, uvicorn's loop and the test's clients share a 2-core box: a second
    intra-op thread only spins against them (a decode step gets ten times slower)."""


@pytest.fixture(scope="session")
def tiny_lm(sentencepiece_model):
    """gemma-tiny's shape with random weights, its vocabulary cut to the suite's tiny tokenizer so that
    every sampled id decodes."""
    import torch

    from gemmakit import LM, PRESETS, Gemma, Tokenizer

    tokenizer = Tokenizer.from_file(sentencepiece_model, family="gemma")
    torch.manual_seed(0)
    module = Gemma(PRESETS["gemma-tiny"].replace(vocab_size=tokenizer.vocab_size))
    module.reset_parameters()
    return LM(module.eval(), tokenizer, source="gemma-tiny")


class Server:
    """An app run by uvicorn on a thread, at `url`."""

    def __init__(self, app, graceful_timeout: float = 5):
        import uvicorn

        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="session")
def server_type():
    """`Server` for module-scoped fixtures (test files cannot import this conftest by name: another
    test folder's conftest may hold that module name)."""
    return Server


@pytest.fixture
def start_server():
    """start_server(app, graceful_timeout) -> Server; every server started is shut down after the test."""
    servers = []

    def start(app, **kw):
        servers.append(Server(app, **kw))
        return servers[-1]

    yield start
    for s in servers:
        if s.thread.is_alive():
            s.stop()
