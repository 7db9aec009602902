"""Evaluation over several processes (torchrun): which items each rank scores, and how rank 0
collects the records of the others.

Ranks talk over gloo whatever device the model runs on: they exchange only the records (Python
objects), once, at the end; each scores its own contiguous block of items with a model of its own.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from ..errors import GemmaError

# A rank resuming with its shard already done waits at the gather for the slowest other shard,
# which can take hours (a full MMLU): gloo's default of 30 minutes would end a healthy run.
_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Shards:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def block(self, n: int) -> range:
        """This rank's items of n: a contiguous block (consecutive items share few-shot prefixes
        that the scorer's cache reuses), the blocks of all ranks as equal as they can be."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)


def join() -> Shards:
    """The ranks torchrun describes in the environment (a process group on gloo), or one alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or size == 1:
        return Shards()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_TIMEOUT)
    shards = Shards(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    # torchrun stops the other ranks with SIGTERM when one fails; end with one line, not a traceback.
    def stopped(signum, frame):
        _quiet()
        raise GemmaError(f"rank {shards.rank} of {shards.size} stopped by SIGTERM: torchrun stops every rank when "
                         "one fails (its report names which); the finished items are kept for a resume")
    signal.signal(signal.SIGTERM, stopped)
    return shards


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(records: dict[int, dict], shards: Shards, kept: str) -> dict[int, dict] | None:
    """Every rank's records on rank 0 (None on the others); a rank that is gone is named."""
    if shards.size == 1:
        return records
    if not shards.main:
        _talk(lambda: dist.send_object_list([records], dst=0), "rank 0", shards, kept)
        return None
    out = dict(records)
    for rank in range(1, shards.size):
        box = [None]
        _talk(lambda: dist.recv_object_list(box, src=rank), f"rank {rank}", shards, kept)
        out.update(box[0])
    return out


def done(shards: Shards, kept: str) -> None:
    """Waits until rank 0 has written the results (each rank then removes its shard's file)."""
    if shards.size > 1:
        _talk(dist.barrier, "another rank" if shards.main else "rank 0", shards, kept)


def _talk(call, peer: str, shards: Shards, kept: str) -> None:
    try:
        call()
    except RuntimeError as e:  # gloo: the peer's connection closed, or the timeout passed
        # gloo's message starts with its source location: "[.../pair.cc:534] Connection closed by peer ..."
        why = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
        why = why.split(". ")[0]  # gloo goes on with advice on how to debug it
        _quiet()
        raise GemmaError(f"{peer} of {shards.size} stopped before the results were gathered ({why}); "
                         f"the finished items are kept in {kept}: run the same command to resume") from None


def _quiet() -> None:
    """On the way out with one error: torchrun's SIGTERM must not raise a second one over it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
