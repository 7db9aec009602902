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
        self.started = {}  # request id -> the engine step of its first token
        self.submitted = {}  # request id -> the engine step before which it was submitted
        self.steps = 0

    def submit(self, *args, **kw):
        request = super().submit(*args, **kw)
        self.submitted[request.id] = self.steps
        return request

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


def test_prompts_join_running_streams_within_the_prefill_budget(tiny_lm):
    """A burst on an idle engine is prefilled at once; a prompt that arrives while others decode
    is prefilled `prefill_budget` tokens a step, so the running streams get a token every step."""
    engine, scheduler = make(tiny_lm, max_batch=4, prefill_budget=2)
    prompt = tiny_lm.tokenizer.encode("the quick brown fox jumps")
    assert len(prompt) == 6  # 5 tokens to prefill: 3 steps of 2

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt, 6, GREEDY, None, loop) for _ in range(2)]
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        try:
            while scheduler.steps < 1:  # decoding now
                await asyncio.sleep(0.005)
            late = Job(prompt[:1] + [t + 1 for t in prompt[1:]], 6, GREEDY, None, loop)  # nothing to reuse
            scheduler.submit(late)
            jobs.append(late)
            return await asyncio.wait_for(asyncio.gather(*(job.result() for job in jobs)), 60)
        finally:
            scheduler.stop()

    outs = asyncio.run(run())
    first, second, late = engine.started.values()
    assert first == second == 0  # both prefilled in the first step
    assert late - engine.submitted[3] == 2  # 2 + 2 + 1 prompt tokens in 3 steps while the others decoded
    assert outs[0][0] == outs[1][0]  # the same greedy text
    assert all(f.completion_tokens >= 1 for *_, f in outs)


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

    text, _, finished = asyncio.run(run())
    assert finished.completion_tokens >= 1 and engine.requests == []
