"""WebDataset training-shard format (version ``SHARD_FORMAT_VERSION``).

Layout of one shard set (one per (budget, policy)) under the output directory::

    {budget}-{policy}/shard-000000.tar         a POSIX (pax) tar of samples
    {budget}-{policy}/shard-000000.done.json   its completion record (written after the tar)
    {budget}-{policy}/index.json               the shard-set index (written last)

A shard counts as done only when its completion record exists and names the tar's size and
SHA-256; a shard set is complete only when ``index.json`` exists. Readers should list
shards from ``index.json``, never by globbing (a crashed run may leave partial tars).

One sample = four tar members named ``{key}.{member}``, in this (sorted) order:

- ``alloc.npy``  — ``(S,) int16`` tokens kept per segment (npy, no pickle);
- ``meta.json``  — ``SampleMeta`` fields (ids, question, options, answer, budget, policy,
  pack mode, cache fingerprint, format version, sizes, and ``prompt_template`` /
  ``query_text``: the template and the rendered prompt the compressor read, from the cache
  entry — the LLM stage answers that same text; null for entries that did not record them;
  ``metadata``: the video's manifest metadata, ``{}`` when absent; readers treat all three
  as optional);
- ``times.json`` — ``{"timestamp_texts": [S str], "timestamps_s": [S float],
  "offsets": [S+1 int]}``; segment i's tokens are ``tokens[offsets[i]:offsets[i+1]]``,
  preceded by ``timestamp_texts[i]`` in the LLM prompt;
- ``tokens.npy`` — ``(T, D) float16`` packed tokens, T = sum(alloc) (npy, no pickle).

Sample key rule (``sample_key``): ``sanitize_key(video_id) + "~~" + sanitize_key(query_id)``.
``sanitize_key`` output contains only ``[A-Za-z0-9_-~]``, never two ``~`` in a row and never
ends in ``~``, so the key is dot-free (WebDataset cuts keys at the first dot), slash-free,
and the first ``~~`` separates the two parts: distinct (video, query) pairs get distinct keys.
Keys are unique within a shard set (one sample per (video, query) per set).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tempo_ops.errors import ShardFormatError
from tempo_ops.keys import sanitize_key

SHARD_FORMAT_VERSION = 1
INDEX_KIND = "tempo-shard-set"
INDEX_NAME = "index.json"
KEY_SEPARATOR = "~~"
MEMBER_ALLOC = "alloc.npy"
MEMBER_META = "meta.json"
MEMBER_TIMES = "times.json"
MEMBER_TOKENS = "tokens.npy"
MEMBERS: tuple[str, ...] = (MEMBER_ALLOC, MEMBER_META, MEMBER_TIMES, MEMBER_TOKENS)  # sorted
ALLOC_DTYPE = np.int16
TOKENS_DTYPE = np.float16


def sample_key(video_id: str, query_id: str) -> str:
    """The WebDataset key of the (video, query) sample; see the module docstring."""
    return f"{sanitize_key(video_id)}{KEY_SEPARATOR}{sanitize_key(query_id)}"


def shard_set_name(budget: int, policy: str) -> str:
    """Directory name of the shard set for ``budget`` tokens and ``policy``: ``"{budget}-{policy}"``."""
    return f"{int(budget)}-{sanitize_key(policy)}"


def shard_name(n: int) -> str:
    """File name of shard ``n``: ``shard-{n:06d}.tar``."""
    return f"shard-{n:06d}.tar"


def completion_record_name(n: int) -> str:
    """File name of shard ``n``'s completion record: ``shard-{n:06d}.done.json``."""
    return f"shard-{n:06d}.done.json"


