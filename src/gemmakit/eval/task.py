"""What the harness needs from a task: its items, how to score a batch of them, how to sum up."""

from __future__ import annotations

from .harness import mean_stderr


class Task:
    name = "task"
    primary = "score"  # the metric reported as the task's score
    metric_keys: tuple[str, ...] = ("score",)  # record fields averaged into metrics
    batch_size = 1

    def __init__(self, items: list, settings: dict):
        self.items = items
        self.settings = settings

    def score(self, items: list) -> list[dict]:
        """One record per item; each has a "score" and whatever shows how it was reached."""
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> dict:
        out = {}
        for key in self.metric_keys:
            value, stderr = mean_stderr([float(r[key]) for r in records])
            out[key] = {"value": value, "stderr": stderr}
        return out


def limit_items(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]
