"""The scheduler thread on its own: admission, the prefill budget, cancellation, the queue bound."""

import asyncio

import pytest

from gemmakit.runtime.engine import Engine
from gemmakit.runtime.sampling import GREEDY
from gemmakit.serve.protocol import APIError
from gemmakit.serve.scheduler import Job, Scheduler


class RecordingEngine(Engine):
    """The real engine, noting the step at which each request first decoded (it was admitted then)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.started = {}  # request id -> the engine step that admitted it
        self.steps = 0

    def step(self):
        deltas = super().step()
        for d in deltas:
            self.started.setdefault(d.request.id, self.steps)
        self.steps += 1
        return deltas


def make(tiny_lm, max_batch, max_queue=8, prefill_budget=512):
    engine = RecordingEngine(tiny_lm.module, tiny_lm.tokenizer, max_batch=max_batch, max_len=128,
                             prefill_budget=prefill_budget)
    return engine, Scheduler(engine, max_queue=max_queue)


def test_burst_of_prompts_joins_over_several_steps(tiny_lm):
    engine, scheduler = make(tiny_lm, max_batch=4, prefill_budget=10)
    prompt = tiny_lm.tokenizer.encode("the quick brown fox jumps")
    assert 5 < len(prompt) <= 10

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt, 6, GREEDY, None, loop) for _ in range(3)]
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(job.result() for job in jobs)), 60)
        finally:
            scheduler.stop()

    outs = asyncio.run(run())
    assert list(engine.started.values()) == [0, 1, 2]  # one prompt's worth of prefill between decode steps
    assert len({text for text, _ in outs}) == 1  # the same greedy text whenever each joined
    assert all(f.completion_tokens >= 1 for _, f in outs)


def test_cancelled_while_waiting_never_runs_and_queue_is_bounded(tiny_lm):
    engine, scheduler = make(tiny_lm, max_batch=1, max_queue=1)
    prompt = tiny_lm.tokenizer.encode("hello")

    async def run():
        loop = asyncio.get_running_loop()
        first = Job(prompt, 30, GREEDY, None, loop)
        waiting = Job(prompt, 30, GREEDY, None, loop)
        scheduler.start()
        try:
            scheduler.submit(first)
            await first.events.get()  # running: its first piece came back
            scheduler.submit(waiting)
            with pytest.raises(APIError) as e:
                scheduler.submit(Job(prompt, 3, GREEDY, None, loop))
            assert e.value.status == 503 and e.value.code == "queue_full"
            scheduler.cancel(waiting)
            await asyncio.wait_for(first.result(), 60)
            for _ in range(100):  # the thread drops the cancelled job on its next pass
                if scheduler.stats()["waiting"] == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            scheduler.stop()
        return waiting

    waiting = asyncio.run(run())
    assert len(engine.started) == 1  # the cancelled job never decoded
    assert waiting.handle is None or (waiting.handle.finish_reason == "cancelled" and not waiting.handle.output_ids)
    assert scheduler.stats()["waiting"] == 0 and engine.requests == []


def test_an_engine_failure_fails_requests_not_the_thread(tiny_lm):
    engine, scheduler = make(tiny_lm, max_batch=2)
    prompt = tiny_lm.tokenizer.encode("hello")
    real_step = engine.step
    engine.step = lambda: 1 / 0  # a bug in a decode step

    async def run():
        loop = asyncio.get_running_loop()
        scheduler.start()
        try:
            broken = Job(prompt, 5, GREEDY, None, loop)
            scheduler.submit(broken)
            with pytest.raises(APIError) as e:
                await asyncio.wait_for(broken.result(), 60)
            assert e.value.status == 500 and e.value.type == "server_error"
            engine.step = real_step
            fine = Job(prompt, 5, GREEDY, None, loop)
            scheduler.submit(fine)
            return await asyncio.wait_for(fine.result(), 60)
        finally:
            scheduler.stop()

    text, finished = asyncio.run(run())
    assert finished.completion_tokens >= 1 and engine.requests == []