@dataclass(frozen=True)
class SampleMeta:
    """Contents of ``meta.json``; ``format_version`` is checked by ``decode_sample``."""

    key: str
    video_id: str
    query_id: str
    question: str
    options: list[str] | None
    answer: str | None
    budget: int
    policy: str
    pack_mode: str
    n_segments: int
    n_tokens: int
    dim: int
    cache_fingerprint: Any = None
    format_version: int = SHARD_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    prompt_template: str | None = None
    query_text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def canonical_json(doc: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, compact, UTF-8)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` serialised as .npy (no pickle); same array → same bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, *, what: str) -> np.ndarray:
    """Parse .npy bytes without pickle; ``ShardFormatError`` naming ``what`` if unreadable."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ShardFormatError(f"not a readable .npy member: {exc}", item=what) from exc


def encode_sample(
    meta: SampleMeta,
    tokens: np.ndarray,
    allocation: np.ndarray,
    offsets: np.ndarray,
    timestamp_texts: list[str],
    timestamps_s: list[float],
) -> dict[str, bytes]:
    """The four members of one sample, ``{member name: bytes}`` (names without the key).

    ``tokens`` ``(T, D)`` (stored float16), ``allocation`` ``(S,)`` (stored int16),
    ``offsets`` ``(S+1,)``; raises ``ShardFormatError`` when they are inconsistent.
    """
    alloc = np.asarray(allocation)
    if alloc.size and (alloc.min() < 0 or alloc.max() > np.iinfo(ALLOC_DTYPE).max):
        raise ShardFormatError("allocation values do not fit int16", item=meta.key)
    if tokens.ndim != 2 or tokens.shape[0] != int(alloc.sum()):
        raise ShardFormatError(f"tokens shape {tokens.shape} does not match sum(allocation)={int(alloc.sum())}", item=meta.key)
    if len(offsets) != alloc.size + 1 or len(timestamp_texts) != alloc.size or len(timestamps_s) != alloc.size:
        raise ShardFormatError("offsets / timestamps do not match the number of segments", item=meta.key)
    times = {
        "timestamp_texts": list(timestamp_texts),
        "timestamps_s": [float(t) for t in timestamps_s],
        "offsets": [int(o) for o in offsets],
    }
    return {
        MEMBER_ALLOC: npy_bytes(alloc.astype(ALLOC_DTYPE)),
        MEMBER_META: canonical_json(meta.to_dict()),
        MEMBER_TIMES: canonical_json(times),
        MEMBER_TOKENS: npy_bytes(np.asarray(tokens).astype(TOKENS_DTYPE, copy=False)),
    }


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw WebDataset sample (``{"__key__": ..., "tokens.npy": bytes, ...}``).

    Returns ``{"__key__", "tokens" (T, D) float16, "alloc" (S,) int16, "offsets" (S+1,) int64,
    "timestamp_texts", "timestamps_s", "meta" dict}`` (plus ``"__url__"`` when present).
    Raises ``ShardFormatError`` for a missing member or another format version.
    """
    key = str(sample.get("__key__", "?"))
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise ShardFormatError(f"sample lacks members {missing}", item=key)
    try:
        meta = json.loads(sample[MEMBER_META])
        times = json.loads(sample[MEMBER_TIMES])
    except (ValueError, TypeError) as exc:
        raise ShardFormatError(f"unreadable JSON member: {exc}", item=key) from exc
    version = meta.get("format_version")
    if version != SHARD_FORMAT_VERSION:
        raise ShardFormatError(f"sample format version {version!r}, this code reads {SHARD_FORMAT_VERSION}", item=key)
    tokens = load_npy(sample[MEMBER_TOKENS], what=f"{key}.{MEMBER_TOKENS}")
    alloc = load_npy(sample[MEMBER_ALLOC], what=f"{key}.{MEMBER_ALLOC}")
    if tokens.dtype != TOKENS_DTYPE or alloc.dtype != ALLOC_DTYPE or tokens.ndim != 2 or alloc.ndim != 1:
        raise ShardFormatError(f"unexpected member dtypes/shapes {tokens.dtype}{tokens.shape}, {alloc.dtype}{alloc.shape}", item=key)
    if tokens.shape[0] != int(alloc.astype(np.int64).sum()):
        raise ShardFormatError("tokens rows do not match sum(alloc)", item=key)
    out = {
        "__key__": key,
        "tokens": tokens,
        "alloc": alloc,
        "offsets": np.asarray(times["offsets"], dtype=np.int64),
        "timestamp_texts": list(times["timestamp_texts"]),
        "timestamps_s": list(times["timestamps_s"]),
        "meta": meta,
    }
    if "__url__" in sample:
        out["__url__"] = sample["__url__"]
    return out


def check_index(doc: Any, *, item: str = INDEX_NAME) -> dict[str, Any]:
    """Validate a shard-set index document; returns it or raises ``ShardFormatError``.

    Index fields: ``kind`` ("tempo-shard-set"), ``format_version``, ``budget``, ``policy``,
    ``pack_mode``, ``cache_fingerprint``, ``plan_sha256`` (digest of the planned sample keys
    per shard), ``total_samples``, ``total_bytes``, ``shards``: list of ``{"name", "samples",
    "bytes", "sha256"}`` in shard order, ``stats`` (allocation statistics).
    """
    if not isinstance(doc, dict) or doc.get("kind") != INDEX_KIND:
        raise ShardFormatError("not a Tempo shard-set index", item=item)
    if doc.get("format_version") != SHARD_FORMAT_VERSION:
        raise ShardFormatError(
            f"index format version {doc.get('format_version')!r}, this code reads {SHARD_FORMAT_VERSION}", item=item
        )
    shards = doc.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise ShardFormatError("index has no valid 'shards' list", item=item)
    return doc
