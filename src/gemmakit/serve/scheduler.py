"""Continuous batching: one thread drives the generation engine for every HTTP request.

Requests wait in a bounded queue; before every decode step the thread moves waiting requests into
free engine rows and drops the cancelled ones, so a request that arrives mid-generation joins the
running batch and a finished or abandoned one frees its row at once. All torch work happens on
this thread, never on the asyncio loop; results go back to each request's asyncio queue.

Which thread: `gemmakit serve` drives the engine from the main thread (`run`), the thread that
loaded the model, and runs the HTTP server beside it. torch's OpenMP keeps a pool of worker
threads per thread that calls into it; a second pool makes libgomp count more threads than cores
and stop spinning at its barriers, and the int8 kernel's many short parallel loops then run at
one core's speed (a 16-stream step: 66 ms instead of 40 on 2 cores). `start` runs it on a thread
of its own, for apps embedded elsewhere (and tests).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from ..errors import GemmaError
from .protocol import APIError

log = logging.getLogger("gemmakit.serve")


@dataclass
class Piece:
    job: Job
    text: str
    tokens: list  # (token id, logprob, [(id, logprob) of the top N]) of the tokens it came from, when asked


@dataclass
class Finished:
    job: Job
    reason: str  # "stop", "length" or "cancelled"
    completion_tokens: int


@dataclass
class Failed:
    job: Job
    error: APIError


@dataclass(eq=False)
class Job:
    """One completion on its way through the scheduler; the HTTP handler reads `events`, which
    the completions of one request (n > 1, a list of prompts) share, told apart by `index`."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: object  # gemmakit.sampling.Sampling
    stop: list[str] | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0  # the choice it answers
    options: dict = field(default_factory=dict)  # Engine.submit's keywords: logprobs, prompt_logprobs, constraint
    stop_ids: list[int] | None = None  # None: the tokenizer's
    cancelled: bool = False
    handle: object = None  # the engine's request, once admitted
    submitted: float = field(default_factory=time.monotonic)
    last_token: float | None = None  # when its latest token came (metrics)
    pending: list = field(default_factory=list)  # scored tokens whose text is not out yet

    def push(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shut down): nobody is waiting
            pass

    async def result(self) -> tuple[str, list, Finished]:
        """The whole text, its scored tokens and how it ended, once finished (for a job with an
        events queue of its own); raises the error the scheduler sent."""
        text, tokens = [], []
        while True:
            event = await self.events.get()
            if isinstance(event, Piece):
                text.append(event.text)
                tokens += event.tokens
            elif isinstance(event, Finished):
                return "".join(text), tokens, event
            else:
                raise event.error


