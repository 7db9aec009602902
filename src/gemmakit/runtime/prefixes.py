"""Automatic prefix caching: keys and values of blocks of tokens, kept across requests.

A block is `block` tokens at positions [i * block, (i + 1) * block) of a sequence. Its key is a
digest of its tokens and of its parent's key (a chain from position 0), so equal keys mean equal
contexts, and so equal keys and values. A request's prompt is looked up block by block; the
longest chain found, plus a shorter "tail" block where one was stored, is copied into the
request's row and only the rest is prefilled. Blocks are published as prefills complete them
and when a request ends (its output too: the next turn of a conversation starts with it), and
evicted least recently used; a lookup touches a chain from its last block back to its first, so
a chain is evicted from its end and never loses its beginning first.

The engine's rows stay dense, one contiguous tensor per row: CPU attention kernels read a row
as it is, where a block table would gather every row's whole context on every token. A hit is
a copy (of positions [0, n) for global layers; of the last window's worth for sliding layers),
which costs a few milliseconds where a prefill of the same tokens costs seconds.

Sliding-window layers: a block keeps its sliding layers' keys only while its row's ring still
held them when it was published; a hit at length n needs them for the window before n only,
so a chain whose early blocks lack them still serves continuations past one window.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from typing import Sequence

import torch

from ..model import KVCache
from ..model.cache import zeros

BLOCK = 16  # tokens per block (vLLM's default)
_ROOT = b""


def block_keys(tokens: Sequence[int], block: int = BLOCK, keys: list[bytes] | None = None) -> list[bytes]:
    """The chain keys of every full block of `tokens`; `keys`, the chain of a prefix of them, is
    extended in place (a row's chain grows a block at a time)."""
    keys = [] if keys is None else keys
    parent = keys[-1] if keys else _ROOT
    for i in range(len(keys) * block, len(tokens) - block + 1, block):
        parent = _digest(parent, tokens[i:i + block])
        keys.append(parent)
    return keys


def _digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class PrefixCache:
    """A pool of `capacity` blocks of `cache`'s layers, in the cache's dtype and device; the
    pool's pages are touched only as blocks are stored."""

    def __init__(self, cache: KVCache, capacity: int, block: int = BLOCK):
        self.cache, self.block, self.capacity = cache, block, capacity
        k = cache.k[0]
        shape = (2, k.shape[1], capacity * block, k.shape[3])  # keys and values, as a row's (KV, S, D)
        self.pool = [zeros(shape, k.dtype, k.device) for _ in cache.k]
        self._slots: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> slot, LRU first
        self._sliding: dict[bytes, bool] = {}  # key -> whether its sliding layers' keys are stored
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def stored(self) -> int:
        """Blocks stored."""
        return len(self._slots)

    @property
    def free(self) -> int:
        """Blocks never used yet; stored + free == capacity, or a block was lost."""
        return len(self._free)

    # -- lookup ---------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int, chain: list[bytes] | None = None) -> tuple[int, list[int]]:
        """The longest stored prefix of tokens[:limit] that continuing after needs nothing else:
        its length and its blocks' slots (which `load` copies). Touches what it finds. chain:
        tokens[:limit]'s block keys, where the caller has them."""
        keys, slots = [], []
        parent = _ROOT
        for key in block_keys(tokens[:limit], self.block) if chain is None else chain:
            if key not in self._slots:
                break
            keys.append(key)
            parent = key
        n = len(keys) * self.block
        for size in range(min(self.block - 1, limit - n), 0, -1):  # a tail block, longest first
            key = _digest(parent + b"tail", tokens[n:n + size])
            if key in self._slots:
                keys.append(key)
                n += size
                break
        # Continuing at n reads the sliding layers' keys of the window before n, and no older.
        window = self.cache.window
        if window and n:
            first = max(0, n - window + 1) // self.block
            if not all(self._sliding[key] for key in keys[first:]):
                keys, n = [], 0
        self._touch(keys)
        slots = [self._slots[key] for key in keys]
        return n, slots

    def load(self, row: int, slots: list[int], length: int) -> None:
        """Copies the first `length` positions of the blocks `match` found into row `row` (empty):
        what each layer keeps of them (cache.fill), as slices of runs of consecutive slots."""
        runs = []  # (first slot, blocks): a chain stored at once sits in consecutive slots
        for slot in slots:
            if runs and runs[-1][0] + runs[-1][1] == slot:
                runs[-1][1] += 1
            else:
                runs.append([slot, 1])
        kv = []
        for kind, pool in zip(self.cache.kinds, self.pool):
            kv.append(self._positions(pool, runs, length - self.cache.kept(kind, length), length))
        self.cache.fill(row, kv, length)

    def _positions(self, pool: torch.Tensor, runs: list[list[int]], start: int, stop: int) -> torch.Tensor:
        """The chain's positions [start, stop) of one layer's pool: (2, KV, stop - start, D)."""
        pieces, at = [], 0  # `at`: the chain position where a run begins
        for slot, blocks in runs:
            a, b = max(start, at), min(stop, at + blocks * self.block)
            if a < b:
                pieces.append(pool.narrow(2, slot * self.block + a - at, b - a))
            at += blocks * self.block
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    # -- storing --------------------------------------------------------------------------------
    def store(self, row: int, tokens: Sequence[int], length: int, tail: bool = False,
              keys: list[bytes] | None = None) -> None:
        """Publishes the full blocks of row `row`'s first `length` tokens (`tokens`), and with
        tail=True the partial block after them too; blocks already stored are only touched.
        keys: the chain of those blocks where the caller keeps it (extended here)."""
        length = min(length, len(tokens))
        keys = block_keys(tokens[:length], self.block, keys)[:length // self.block]
        spans = [(i * self.block, (i + 1) * self.block, key) for i, key in enumerate(keys)]
        n = len(keys) * self.block
        if tail and n < length:
            spans.append((n, length, _digest((keys[-1] if keys else _ROOT) + b"tail", tokens[n:length])))
        spans = spans[:self.capacity]  # a chain longer than the pool keeps its beginning
        self._touch([key for _, _, key in spans if key in self._slots])  # not evicted for the new ones
        ring = self.cache.ring if self.cache.window else None
        for a, b, key in spans:
            # New blocks; and stored ones that lack their sliding keys, where the ring still holds them.
            if key in self._slots and (self._sliding[key] or (ring is not None and a < length - ring)):
                continue
            kv, held = self.cache.read(row, a, b)
            slot = self._slots.pop(key, None)
            slot = self._take() if slot is None else slot
            for pool, both in zip(self.pool, kv):
                pool[:, :, slot * self.block:slot * self.block + b - a] = both
            self._slots[key] = slot
            self._sliding[key] = held
        self._touch([key for _, _, key in spans])

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the chain's first block ends up the most recently used
            self._slots.move_to_end(key)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        key, slot = self._slots.popitem(last=False)  # the least recently used
        del self._sliding[key]
        return slot
