"""Greedy cutting of an ordered sequence into consecutive chunks under a cost cap."""

from __future__ import annotations

from collections.abc import Sequence


def consecutive_chunks(costs: Sequence[int], cap: int) -> list[list[int]]:
    """Indices of ``costs`` in order, cut into consecutive chunks whose summed cost is ≤ ``cap``.

    A new chunk starts when the next item would push the current one over ``cap``; an item
    costlier than ``cap`` alone gets a chunk of its own. Used to batch model inputs by token
    cost and to assign samples to shards by bytes. Deterministic.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, cost in enumerate(costs):
        if current and total + cost > cap:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += cost
    if current:
        chunks.append(current)
    return chunks
