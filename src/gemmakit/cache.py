"""A preallocated key/value cache, one slot per batch row, that any row can fill at its own pace.

Global layers keep `max_len` positions. Sliding-window layers keep a ring buffer, so their memory
does not grow with the conversation: position p lives in slot p % ring. Each kind of layer has a
table of the absolute position held by every slot (-1: empty); the model masks attention with it,
so rows of different lengths, a ring that has wrapped, and a row that was reset all need no
special case.
"""

from __future__ import annotations

import torch

from .config import GemmaConfig


class KVCache:
    def __init__(self, config: GemmaConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.max_len = max_len
        window = config.sliding_window
        # A chunk of T new tokens overwrites ring slots before its earliest query has read them
        # unless ring >= window + T - 1; a ring of 2 * window admits chunks of window + 1 tokens.
        self.ring = min(max_len, 2 * window) if window else max_len
        self.max_chunk = max_len if self.ring == max_len else self.ring - window + 1
        self.sliding = [config.is_sliding(i) for i in range(config.n_layers)]
        shape = lambda s: (batch_size, config.n_kv_heads, self.length(s), config.head_dim)  # noqa: E731
        self.k = [torch.zeros(shape(s), dtype=dtype, device=device) for s in self.sliding]
        self.v = [torch.zeros(shape(s), dtype=dtype, device=device) for s in self.sliding]
        self.pos = {s: torch.full((batch_size, self.length(s)), -1, dtype=torch.long, device=device)
                    for s in set(self.sliding)}
        self.rows = torch.arange(batch_size, device=device)[:, None]

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]

    def length(self, sliding: bool) -> int:
        return self.ring if sliding else self.max_len

    def positions(self, sliding: bool) -> torch.Tensor:
        return self.pos[sliding]  # (B, S)

    def record(self, positions: torch.Tensor) -> dict[bool, torch.Tensor]:
        """Claims the slots for new tokens at `positions` (B, T); returns the slots per layer kind."""
        if int(positions.max()) >= self.max_len:
            raise IndexError(f"position {int(positions.max())} is beyond the cache ({self.max_len})")
        slots = {}
        for sliding, table in self.pos.items():
            slots[sliding] = positions % table.shape[1]
            table[self.rows, slots[sliding]] = positions
        return slots

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, T, KV, D) go into their slots; returns this layer's whole cache (B, KV, S, D)."""
        s = slots[self.sliding[layer]]
        self.k[layer][self.rows, :, s] = k
        self.v[layer][self.rows, :, s] = v
        return self.k[layer], self.v[layer]

    def reset(self, rows=None) -> None:
        """Forgets the given rows (all by default); their slots are free for a new sequence."""
        for table in self.pos.values():
            table[slice(None) if rows is None else rows] = -1

    def row_view(self, row: int) -> KVCache:
        """A cache of batch size 1 that shares row `row`'s storage (for prefilling rows one by one)."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.k = [t[row:row + 1] for t in self.k]
        view.v = [t[row:row + 1] for t in self.v]
        view.pos = {s: t[row:row + 1] for s, t in self.pos.items()}
        view.rows = self.rows[:1]
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
