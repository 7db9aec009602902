"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own per app.

The scheduler's thread records them as it goes: tokens in and out, prompt tokens whose keys and
values came from a row's cache (the prefix-cache hit rate is reused / prompt), time to first token
and the time between a stream's tokens; queue length and running requests are read when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

# Seconds: from a few milliseconds (a token of a small model) to a long prompt's wait.
_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self, stats):
        """stats: a function returning the scheduler's {"running": n, "waiting": n, ...} (Scheduler.stats)."""
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("gemmakit_requests_running", "Requests decoding now", registry=r).set_function(
            lambda: stats()["running"])
        Gauge("gemmakit_requests_waiting", "Requests waiting for a free row", registry=r).set_function(
            lambda: stats()["waiting"])
        Gauge("gemmakit_free_slots", "Engine rows free for a request", registry=r).set_function(
            lambda: stats()["free_slots"])
        for name, key, what in (("blocks", "blocks", "stored"), ("free_blocks", "free", "never used yet"),
                                ("capacity_blocks", "capacity", "the cache holds")):
            Gauge(f"gemmakit_prefix_cache_{name}", f"Prefix-cache blocks {what}", registry=r).set_function(
                lambda key=key: stats()["prefix_cache"][key])
        ProcessCollector(registry=r)  # process_resident_memory_bytes and the like (Linux)
        self.prompt_tokens = Counter("gemmakit_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.reused_tokens = Counter("gemmakit_prefix_cache_hit_tokens",
                                     "Prompt tokens whose keys and values were already cached", registry=r)
        self.completion_tokens = Counter("gemmakit_completion_tokens", "Tokens generated", registry=r)
        self.requests = Counter("gemmakit_requests_finished", "Requests finished, by reason", ["reason"], registry=r)
        self.ttft = Histogram("gemmakit_time_to_first_token_seconds", "From submission to the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("gemmakit_inter_token_latency_seconds", "Between one stream's successive tokens",
                             buckets=_LATENCY, registry=r)

    def token(self, job, finished_reason: str | None) -> None:
        """One generated token of `job` (which carries its submission and last-token times)."""
        now = time.monotonic()
        if job.last_token is None:
            self.ttft.observe(now - job.submitted)
            self.prompt_tokens.inc(len(job.prompt_ids))
            self.reused_tokens.inc(job.handle.reused)
        else:
            self.itl.observe(now - job.last_token)
        job.last_token = now
        self.completion_tokens.inc()
        if finished_reason is not None:
            self.requests.labels(finished_reason).inc()
