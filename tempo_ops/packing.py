"""Packing: turn an allocation into the LLM stage's token sequence for one (video, query).

Segment ``i`` keeps ``k_i`` of its ``K`` cached candidate tokens — the first ``k_i`` for
``mode="head"`` (the reference: memory tokens are front-loaded), the last ``k_i`` for
``mode="tail"`` — and segments are concatenated in time order. Only the token rows that are
kept are read from the cache (``EntryReader.read_token_ranges``): one ``(start, stop)``
range per segment over its ``K`` candidates; segments with ``k_i = 0`` get the empty range
``(0, 0)``, which reads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tempo_ops.errors import PackingError
from tempo_ops.video import format_timestamp  # the one renderer of "<t seconds>"

PACK_MODES: tuple[str, ...] = ("head", "tail")


class TokenSource(Protocol):
    """What ``pack`` needs from a cache entry (``tempo_ops.store.EntryReader`` provides it)."""

    n_segments: int
    K: int
    D: int

    def read_token_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Packed:
    """The packed visual sequence of one (video, query).

    Attributes:
        tokens: ``(T, D) float16``, T = sum(allocation), segments in time order.
        offsets: ``(S + 1,) int64``; segment i's tokens are ``tokens[offsets[i]:offsets[i+1]]``.
        timestamp_texts: S strings ``"<{t:.1f} seconds>"`` that precede each segment's tokens.
        allocation: ``(S,) int64``, tokens kept per segment.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    timestamp_texts: list[str]
    allocation: np.ndarray


def token_ranges(allocation: np.ndarray, K: int, mode: str = "head") -> list[tuple[int, int]]:
    """One ``(start, stop)`` candidate range per segment (``stop - start = k_i``; ``(0, 0)`` when k_i = 0)."""
    k = np.asarray(allocation, dtype=np.int64)
    if mode == "head":
        starts = np.zeros_like(k)
    else:
        starts = np.where(k > 0, K - k, 0)
    return list(zip(starts.tolist(), (starts + k).tolist()))


def pack(entry_reader: TokenSource, allocation: Any, timestamps: Sequence[Any], *, mode: str = "head") -> Packed:
    """Select and concatenate the kept candidates of one entry.

    Args:
        entry_reader: a cache entry (``n_segments`` S, ``K``, ``D``, ``read_token_ranges``).
        allocation: ``(S,)`` integer tokens per segment, each in ``[0, K]``.
        timestamps: S segment centre times in seconds (floats, rendered with
            ``format_timestamp``) or S ready timestamp texts (str).
        mode: ``"head"`` keeps the first k_i candidates, ``"tail"`` the last k_i.

    Returns a ``Packed``; raises ``PackingError`` when the inputs do not fit the entry.
    """
    item = f"{getattr(entry_reader, 'video_id', '?')}/{getattr(entry_reader, 'query_id', '?')}"
    if mode not in PACK_MODES:
        raise PackingError(f"unknown pack mode {mode!r}; expected one of {PACK_MODES}", item=item)
    k = np.asarray(allocation)
    if k.ndim != 1 or not (k.size == 0 or np.issubdtype(k.dtype, np.integer)):
        raise PackingError(f"allocation must be a 1-D integer array, got {k.dtype} {k.shape}", item=item)
    k = k.astype(np.int64)
    S, K, D = int(entry_reader.n_segments), int(entry_reader.K), int(entry_reader.D)
    if k.size != S:
        raise PackingError(f"allocation has {k.size} segments, the entry has {S}", item=item)
    if k.size and (k.min() < 0 or k.max() > K):
        raise PackingError(f"allocation values must be in [0, {K}], got [{k.min()}, {k.max()}]", item=item)
    if len(timestamps) != S:
        raise PackingError(f"{len(timestamps)} timestamps for {S} segments", item=item)
    texts = [t if isinstance(t, str) else format_timestamp(float(t)) for t in timestamps]

    offsets = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(k, out=offsets[1:])
    total = int(offsets[-1])
    tokens = np.empty((total, D), dtype=np.float16)
    ranges = token_ranges(k, K, mode)
    if total:
        blocks = entry_reader.read_token_ranges(ranges)
        if len(blocks) != len(ranges):
            raise PackingError(f"reader returned {len(blocks)} blocks for {len(ranges)} ranges", item=item)
        pos = 0
        for (start, stop), block in zip(ranges, blocks):
            n = stop - start
            if block.shape != (n, D):
                raise PackingError(f"reader returned shape {block.shape} for range ({start}, {stop})", item=item)
            tokens[pos : pos + n] = block
            pos += n
    return Packed(tokens=tokens, offsets=offsets, timestamp_texts=texts, allocation=k)
