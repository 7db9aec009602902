"""Attention masks, one per layer kind (config.LayerKind), from absolute positions.

Masks are built from the positions of the queries and of the keys a layer reads, never from
slot indices, so ragged rows, a sliding-window ring that has wrapped and a reused prefix need no
special case: a key is seen when it exists (position >= 0), is not in the query's future and,
in sliding layers, is within the window. Rows that pack several documents (training) give each
token a segment id; a key is then seen only from its own segment, so the mask is block-diagonal.
"""

from __future__ import annotations

import torch

from ..config import LayerKind


def attention_mask(kind: LayerKind, q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None,
                   groups: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """q_pos (B, T) and kv_pos (B, S) (-1: an empty slot) -> bool (B, 1, groups*T, S), True where
    a query may attend: the grouped query heads of one K/V head are folded into the query axis
    (see gemma.Attention), so the mask repeats `groups` times along it.

    segments (B, T), without a cache (the keys are the queries, S = T): the document of each
    token; positions restart in each, so they are compared only within one."""
    q = q_pos[:, :, None]  # (B, T, 1)
    k = kv_pos[:, None, :]  # (B, 1, S)
    mask = (k >= 0) & (k <= q)  # (B, T, S)
    if kind is LayerKind.SLIDING:
        mask &= q - k < window  # a token sees itself and the window - 1 tokens before it
    if segments is not None:
        mask &= segments[:, :, None] == segments[:, None, :]
    return mask[:, None].repeat(1, 1, groups, 1)  # (B, 1, G*T, S)
