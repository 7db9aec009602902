"""Training metrics: one JSON object per line in metrics.jsonl, and the loss curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from ..paths import atomic_path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        # A resumed run rewrites the steps after its checkpoint, so the file stays one curve.
        kept = [r for r in read(self.path) if r["step"] <= resume_step] if resume_step else []
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line can be torn, by a process killed mid-write
                raise DataError(f"{path}: line {i + 1} is not JSON") from None
    return records


def plot(metrics: Path, out: Path, per_step: tuple[str, str] = ("loss", "training loss"),
         held: tuple[str, str] = ("val_loss", "held-out loss"), ylabel: str = "cross-entropy (nats/token)") -> Path:
    """One PNG of a value logged every step (a line) and one logged at each evaluation (dots):
    (metrics.jsonl key, label) each; by default training and held-out loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (key, label), style in ((per_step, dict(lw=1)), (held, dict(marker="o"))):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
