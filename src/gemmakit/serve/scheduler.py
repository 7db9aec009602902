"""Continuous batching: one thread drives the generation engine for every HTTP request.

Requests wait in a bounded queue; before every decode step the thread moves waiting requests into
free engine rows and drops the cancelled ones, so a request that arrives mid-generation joins the
running batch and a finished or abandoned one frees its row at once. All torch work happens on
this thread, never on the asyncio loop; results go back to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field

from ..errors import GemmaError
from .protocol import APIError

log = logging.getLogger("gemmakit.serve")


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass
class Failed:
    error: APIError


@dataclass(eq=False)
class Job:
    """One request on its way through the scheduler; the HTTP handler reads `events`."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: object  # gemmakit.sampling.Sampling
    stop: list[str] | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    handle: object = None  # the engine's request, once admitted

    def push(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shut down): nobody is waiting
            pass

    async def result(self) -> tuple[str, Finished]:
        """The whole text and how it ended, once finished; raises the error the scheduler sent."""
        text = []
        while True:
            event = await self.events.get()
            if isinstance(event, Piece):
                text.append(event.text)
            elif isinstance(event, Finished):
                return "".join(text), event
            else:
                raise event.error


class Scheduler:
    def __init__(self, engine, max_queue: int, prefill_budget: int = 512):
        self.engine = engine
        self.prefill_budget = prefill_budget  # prompt tokens admitted between two decode steps
        self.max_batch = engine.max_batch
        self.stop_ids = engine.tokenizer.stop_ids
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gemmakit-scheduler", daemon=True)
        self.steps = 0  # decode steps taken, and the rows they carried: for /health and tests
        self.rows_stepped = 0

    # -- called from the asyncio side ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise APIError(503, f"the server is busy: {len(self._running)} requests running and "
                                    f"{len(self._waiting)} waiting; retry shortly", type="server_error",
                               code="queue_full", headers={"Retry-After": "1"})
            self._waiting.append(job)
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
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "steps": self.steps}

    # -- the scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stopping:
                    break
                gone = [j for j in self._running if j.cancelled]
                self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
                admit, budget = [], self.prefill_budget
                while self._waiting and len(self._running) - len(gone) + len(admit) < self.max_batch:
                    # The engine prefills a prompt when it is added, while the running rows wait:
                    # a burst of long prompts joins over several steps instead of in one long stall.
                    if admit and len(self._waiting[0].prompt_ids) > budget:
                        break
                    budget -= len(self._waiting[0].prompt_ids)
                    admit.append(self._waiting.popleft())
            for job in gone:
                self._release(job)
            for job in admit:
                self._admit(job)
            if self._running:
                self._step()
        self._shutdown()

    def _admit(self, job: Job) -> None:
        try:
            job.handle = self.engine.add(job.prompt_ids, job.max_tokens, job.sampling, stop_ids=self.stop_ids,
                                         stop_strings=job.stop or ())
        except GemmaError as e:  # the engine found something the handler's checks did not
            job.push(Failed(APIError(400, str(e))))
            return
        except Exception:  # noqa: BLE001 - a bug must fail this request, not stop the thread
            log.exception("adding a request failed")
            job.push(Failed(APIError(500, "internal error while reading the prompt", type="server_error")))
            return
        with self._cv:
            self._running.append(job)

    def _release(self, job: Job) -> None:
        with self._cv:
            self._running.remove(job)
        self.engine.cancel(job.handle)  # a no-op for a finished request

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception:  # noqa: BLE001 - a bug must fail these requests, not the server
            log.exception("decode step failed; failing the running requests")
            for job in list(self._running):
                job.push(Failed(APIError(500, "internal error during generation", type="server_error")))
                self._release(job)
            return
        self.steps += 1
        self.rows_stepped += len(deltas)
        jobs = {id(j.handle): j for j in self._running}
        done = []
        for delta in deltas:
            job = jobs[id(delta.request)]
            if delta.text:
                job.push(Piece(delta.text))
            if delta.finished:  # the engine has freed its row already
                job.push(Finished(delta.request.finish_reason, len(delta.request.output_ids)))
                done.append(job)
        if done:
            with self._cv:
                self._running = [j for j in self._running if j not in done]

    def _shutdown(self) -> None:
        with self._cv:
            jobs = list(self._running) + list(self._waiting)
            self._waiting.clear()
        for job in jobs:
            job.push(Failed(APIError(503, "the server shut down before this request finished",
                                     type="server_error", code="shutting_down")))
            if job in self._running:
                self._release(job)