class Scheduler:
    """Moves jobs into the engine, steps it, and sends each job its pieces. Admission (which
    waiting request gets a free row, and how many prompt tokens a step may prefill) is the
    engine's; the scheduler adds the HTTP side: a bounded queue, cancellation by clients, errors
    as responses, and a thread that sleeps while there is nothing to do."""

    def __init__(self, engine, max_queue: int, metrics=None):
        """metrics: a ServerMetrics (serve/metrics.py) told of every token, or None."""
        self.engine = engine
        self.metrics = metrics
        self.max_batch = engine.max_batch
        self.stop_ids = engine.tokenizer.stop_ids
        self.max_queue = max_queue
        self._inbox: collections.deque[Job] = collections.deque()  # submitted, not yet handed to the engine
        self._jobs: list[Job] = []  # handed to the engine: waiting there for a row, or decoding
        self._counts = (0, 0)  # (decoding, waiting in the engine) after the latest step, for stats()
        self._room = self._engine_room()  # free rows and prefix-cache blocks, likewise
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gemmakit-scheduler", daemon=True)
        self.steps = 0  # decode steps taken, and the rows they carried: for /health and tests
        self.rows_stepped = 0

    # -- called from the asyncio side ---------------------------------------------------------
    def start(self) -> None:
        """Drives the engine from a thread of its own."""
        self._thread.start()

    def run(self) -> None:
        """Drives the engine from the calling thread until `stop` (which then does not wait for it)."""
        self._run()

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queues the jobs of one request together, or refuses them all (503) when the queue is full."""
        if len(jobs) > self.max_queue:  # would never fit: not a matter of waiting
            raise APIError(400, f"this request asks for {len(jobs)} completions (prompts x n); the server "
                                f"queues at most {self.max_queue}", param="n")
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            running, waiting = self._counts
            waiting += len(self._inbox)
            if waiting + len(jobs) > self.max_queue:
                raise APIError(503, f"the server is busy: {running} requests running and "
                                    f"{waiting} waiting; retry shortly", type="server_error",
                               code="queue_full", headers={"Retry-After": "1"})
            self._inbox.extend(jobs)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: its row (or its place in the queue) is freed before the next step."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels what is still waiting or running and ends the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict:
        """What /health and /metrics show. Once idle, free_slots == max_batch and the prefix
        cache's blocks + free == capacity, or a row or a block was lost."""
        with self._cv:
            running, waiting = self._counts
            return {"running": running, "waiting": waiting + len(self._inbox), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "steps": self.steps, **self._room}

    def _engine_room(self) -> dict:
        prefixes = self.engine.prefixes
        blocks = {"blocks": prefixes.stored, "free": prefixes.free, "capacity": prefixes.capacity} if prefixes \
            else {"blocks": 0, "free": 0, "capacity": 0}
        return {"free_slots": self.engine.free_slots, "prefix_cache": blocks}

    # -- the scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._inbox and not self._jobs:
                    self._cv.wait()
                if self._stopping:
                    break
                new = list(self._inbox)
                self._inbox.clear()
                running, waiting = self._counts
                self._counts = (running, waiting + len(new))  # the queue bound still counts them
            for job in new:
                self._hand_over(job)
            for job in [j for j in self._jobs if j.cancelled]:
                self._release(job)
            if self.engine.busy:
                self._step()
            self._count()
        self._shutdown()

    def _count(self) -> None:
        room = self._engine_room()
        with self._cv:
            self._counts = (len(self.engine.requests), len(self.engine.waiting))
            self._room = room

    def _hand_over(self, job: Job) -> None:
        if job.cancelled:
            return
        try:
            job.handle = self.engine.submit(job.prompt_ids, job.max_tokens, job.sampling,
                                            stop_ids=self.stop_ids if job.stop_ids is None else job.stop_ids,
                                            stop_strings=job.stop or (), **job.options)
        except GemmaError as e:  # the engine found something the handler's checks did not
            job.push(Failed(job, APIError(400, str(e))))
            return
        self._jobs.append(job)

    def _release(self, job: Job) -> None:
        self._jobs.remove(job)
        self.engine.cancel(job.handle)  # a no-op for a finished request

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception:  # noqa: BLE001 - a bug must fail these requests, not the server
            log.exception("engine step failed; failing its requests")
            for job in list(self._jobs):
                job.push(Failed(job, APIError(500, "internal error during generation", type="server_error")))
                self._release(job)
            return
        self._count()  # before any job hears of this step
        self.steps += 1
        self.rows_stepped += len(deltas)
        jobs = {id(j.handle): j for j in self._jobs}
        done = []
        for delta in deltas:
            job = jobs[id(delta.request)]
            if self.metrics is not None:
                self.metrics.token(job, delta.request.finish_reason)
            request = delta.request
            if request.logprobs is not None:
                job.pending.append((delta.token_id, *request.output_logprobs[-1]))
            if delta.text or (job.pending and delta.finished):
                job.push(Piece(job, delta.text, job.pending))
                job.pending = []
            if delta.finished:  # the engine has freed its row already
                job.push(Finished(job, request.finish_reason, len(request.output_ids)))
                done.append(job)
        if done:
            self._jobs = [j for j in self._jobs if j not in done]

    def _shutdown(self) -> None:
        with self._cv:
            jobs = list(self._jobs) + list(self._inbox)
            self._inbox.clear()
        for job in jobs:
            job.push(Failed(job, APIError(503, "the server shut down before this request finished",
                                          type="server_error", code="shutting_down")))
            if job in self._jobs:
                self._release(job)
