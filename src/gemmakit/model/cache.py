"""A preallocated key/value cache, one slot per batch row, that any row can fill at its own pace.

Global layers keep `max_len` positions. Sliding-window layers keep a ring buffer, so their memory
does not grow with the conversation: position p lives in slot p % ring. Each kind of layer has a
table of the absolute position held by every slot (-1: empty); the model masks attention with it,
so rows of different lengths, a ring that has wrapped, and a row that was reset all need no
special case. Attention reads only the slots up to the highest position written so far (all rows
together), so a short sequence in a long cache does not pay for the empty tail.
"""

from __future__ import annotations

import copy
import mmap
from typing import Sequence

import torch

from ..config import GemmaConfig, LayerKind


SPAN_STEP = 16


class KVCache:
    def __init__(self, config: GemmaConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", ring: bool = True):
        """ring=False: sliding layers keep every position too (the mask applies the window), so
        that any prefix can be resumed, at the memory of a full cache."""
        self.max_len = max_len
        self.window = window = config.sliding_window
        # A chunk of T new tokens overwrites ring slots before its earliest query has read them
        # unless ring >= window + T - 1; a ring of 2 * window admits chunks of window + 1 tokens.
        self.ring = min(max_len, 2 * window) if window and ring else max_len
        self.max_chunk = max_len if self.ring == max_len else self.ring - window + 1
        self.kinds = config.layer_kinds  # each layer's
        shape = lambda kind: (batch_size, config.n_kv_heads, self.length(kind), config.head_dim)  # noqa: E731
        self.k = [zeros(shape(kind), dtype, device) for kind in self.kinds]
        self.v = [zeros(shape(kind), dtype, device) for kind in self.kinds]
        self.pos = {kind: torch.full((batch_size, self.length(kind)), -1, dtype=torch.long, device=device)
                    for kind in dict.fromkeys(self.kinds)}
        self.rows = torch.arange(batch_size, device=device)[:, None]
        self._extent = [0]  # 1 + the highest position written (a view has its own)
        self._reserved = False

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]

    def length(self, kind: LayerKind) -> int:
        """Slots per row of a layer of this kind: the ring's for sliding layers."""
        return self.ring if kind is LayerKind.SLIDING else self.max_len

    def span(self, kind: LayerKind) -> int:
        """How many slots attention reads: the used ones (slots fill from 0 until the ring wraps)."""
        # sym_min: under export the extent is a symbol, which a plain min() would pin to one side
        return torch.sym_min(self.length(kind), self._extent[0])

    def positions(self, kind: LayerKind) -> torch.Tensor:
        return self.pos[kind][:self.rows.shape[0], :self.span(kind)]  # (B, S)

    def reserve(self, end: int) -> KVCache:
        """Vouches that the next forward pass writes only positions below `end`, so that `record`
        need not read the positions back from the tensor: that read waits for the device and splits
        a compiled decode step into several graphs. Returns self."""
        self._extend(end)
        self._reserved = True
        return self

    def _extend(self, end: int) -> None:
        if end > self.max_len:
            raise IndexError(f"position {end - 1} is beyond the cache ({self.max_len})")
        # Attention reads whole multiples of SPAN_STEP slots: torch's CPU attention sums a row the
        # same way over any such span with the tail masked, not over others, so a row's result
        # does not depend on the longest row beside it (issue 18).
        self._extent[0] = max(self._extent[0], min(self.max_len, -(-end // SPAN_STEP) * SPAN_STEP))

    def record(self, positions: torch.Tensor) -> dict[LayerKind, torch.Tensor]:
        """Claims the slots for new tokens at `positions` (B, T); returns the slots per layer kind."""
        if positions.shape[1] > self.max_chunk:  # the ring would overwrite keys this chunk still reads
            raise ValueError(f"a chunk of {positions.shape[1]} tokens is longer than the cache's max_chunk {self.max_chunk}")
        if self._reserved:
            self._reserved = False  # the promise covers one forward pass
        else:
            self._extend(int(positions.max()) + 1)
        slots = {}
        for kind, table in self.pos.items():
            slots[kind] = positions % table.shape[1]
            table[self.rows, slots[kind]] = positions
        return slots

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, T, KV, D) go into their slots; returns this layer's whole cache (B, KV, S, D)."""
        kind = self.kinds[layer]
        self.k[layer][self.rows, :, slots[kind]] = k.to(self.k[layer].dtype)  # the cache may be narrower
        self.v[layer][self.rows, :, slots[kind]] = v.to(self.v[layer].dtype)
        B, n = self.rows.shape[0], self.span(kind)
        return self.k[layer][:B, :, :n], self.v[layer][:B, :, :n]

    def reset(self, rows=None) -> None:
        """Forgets the given rows (all by default); their slots are free for a new sequence."""
        for table in self.pos.values():
            table[slice(None) if rows is None else rows] = -1

    def truncate(self, row: int, length: int) -> None:
        """Forgets row `row`'s positions from `length` on, so that it continues from there.

        Sliding layers keep only the last `ring` positions: the caller must not continue before
        `resumable(...)` allows (earlier keys in the window may have been overwritten).
        """
        for table in self.pos.values():
            table[row].masked_fill_(table[row] >= length, -1)

    def resumable(self, written: int, length: int) -> bool:
        """Whether a row that holds positions [0, written) can continue at position `length`."""
        window = self.window or self.max_len
        # Position p survives in the ring while p >= written - ring; the next query needs p >= length - window + 1.
        return length <= written and max(0, length - window + 1) >= written - self.ring

    def reusable(self, held: Sequence[int], written: int, prompt: Sequence[int]) -> int:
        """How many of `prompt`'s first tokens a row can keep (then `truncate` to) that holds the
        keys of `held` from position 0 and has written positions [0, written): their common prefix,
        short of the prompt's last token (always fed, for its logits), or 0 where the sliding ring
        no longer holds what continuing there needs. The engine's slots and the evaluation scorer
        both reuse prefixes by this rule."""
        n, limit = 0, min(len(held), len(prompt) - 1)
        while n < limit and held[n] == prompt[n]:
            n += 1
        return n if n and self.resumable(written, n) else 0

    def swap(self, i: int, j: int, length: int | None = None) -> None:
        """Exchanges the contents of rows i and j (keys, values and positions); length: neither
        row holds a position at or beyond it, so only the slots below it are copied."""
        if i != j:
            for t in self._tensors(length):
                t[[i, j]] = t[[j, i]]

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `dst` takes row `src`'s contents, which hold no position at or beyond `length`
        (only those slots are copied); `src` is left empty."""
        if src != dst:
            self.reset(dst)
            for t in self._tensors(length):
                t[dst] = t[src]
            self.reset(src)

    def copy_row(self, src: int, dst: slice) -> None:
        """Rows `dst` take row `src`'s contents (keys, values and positions): K continuations of
        one context, each in its own row."""
        for t in self._tensors():
            t[dst] = t[src:src + 1]

    def read(self, row: int, start: int, stop: int) -> tuple[list[torch.Tensor], bool]:
        """Row `row`'s keys and values at positions [start, stop): per layer a (2, KV, n, D) copy,
        and whether the sliding layers' ring still holds them all (True without sliding layers),
        for a store that keeps them past this row's life (runtime/prefixes.py)."""
        kv = []
        for kind, k, v in zip(self.kinds, self.k, self.v):
            both = [torch.stack((k[row, :, a:a + m], v[row, :, a:a + m])) for a, _, m in self._slots(kind, start, stop)]
            kv.append(both[0] if len(both) == 1 else torch.cat(both, dim=2))
        held = True
        if LayerKind.SLIDING in self.pos:
            slots = torch.arange(start, stop, device=self.rows.device)
            held = bool((self.pos[LayerKind.SLIDING][row, slots % self.ring] == slots).all())
        return kv, held

    def kept(self, kind: LayerKind, length: int) -> int:
        """How many of positions [0, length) `fill` takes for a layer of this kind: all for a
        global layer, the window's worth for a sliding one (continuing at `length` reads no older)."""
        return min(length, self.window - 1 if kind is LayerKind.SLIDING else length)

    def fill(self, row: int, kv: Sequence[torch.Tensor], length: int) -> None:
        """Row `row` (empty) takes the keys and values of positions [0, length): per layer a
        (2, KV, n, D) tensor of the last n = kept(kind, length) of them."""
        for kind, k, v, both in zip(self.kinds, self.k, self.v, kv):
            for slot, at, n in self._slots(kind, length - self.kept(kind, length), length):
                k[row, :, slot:slot + n] = both[0, :, at:at + n]
                v[row, :, slot:slot + n] = both[1, :, at:at + n]
        for kind, table in self.pos.items():
            start = length - self.kept(kind, length)
            for slot, at, n in self._slots(kind, start, length):
                table[row, slot:slot + n] = torch.arange(start + at, start + at + n, device=table.device)
        self._extend(length)

    def _slots(self, kind: LayerKind, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Where positions [start, stop) (at most a row's slots of this kind) live in a row:
        (first slot, offset among those positions, count) runs, two where a ring wraps."""
        size, n = self.length(kind), stop - start
        first = start % size
        head = min(n, size - first)
        return [(first, 0, head)] + ([(0, head, n - head)] if head < n else [])

    def row_view(self, row: int) -> KVCache:
        """A cache of batch size 1 that shares row `row`'s storage (for prefilling rows one by one)."""
        return self.rows_view(row, row + 1)

    def rows_view(self, start: int, stop: int) -> KVCache:
        """A cache of rows [start, stop) that shares their storage (for decoding the active rows),
        with an extent of its own: a forward through it writes positions past every one its rows
        hold (the next token, the next chunk), so its attention reads only as far as that, and a
        long row elsewhere (a prompt being prefilled, a finished one) costs it nothing."""
        view = copy.copy(self)
        view._extent = [0]
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.pos = {kind: t[start:stop] for kind, t in self.pos.items()}
        view.rows = self.rows[:stop - start]
        return view

    def over(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], pos: dict[LayerKind, torch.Tensor],
             rows: int, extent) -> KVCache:
        """This cache's layout over other tensors of its shapes, their first `rows` rows in use,
        reading exactly `extent` positions and vouching for the next forward as `reserve` does: for
        a step traced with the cache's tensors as its own buffers, where `rows` and the extent are
        symbols. The tensors are whole, not sliced to the rows: a traced write into a slice of a
        buffer becomes a copy of the whole buffer (slice_scatter), every step; into the buffer
        itself, by row index, it stays a write of the new keys and values."""
        view = copy.copy(self)
        view.k, view.v, view.pos = list(k), list(v), dict(pos)
        view.rows = torch.arange(rows, device=view.k[0].device)[:, None]
        view._extent = [extent]
        view._reserved = True
        return view

    def _tensors(self, length: int | None = None) -> list[torch.Tensor]:
        """Every tensor of the cache, or views of each row's slots below `length` (a ring whole
        once length reaches it: its slots are positions modulo the ring)."""
        if length is None:
            return [*self.k, *self.v, *self.pos.values()]
        cut = lambda t, axis: t.narrow(axis, 0, min(length, t.shape[axis]))  # noqa: E731
        return [*(cut(t, 2) for t in self.k + self.v), *(cut(t, 1) for t in self.pos.values())]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def zeros(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A zero tensor whose memory, on the CPU, is taken from the OS page by page as it is written:
    a cache of 16 rows of 32k positions costs what its rows hold, not gigabytes up front.
    (Keys must start as numbers, not garbage: a NaN behind a mask still poisons attention.)"""
    count = torch.Size(shape).numel()
    if torch.device(device).type != "cpu" or not count:
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, count * dtype.itemsize)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # 2 MiB pages where the OS offers them: 512x fewer faults as rows fill
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)
