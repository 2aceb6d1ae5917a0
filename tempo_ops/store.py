"""The Zarr v3 token cache: ``CacheWriter``, ``CacheReader``, ``EntryReader``, ``cache_summary``.

Layout and attribute names: ``schemas/cache_layout.py`` / ``schemas/CACHE_LAYOUT.md``.

Write protocol (compression job)::

    w = CacheWriter.open(url, config)              # driver, once: creates root / checks fingerprint
    w.write_video(video_id, meta)                  # one worker per video
    if w.begin_entry(video_id, query_id, text, S, prompt_template=t, video_identity=ident):
        v = w.pending_version(video_id, query_id)  # False above: complete from the same inputs, skip
        w.write_block(video_id, query_id, seg_start, cand (n, K, D), rel (n,), version=v)  # units in
        ...                                        #   parallel, seg_start % w.segments_per_shard == 0
        w.finalize_entry(video_id, query_id, version=v)  # one worker: verify, then switch the pointer

Every write is a whole-object put (retried on transient errors, so idempotent); each
candidates shard and relevance chunk belongs to exactly one work unit. Layout v2 writes each
computation into its own version subgroup and makes it current with one put of the entry's
``zarr.json`` (which records that version's inputs): readers see the old complete version or
the new one, never a mix and never neither. Every read verifies crc32c checksums and raises
``CacheCorrupt`` naming the entry and the chunk. Layout v1 caches are read as before.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import tempo_ops
import tempo_ops.fs as fs_mod  # fs_mod.put_local_files: the one local write primitive (tests inject faults there)
from schemas import cache_layout as L
from tempo_ops.errors import (
    CacheCorrupt,
    CacheLayoutError,
    CacheNotWritable,
    EntryIncomplete,
    EntryInputsMismatch,
    EntryNotFound,
    FingerprintMismatch,
    Float16Overflow,
    InvalidCacheBlock,
    InvalidTokenRange,
)
from tempo_ops.fs import (
    DEFAULT_RETRY,
    RangeByteRequest,
    RetryPolicy,
    SuffixByteRequest,
    local_root,
    open_store,
    retry_call,
)
from tempo_ops.query_text import DEFAULT_TEMPLATE, TEMPLATES, render_query
from tempo_ops.store_shard import EMPTY as L_EMPTY
from tempo_ops.store_shard import (
    ShardEncoder,
    check_shard,
    chunk_crc_ok,
    chunk_rows_crc_ok,
    crc32c_bytes,
    decode_index,
    encode_shard,
    merge_pieces,
    plan_segment,
    thread_piece_ring,
)
from tempo_ops.torch_threads import this_thread_torch_threads

_PROTO = default_buffer_prototype()
_MAX_CONCURRENCY = 64


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


async def _get_bytes(store: Any, key: str, byte_range: Any = None) -> bytes | None:
    buf = await store.get(key, _PROTO, byte_range)
    return None if buf is None else buf.to_bytes()


async def _get_array(store: Any, key: str, byte_range: Any = None) -> np.ndarray | None:
    """Like ``_get_bytes`` but the store's buffer as a 1-D uint8 array, not copied (chunk data)."""
    buf = await store.get(key, _PROTO, byte_range)
    return None if buf is None else buf.as_numpy_array().reshape(-1).view(np.uint8)


async def _get_json(store: Any, key: str) -> dict[str, Any] | None:
    """A node's ``zarr.json`` as a dict; None when absent or unparseable (a partial write)."""
    raw = await _get_bytes(store, key)
    if raw is None:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


async def _get_attrs(store: Any, node_path: str) -> dict[str, Any] | None:
    doc = await _get_json(store, L.metadata_key(node_path))
    if doc is None:
        return None
    attrs = doc.get("attributes")
    return attrs if isinstance(attrs, dict) else {}


async def _put_bytes(store: Any, key: str, data: bytes | np.ndarray) -> None:
    """Put one whole object (``data``: bytes or a 1-D uint8 array, not copied)."""
    await store.set(key, _PROTO.buffer.from_bytes(data))


async def _put_group(store: Any, node_path: str, attrs: dict[str, Any]) -> None:
    """Write a Zarr v3 group's ``zarr.json`` in one put (atomic replace on every backend we use)."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    await _put_bytes(store, L.metadata_key(node_path), json.dumps(doc, indent=1, allow_nan=False).encode("utf-8"))


async def _gather_limited(coros: Sequence[Any], limit: int = _MAX_CONCURRENCY) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def _list_children(store: Any, prefix: str) -> list[str]:
    """Child node names under ``prefix/`` (sanitised keys never contain dots; skips zarr.json and temp files)."""
    names = [name async for name in store.list_dir(prefix)]
    return sorted({n.rstrip("/") for n in names if n and "." not in n.rstrip("/")})


def _segment_ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a bool (S,) mask as [(start, stop)]."""
    idx = np.flatnonzero(mask)
    runs: list[tuple[int, int]] = []
    for i in idx.tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


_JSON_ABSENT, _JSON_DAMAGED = "absent", "damaged"


async def _get_json_status(store: Any, key: str) -> tuple[dict[str, Any] | None, str]:
    """``(doc, "ok")``, ``(None, "absent")`` or ``(None, "damaged")`` (present but not a JSON object)."""
    raw = await _get_bytes(store, key)
    if raw is None:
        return None, _JSON_ABSENT
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, _JSON_DAMAGED
    return (doc, "ok") if isinstance(doc, dict) and isinstance(doc.get("attributes", {}), dict) else (None, _JSON_DAMAGED)


def _root_attrs(store: Any, url: str) -> dict[str, Any] | None:
    """The root's attributes; None when the root is absent; CacheLayoutError when it is damaged."""
    try:
        doc, status = sync(_get_json_status(store, L.METADATA_FILE))
    except FileNotFoundError:  # a local path that does not exist
        return None
    if status == _JSON_DAMAGED:
        raise CacheLayoutError("root zarr.json is damaged (not valid JSON); refusing to use or rewrite it", item=url)
    return None if doc is None else dict(doc.get("attributes", {}))


# Stored dtype (zarr data_type), fill value and tempo_dtype attribute of the candidates per storage form.
_FORM_DTYPE = {"float16": ("float16", float("nan"), None), "bfloat16": ("uint16", L.BF16_NAN_BITS, "bfloat16"),
               "int8": ("int8", L.INT8_MISSING, "int8_scaled")}
_NP_STORED = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "int8": np.dtype("i1")}


def open_root_for_writing(
    url: str,
    storage_options: dict[str, Any] | None,
    retry: RetryPolicy,
    cfg: dict[str, Any],
    fingerprint: str,
    *,
    create: Any,
    check: Any,
    what: str,
) -> tuple[Any, dict[str, Any]]:
    """Open the store at ``url`` for writing: create its root (``create(store) -> attrs``) when
    absent, check it (``check(attrs, url)``: layout and version) and its fingerprint.

    Shared by the token cache and the segment index. Raises CacheNotWritable, CacheLayoutError
    (a damaged root, or the checker's), or FingerprintMismatch naming the differing config fields.
    """
    try:
        store = open_store(url, storage_options, policy=retry)
        root = _root_attrs(store, url)  # CacheLayoutError when damaged: never rewrite it
    except OSError as exc:  # permission, a file in the way, read-only filesystem (transient ones were retried)
        raise CacheNotWritable(f"cannot open for writing: {exc}", item=url) from exc
    if root is None:
        root = create(store)
    root = check(root, url)
    if root[L.ROOT_FINGERPRINT] != fingerprint:
        fields = L.config_differences(root[L.ROOT_CONFIG], cfg)
        raise FingerprintMismatch(
            f"{what} was written with a different configuration; differing fields: {', '.join(fields) or '(none: fingerprint only)'}",
            item=url,
            fields=fields,
            cache_fingerprint=root[L.ROOT_FINGERPRINT],
            given_fingerprint=fingerprint,
        )
    return store, root


def create_root(url: str, store: Any, attrs: dict[str, Any], *, what: str) -> dict[str, Any]:
    """Create a hierarchy's ``videos/`` group and then its root with ``attrs`` (the root last: the
    hierarchy exists once its root does). Refuses a location that holds anything else, and one
    whose root metadata was lost while its videos remain (never recreate it with, maybe, another
    configuration)."""

    async def list_dir(prefix: str) -> list[str]:
        try:
            return sorted([n.rstrip("/") async for n in store.list_dir(prefix)])
        except FileNotFoundError:
            return []

    existing = [n for n in sync(list_dir("")) if n not in (L.VIDEOS, L.METADATA_FILE)]  # a concurrent creator's
    if existing:
        raise CacheLayoutError(f"not a {what} and not empty (holds {existing[:5]})", item=url)
    videos = [n for n in sync(list_dir(L.VIDEOS)) if n != L.METADATA_FILE]
    if videos:
        raise CacheLayoutError(
            f"root zarr.json is missing but the {what} holds videos ({videos[:3]}...); refusing to recreate "
            "the root (restore it from a backup, or write to a new location)",
            item=url,
        )

    async def create() -> None:
        await _put_group(store, L.VIDEOS, {})
        await _put_group(store, "", attrs)

    try:
        sync(create())
    except OSError as exc:
        raise CacheNotWritable(f"cannot create the {what}: {exc}", item=url) from exc
    return attrs


@functools.lru_cache(maxsize=64)
def _array_metadata(form: str, n_segments: int, k: int, d: int, p: int, c: int, channel_scaled: bool = False) -> dict[str, bytes]:
    """``zarr.json`` bytes of an entry's arrays (layout v2), as zarr itself writes them: name → bytes.

    Built in a scratch MemoryStore and copied by one put each: letting zarr create the arrays
    in the cache would also make it (re)write parent group metadata when an existence check
    fails transiently, wiping the entry's attributes. Every chunk gets a crc32c (inner codecs
    ``[bytes, crc32c]``; the shard index codecs too), float fill values are NaN.
    """
    crc = [zarr.codecs.Crc32cCodec()]
    scratch = zarr.storage.MemoryStore()
    dtype, fill, tempo_dtype = _FORM_DTYPE[form]
    zarr.create_array(
        store=scratch, name=L.CANDIDATES, shape=(n_segments, k, d), dtype=dtype, shards=(p, k, d), chunks=(1, c, d),
        compressors=crc, filters=None, fill_value=fill, dimension_names=L.CANDIDATES_DIMS,
        attributes={L.TEMPO_DTYPE_ATTR: tempo_dtype} if tempo_dtype else None,
    )
    zarr.create_array(
        store=scratch, name=L.RELEVANCE, shape=(n_segments,), dtype="float32", chunks=(p,),
        compressors=crc, filters=None, fill_value=float("nan"), dimension_names=L.RELEVANCE_DIMS,
    )
    names = [L.CANDIDATES, L.RELEVANCE]
    if form == "int8":
        zarr.create_array(
            store=scratch, name=L.SCALES, shape=(n_segments, k), dtype="float32", shards=(p, k), chunks=(1, k),
            compressors=crc, filters=None, fill_value=float("nan"), dimension_names=L.SCALES_DIMS,
        )
        names.append(L.SCALES)
    if channel_scaled:
        zarr.create_array(
            store=scratch, name=L.CHANNEL_EXPONENTS, shape=(n_segments, d), dtype="int8", shards=(p, d), chunks=(1, d),
            compressors=crc, filters=None, fill_value=L.INT8_MISSING, dimension_names=L.CHANNEL_EXPONENTS_DIMS,
        )
        names.append(L.CHANNEL_EXPONENTS)

    async def read() -> dict[str, bytes]:
        out = {}
        for name in names:
            raw = await _get_bytes(scratch, L.metadata_key(name))
            assert raw is not None
            out[name] = raw
        return out

    return sync(read())


def inputs_match(entry_attrs: dict[str, Any], inputs: dict[str, Any]) -> bool:
    """True when a complete entry was computed from ``inputs``.

    An entry migrated from layout v1 records no video identity (``"video": None``): the video
    is then not compared (v1 never recorded it), everything else is.
    """
    if entry_attrs.get(L.ENTRY_INPUTS_SHA256) == L.inputs_digest(inputs):
        return True
    stored = entry_attrs.get(L.ENTRY_INPUTS)
    return isinstance(stored, dict) and stored.get("video") is None and stored == dict(inputs, video=None)


def _torch() -> Any:
    """torch when installed (vectorised, multi-threaded conversions), else None (numpy fallback)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        return None
    return torch


# Local writes pipeline: the calling thread converts and checks pieces (its torch casts held to
# one thread), a writer thread checksums and writes up to this many pieces behind it (so a ring
# of 4 buffers of PIECE_NBYTES = 2 MiB, kept per thread: see store_shard.PieceRing). Measured
# on 2 cores, a 64 MiB float16 entry from float32, medians of 11: 33 ms, against 36 ms with
# 0.5 MiB pieces and 39 ms all in one thread (torch on both cores); with torch's two workers
# left on, the pipeline was slower than none. (Figures from before the ring; what its reused,
# huge-page memory saves since is in PieceRing's docstring.)
_WRITE_BEHIND = 3

_PASS_ELEMENTS = 1 << 18  # elements per pass of the checks and int8 quantisation below (fits in cache)


BFLOAT16_MAX = 3.3895313892515355e38  # largest finite bfloat16: (2 - 2**-7) * 2**127


def _bf16_bits_into(out: np.ndarray, x: np.ndarray) -> None:
    """Write the bfloat16 bit patterns of ``x`` into ``out`` (``<u2``, same shape, rows may be strided)."""
    torch = _torch()
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if torch is not None:  # same rounding as below, ~10x faster; converts straight into ``out``
        torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).copy_(torch.from_numpy(x32))
        return
    u = x32.view(np.uint32)
    out[...] = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)


def _f16_into(out: np.ndarray, x: np.ndarray) -> None:
    """Write ``x`` rounded to float16 into ``out`` (``<f2``, same shape, rows may be strided)."""
    torch = _torch()
    if torch is not None and x.dtype == np.float32 and x.dtype.isnative:
        # numpy's float32 → float16 cast is scalar (~8 ns a value); torch's is vectorised and rounds
        # alike (nearest even, overflow to inf, subnormals kept). Not float64: torch rounds it twice.
        torch.from_numpy(out.view(np.int16)).view(torch.float16).copy_(torch.from_numpy(np.ascontiguousarray(x)))
        return
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf; the writer checks after
        np.copyto(out, x, casting="same_kind")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values → bfloat16 bit patterns ``<u2`` (round to nearest even; exact for bf16 values)."""
    out = np.empty(np.shape(x), dtype="<u2")
    _bf16_bits_into(out, x)
    return out


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32 (exact: the bits shifted into the high half)."""
    bits = np.asarray(bits)
    torch = _torch()
    if torch is not None and bits.size:  # one vectorised pass instead of numpy's widen-then-shift (~2x faster)
        native = np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16)  # (1,) for a 0-d input
        return torch.from_numpy(native).view(torch.bfloat16).float().numpy().reshape(bits.shape)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _channel_exponents(x: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``(m, K, D)`` float32 → ``(m, D)`` int8 ``e``: per (segment, channel), ``2**e`` ≈
    ``(max_t |x| · mean_t |x|) ** (3/8)``, the geometric mean of the channel's largest and typical
    magnitude raised to 3/4 (the max alone lets one sink token set every channel's factor, the
    mean alone misses element spikes); 0 for channels that are all zero or not finite (the
    writer refuses those). ``buf``: scratch of ``x``'s shape."""
    np.abs(x, out=buf)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log2(buf.max(axis=1)) + np.log2(buf.sum(axis=1) / np.float32(x.shape[1]))
        e = np.rint(np.float32(0.375) * logs)
    return np.where(np.isfinite(e), np.clip(e, -127, 127), 0).astype(np.int8)


def _quantize_int8_into(x: np.ndarray, q: np.ndarray, *, channel_scaled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Segments ``x`` ``(n, K, D)`` float32 (C-contiguous) → int8 into ``q`` (``n`` leading, ``K·D``
    values per segment in C order, may be strided, e.g. a shard's chunks ``(n, K/C, C, D)``).

    Returns the per-token scales ``(n, K)`` float32 and, with ``channel_scaled``, the channel
    exponents ``(n, D)`` int8 (else None): ``x ≈ q · scale[..., None] · 2**e[:, None, :]``. The
    channel pre-scale divides each channel by a power of two that tracks its magnitude in the
    segment (``_channel_exponents``; exact in float32), so outlier channels no longer set every
    token's step. Segments in cache-sized passes through one reused buffer.
    """
    n, k, d = x.shape
    scale = np.empty((n, k), dtype=np.float32)
    exps = np.empty((n, d), dtype=np.int8) if channel_scaled else None
    per_pass = max(1, _PASS_ELEMENTS // max(1, k * d))
    buf = np.empty((min(per_pass, n), k, d), dtype=np.float32)
    for i in range(0, n, per_pass):
        blk = x[i : i + per_pass]
        b = buf[: len(blk)]
        if exps is not None:
            e = _channel_exponents(blk, b)
            exps[i : i + len(blk)] = e
            np.multiply(blk, np.ldexp(np.float32(1.0), -e.astype(np.int32))[:, None, :], out=b)
            blk = b
        s = (np.maximum(blk.max(axis=-1), -blk.min(axis=-1)) / np.float32(127.0)).astype(np.float32)
        scale[i : i + len(b)] = s
        with np.errstate(invalid="ignore"):  # inf/NaN tokens get a non-finite scale, which the writer refuses
            np.divide(blk, np.where(s > 0, s, np.float32(1.0))[..., None], out=b)
            np.rint(b, out=b)
            np.clip(b, -127, 127, out=b)
            q[i : i + len(b)] = b.reshape(q[i : i + len(b)].shape)
    return scale, exps


def quantize_int8(x: np.ndarray, *, channel_scaled: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Segments ``(S, K, D)`` float → (int8 values in [-127, 127], float32 scale per token ``(S, K)``,
    int8 channel exponents ``(S, D)`` or None): what the int8 form stores (``dequantize_int8`` inverts).

    ``channel_scaled=False`` is the first int8 scheme ("token", no exponents; any ``(..., D)``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if channel_scaled and x.ndim != 3:
        raise ValueError(f"channel-scaled int8 quantises segments (S, K, D), got shape {x.shape}")
    seg = x if channel_scaled else (x.reshape(-1, 1, x.shape[-1]) if x.ndim else x.reshape(1, 1, 1))
    q = np.empty(seg.shape, dtype=np.int8)
    scale, exps = _quantize_int8_into(seg, q, channel_scaled=channel_scaled)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1]), exps


def channel_factors(exponents: np.ndarray) -> np.ndarray:
    """int8 channel exponents → float32 ``2**e`` (exact)."""
    return np.ldexp(np.float32(1.0), np.asarray(exponents, dtype=np.int32)).astype(np.float32)


def _bits16_max(values: np.ndarray) -> tuple[int, int]:
    """Largest positive and largest negative 16-bit float bit pattern (float16 or bfloat16 ``<u2``).

    Two read-only reductions, no temporaries: as int16 the largest value is the largest positive
    pattern; as uint16 the largest negative one (negatives are >= 0x8000; with none it is below).
    All values are finite iff both are below the form's first non-finite pattern (float16:
    0x7C00 / 0xFC00, bfloat16: 0x7F80 / 0xFF80). ``values``: any shape, last axis contiguous.
    """
    v = values.view(np.uint16)
    return int(v.view(np.int16).max()), int(v.max())


def dequantize_int8(
    q: np.ndarray, scale: np.ndarray, exponents: np.ndarray | None = None, *, out: np.ndarray | None = None
) -> np.ndarray:
    """int8 ``(..., D)``, scales ``(...)`` [, channel exponents: ``(S, D)`` for ``q`` ``(S, K, D)``,
    or ``(D,)`` for one segment's rows ``(n, D)``] → float32 (into ``out`` when given)."""
    out = np.empty(np.shape(q), dtype=np.float32) if out is None else out
    np.multiply(q, np.asarray(scale, dtype=np.float32)[..., None], out=out)  # int8 widened inside the loop
    if exponents is not None:
        out *= channel_factors(exponents)[..., None, :]
    return out


def _deferred(make: Any, *args: Any) -> Any:
    """One piece, made when first asked for (after the pieces before it were written)."""
    yield make(*args)


class _SideArray:
    """An int8 entry's per-segment side array (one chunk of ``count`` values per segment, shards of P):
    ``scales`` (kind "s", one value per token: a token range reads its slice) or
    ``channel_exponents`` ("e", one per channel: read whole)."""

    def __init__(self, kind: str, name: str, key_of: Any, dtype: np.dtype, count: int, per_token: bool, g: _Geometry) -> None:
        self.kind, self.name, self.key_of, self.dtype, self.count, self.per_token = kind, name, key_of, dtype, count, per_token
        self.chunk_nbytes = count * dtype.itemsize + g.crc
        self.index_nbytes = L.shard_index_nbytes(g.P, 1, 1)

    def bad_values(self, values: np.ndarray) -> bool:
        """True when decoded values cannot have been written: non-finite scales, exponents = the fill."""
        return not np.isfinite(values).all() if self.per_token else bool((values == L.INT8_MISSING).any())


class _Geometry:
    """Shapes shared by writer and reader: K, D, P (segments per shard), C (token chunk), form, checksums."""

    def __init__(self, root_attrs: dict[str, Any]) -> None:
        self.K = int(root_attrs[L.ROOT_K])
        self.D = int(root_attrs[L.ROOT_D])
        self.P = int(root_attrs[L.ROOT_SEGMENTS_PER_SHARD])
        self.C = int(root_attrs[L.ROOT_TOKEN_CHUNK])
        self.version = int(root_attrs[L.ROOT_LAYOUT_VERSION])
        self.form = L.storage_form(root_attrs)
        self.checksums = self.version >= 2
        self.crc = L.CRC_NBYTES if self.checksums else 0
        self.stored = _NP_STORED[self.form]
        self.token_nbytes = self.D * self.stored.itemsize
        self.chunk_data_nbytes = self.C * self.token_nbytes
        self.chunk_nbytes = self.chunk_data_nbytes + self.crc
        self.index_nbytes = L.shard_index_nbytes(self.P, self.K, self.C)
        self.rel_chunk_nbytes = self.P * 4 + self.crc
        self.channel_scaled = L.int8_channel_scaled(root_attrs)
        sides = []
        if self.form == "int8":  # one chunk per segment beside the candidates: token scales [, channel exponents]
            sides.append(_SideArray("s", L.SCALES, L.scales_shard_key, np.dtype("<f4"), self.K, True, self))
            if self.channel_scaled:
                sides.append(_SideArray("e", L.CHANNEL_EXPONENTS, L.channel_exponents_shard_key, np.dtype("i1"), self.D, False, self))
        self.sides: list[_SideArray] = sides

    def n_shards(self, n_segments: int) -> int:
        return -(-n_segments // self.P)

    def shard_segments(self, shard: int, n_segments: int) -> int:
        return min(self.P, n_segments - shard * self.P)


def _decode_relevance_chunk(raw: bytes | None, g: _Geometry) -> np.ndarray | None:
    """(P,) float32 of one relevance chunk; None when absent, torn or failing its crc32c."""
    if raw is None or len(raw) != g.rel_chunk_nbytes or (g.checksums and not chunk_crc_ok(raw)):
        return None
    return np.frombuffer(raw, dtype="<f4", count=g.P).astype(np.float32)


def _check_writable_layout(root_attrs: dict[str, Any] | None, url: str) -> dict[str, Any]:
    """``L.check_layout``, and refuse to write into a cache of an older (read-only) layout."""
    root = L.check_layout(root_attrs, url)
    if root[L.ROOT_LAYOUT_VERSION] != L.LAYOUT_VERSION:
        raise CacheLayoutError(
            f"layout_version {root[L.ROOT_LAYOUT_VERSION]} caches are read-only for this version "
            f"(writes need layout {L.LAYOUT_VERSION}); convert with `tempo migrate {url}`",
            item=url,
        )
    return root


class CacheWriter:
    """Writes videos and (video, query) entries into a layout-v2 token cache. Picklable (reopens by URL)."""

    def __init__(self, url: str, store: Any, root_attrs: dict[str, Any], storage_options: dict[str, Any] | None):
        self.url = url
        self.store = store
        self.root_attrs = root_attrs
        self.storage_options = storage_options
        self._geo = _Geometry(root_attrs)
        self._entries: dict[tuple[str, str], tuple[int, str]] = {}  # (video_id, query_id) -> (n_segments, version)
        self._reader: CacheReader | None = None

    # ------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        url: str,
        config: dict[str, Any],
        *,
        storage_options: dict[str, Any] | None = None,
        segments_per_shard: int = L.DEFAULT_SEGMENTS_PER_SHARD,
        token_chunk: int = L.DEFAULT_TOKEN_CHUNK,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> CacheWriter:
        """Open (create if absent) the cache at ``url`` for writing with ``config``.

        A new cache stores ``config``, its fingerprint, the storage form (``config["stored_dtype"]``)
        and the geometry (``segments_per_shard``, ``token_chunk``; an existing cache keeps its
        own). An existing cache must have the same fingerprint, else FingerprintMismatch names
        the differing fields. A root ``zarr.json`` that is damaged, missing beside existing
        videos, or of layout v1 (read-only here; ``tempo migrate``) raises CacheLayoutError:
        a root is never rewritten implicitly.
        """
        cfg = L.validate_config(config)
        fingerprint = L.config_fingerprint(cfg)
        store, root = open_root_for_writing(
            url,
            storage_options,
            retry,
            cfg,
            fingerprint,
            create=lambda store: cls._create_root(url, store, cfg, fingerprint, segments_per_shard, token_chunk),
            check=_check_writable_layout,
            what="cache",
        )
        return cls(url, store, root, storage_options)

    @staticmethod
    def _create_root(
        url: str, store: Any, cfg: dict[str, Any], fingerprint: str, segments_per_shard: int, token_chunk: int
    ) -> dict[str, Any]:
        k, d = cfg["compressor"]["num_memory_tokens"], cfg["compressor"]["hidden_size"]
        if segments_per_shard < 1 or token_chunk < 1 or k % token_chunk:
            raise CacheLayoutError(
                f"segments_per_shard ({segments_per_shard}) must be >= 1 and token_chunk ({token_chunk}) must divide K={k}",
                item=url,
            )
        attrs = {
            L.ROOT_KIND: L.CACHE_KIND,
            L.ROOT_LAYOUT_VERSION: L.LAYOUT_VERSION,
            L.ROOT_FINGERPRINT: fingerprint,
            L.ROOT_CONFIG: cfg,
            L.ROOT_PACKAGE_VERSION: tempo_ops.__version__,
            L.ROOT_CREATED_AT: _now(),
            L.ROOT_SEGMENTS_PER_SHARD: segments_per_shard,
            L.ROOT_TOKEN_CHUNK: token_chunk,
            L.ROOT_K: k,
            L.ROOT_D: d,
            L.ROOT_STORAGE_FORM: cfg["stored_dtype"],
            **({L.ROOT_INT8_SCHEME: L.INT8_SCHEME} if cfg["stored_dtype"] == "int8" else {}),
        }
        return create_root(url, store, attrs, what="Tempo token cache")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen_writer, (self.url, self.root_attrs[L.ROOT_CONFIG], self.storage_options))

    # ------------------------------------------------------------ properties
    @property
    def segment_nbytes(self) -> int:
        """Stored bytes of one segment of an entry (candidates, int8 side arrays, relevance; no checksums)."""
        g = self._geo
        return L.segment_nbytes(g.form, g.K, g.D, int8_scheme="token_channel" if g.channel_scaled else "token")

    @property
    def segments_per_shard(self) -> int:
        """P: work units must start at multiples of it (one writer per shard)."""
        return self._geo.P

    @property
    def token_chunk(self) -> int:
        return self._geo.C

    @property
    def num_memory_tokens(self) -> int:
        return self._geo.K

    @property
    def hidden_size(self) -> int:
        return self._geo.D

    @property
    def storage_form(self) -> str:
        return self._geo.form

    @property
    def fingerprint(self) -> str:
        return str(self.root_attrs[L.ROOT_FINGERPRINT])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.root_attrs[L.ROOT_CONFIG])

    def reader(self) -> CacheReader:
        """A reader on the same store (for status checks before writing)."""
        if self._reader is None:
            self._reader = CacheReader(self.url, store=self.store)
        return self._reader

    # ------------------------------------------------------------ videos
    def write_video(self, video_id: str, meta: dict[str, Any]) -> None:
        """Write (or replace) a video's record: ``meta`` needs ``uri``, ``timestamps``, ``timestamp_texts``.

        Also typical: ``probe``, ``frame_indices``, ``real_fps``, ``bounds``, ``sampling``.
        """
        path = L.video_path(video_id)
        record = L.validate_video_meta(video_id, meta)
        attrs = {
            L.ROOT_KIND: L.VIDEO_KIND,
            L.VIDEO_ID: video_id,
            L.VIDEO_N_SEGMENTS: len(record["timestamps"]),
            L.VIDEO_META: record,
            L.VIDEO_WRITTEN_AT: _now(),
            L.ENTRY_PACKAGE_VERSION: tempo_ops.__version__,
        }

        async def put() -> None:
            await _put_group(self.store, path, attrs)
            await _put_group(self.store, L.queries_path(video_id), {})

        sync(put())

    # ------------------------------------------------------------ entries
    def entry_inputs(
        self, query_text: str, n_segments: int, *, prompt_template: str = DEFAULT_TEMPLATE, video_identity: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The identity record an entry computed now from these inputs would carry."""
        return L.entry_inputs(query_text, prompt_template, video_identity, self.fingerprint, n_segments)

    def entry_status(
        self,
        video_id: str,
        query_id: str,
        query_text: str,
        n_segments: int,
        *,
        prompt_template: str = DEFAULT_TEMPLATE,
        video_identity: dict[str, Any] | None = None,
        check: str = "quick",
    ) -> tuple[str, str | None]:
        """What a run with these inputs must do with an entry: ``(status, reason)``.

        status: "absent", "incomplete", "stale" (complete but computed from other inputs),
        "corrupt" (complete, same inputs, but its data fails ``check``: "quick" = metadata,
        shard indexes and relevance; "full" = every chunk's crc32c too; "none" = no data
        read) or "complete" (nothing to do).
        """
        attrs = sync(_get_attrs(self.store, L.entry_path(video_id, query_id)))
        if attrs is None:
            damaged = sync(_get_json_status(self.store, L.metadata_key(L.entry_path(video_id, query_id))))[1]
            return ("corrupt", "entry zarr.json is damaged") if damaged == _JSON_DAMAGED else ("absent", None)
        if attrs.get(L.ENTRY_COMPLETE) is not True:
            return "incomplete", None
        inputs = self.entry_inputs(query_text, n_segments, prompt_template=prompt_template, video_identity=video_identity)
        if not inputs_match(attrs, inputs):
            old = attrs.get(L.ENTRY_INPUTS) or {}
            fields = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
            return "stale", f"inputs differ: {', '.join(fields)}"
        if check == "none":
            return "complete", None
        try:
            problems = self.reader().entry(video_id, query_id).verify(full=check == "full")
        except (CacheCorrupt, EntryNotFound) as exc:
            return "corrupt", exc.reason
        if problems:
            return "corrupt", "; ".join(p["reason"] for p in problems[:3])
        return "complete", None

    def begin_entry(
        self,
        video_id: str,
        query_id: str,
        query_text: str,
        n_segments: int,
        *,
        prompt_template: str = DEFAULT_TEMPLATE,
        video_identity: dict[str, Any] | None = None,
        force: bool = False,
        resume: bool = False,
    ) -> bool:
        """Prepare a new version of the (video, query) entry for ``n_segments`` segments. False: skip.

        ``query_text`` is the text the compressor read (the query rendered under
        ``prompt_template``, a name in ``tempo_ops.query_text.TEMPLATES``).

        False when the entry is complete and was computed from the same inputs (query text,
        prompt template, video identity, fingerprint, segment count). Otherwise a fresh version
        subgroup is created (its name: ``pending_version(video_id, query_id)``) and the entry's
        current complete version, if any, stays readable until ``finalize_entry`` switches the
        pointer. With ``resume=True`` an unfinished version with the same inputs is kept so the
        blocks that landed intact (see ``missing_segments``) need not be rewritten. ``force``
        recomputes a complete entry even when its inputs match (``--force``, ``--repair``).
        """
        item = f"{video_id}/{query_id}"
        if not isinstance(query_text, str):
            raise InvalidCacheBlock("query_text must be a string", item=item)
        if not isinstance(prompt_template, str) or prompt_template not in TEMPLATES:
            raise InvalidCacheBlock(f"prompt_template must be one of {', '.join(TEMPLATES)}, got {prompt_template!r}", item=item)
        if not isinstance(n_segments, (int, np.integer)) or isinstance(n_segments, bool) or n_segments < 1:
            raise InvalidCacheBlock(f"n_segments must be a positive int, got {n_segments!r}", item=item)
        n_segments = int(n_segments)
        epath = L.entry_path(video_id, query_id)

        async def read_both() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            # one round trip to zarr's event loop (~0.3 ms each on 2 cores), not two
            got = await asyncio.gather(_get_attrs(self.store, L.video_path(video_id)), _get_attrs(self.store, epath))
            return got[0], got[1]

        video, current = sync(read_both())
        if video is None:
            raise EntryNotFound("video not written yet (call write_video first)", item=video_id)
        if video.get(L.VIDEO_N_SEGMENTS) != n_segments:
            raise InvalidCacheBlock(
                f"n_segments {n_segments} differs from the video's {video.get(L.VIDEO_N_SEGMENTS)} timestamps", item=item
            )
        inputs = self.entry_inputs(query_text, n_segments, prompt_template=prompt_template, video_identity=video_identity)
        digest = L.inputs_digest(inputs)
        complete = current is not None and current.get(L.ENTRY_COMPLETE) is True
        if complete and not force and inputs_match(current, inputs):
            self._entries[(video_id, query_id)] = (n_segments, str(current[L.ENTRY_VERSION]))
            return False
        pending = current.get(L.ENTRY_PENDING) if current is not None else None
        if resume and not force and isinstance(pending, str) and pending != (current or {}).get(L.ENTRY_VERSION):
            vattrs = sync(_get_attrs(self.store, L.data_path(video_id, query_id, pending)))
            if vattrs is not None and vattrs.get(L.ENTRY_INPUTS_SHA256) == digest:
                self._entries[(video_id, query_id)] = (n_segments, pending)
                if self._arrays_present(video_id, query_id):
                    return True
        version = f"v{uuid.uuid4().hex[:16]}"
        g = self._geo
        version_attrs = {
            L.ROOT_KIND: L.VERSION_KIND,
            L.ENTRY_VIDEO_ID: video_id,
            L.ENTRY_QUERY_ID: query_id,
            L.ENTRY_INPUTS: inputs,
            L.ENTRY_INPUTS_SHA256: digest,
            L.ENTRY_N_SEGMENTS: n_segments,
            L.ENTRY_K: g.K,
            L.ENTRY_D: g.D,
            L.ENTRY_STARTED_AT: _now(),
            L.ENTRY_PACKAGE_VERSION: tempo_ops.__version__,
        }
        metas = _array_metadata(g.form, n_segments, g.K, g.D, g.P, g.C, g.channel_scaled)
        vpath = L.data_path(video_id, query_id, version)

        async def create() -> None:
            if current is None or not complete:
                # No complete version to keep readable: (re)write the entry group, recording the
                # version being written for unit writers that were not handed its name.
                if isinstance(pending, str) and pending != version:
                    await self.store.delete_dir(L.data_path(video_id, query_id, pending))  # a crashed run's leftovers
                await _put_group(
                    self.store,
                    epath,
                    {L.ROOT_KIND: L.ENTRY_KIND, L.ENTRY_VIDEO_ID: video_id, L.ENTRY_QUERY_ID: query_id, L.ENTRY_PENDING: version},
                )
            await _put_group(self.store, vpath, version_attrs)
            await _gather_limited([_put_bytes(self.store, L.metadata_key(f"{vpath}/{name}"), raw) for name, raw in metas.items()])

        sync(create())
        self._entries[(video_id, query_id)] = (n_segments, version)
        return True

    def pending_version(self, video_id: str, query_id: str) -> str:
        """Name of the version this writer began for the entry (hand it to unit writers)."""
        return self._entry(video_id, query_id, None)[1]

    def _entry(self, video_id: str, query_id: str, version: str | None) -> tuple[int, str]:
        """(n_segments, version) of the entry being written: ``version`` given, begun here, or recorded as pending."""
        key = (video_id, query_id)
        if version is None and key in self._entries:
            return self._entries[key]
        item = f"{video_id}/{query_id}"
        if version is None:
            attrs = sync(_get_attrs(self.store, L.entry_path(video_id, query_id)))
            version = (attrs or {}).get(L.ENTRY_PENDING)
            if not isinstance(version, str):
                raise EntryNotFound("entry not begun (call begin_entry first, or pass version=)", item=item)
        vattrs = sync(_get_attrs(self.store, L.data_path(video_id, query_id, version)))
        if vattrs is None or L.ENTRY_N_SEGMENTS not in vattrs:
            raise EntryNotFound(f"entry version {version} not begun", item=item)
        self._entries[key] = (int(vattrs[L.ENTRY_N_SEGMENTS]), version)
        return self._entries[key]

    def _shard_encoders(
        self, cand: np.ndarray, seg_start: int, item: str
    ) -> tuple[list[tuple[ShardEncoder, Any]], dict[str, np.ndarray]]:
        """Candidates ``(n, K, D)`` → one ``(ShardEncoder, fill)`` per shard of the block, and the
        int8 side arrays by kind (scales ``(n, K)`` float32 [, channel exponents ``(n, D)`` int8]),
        filled as the shards are encoded.

        ``fill`` converts a piece of segments to the storage form (``<f2`` / bf16 bits ``<u2`` /
        ``i1``) straight into the encoder's buffer and checks it there, while it is in cache;
        Float16Overflow names the first value of the block that does not fit.
        """
        g = self._geo
        form = g.form
        sides = {side.kind: np.empty((cand.shape[0], side.count), dtype=side.dtype) for side in g.sides}

        def fill_of(s0: int) -> Any:
            def fill(dst: np.ndarray, p0: int) -> None:
                a = s0 + p0  # first segment of the piece, within the block
                src = cand[a : a + len(dst)]
                if form == "float16":
                    if cand.dtype == np.float16:
                        np.copyto(dst, src.reshape(dst.shape))
                    else:
                        _f16_into(dst, src.reshape(dst.shape))
                    pos, neg = _bits16_max(dst)  # checked converted, in cache: half the bytes of the source
                    ok = pos < 0x7C00 and neg < 0xFC00
                    if ok and (pos == 0x7BFF or neg == 0xFBFF) and cand.dtype != np.float16:
                        # ±65504 may be a larger value rounded down (up to 65520): refuse |x| > 65504
                        ok = bool(np.abs(src).max() <= L.FLOAT16_MAX)
                elif form == "bfloat16":
                    _bf16_bits_into(dst, src.reshape(dst.shape))
                    pos, neg = _bits16_max(dst)
                    ok = pos < 0x7F80 and neg < 0xFF80  # not NaN, inf, or rounded up beyond bf16's max
                else:
                    sc, exps = _quantize_int8_into(np.ascontiguousarray(src, dtype=np.float32), dst, channel_scaled=g.channel_scaled)
                    ok = bool(np.isfinite(sc).all())  # NaN/inf propagate into the token's scale
                    sides["s"][a : a + len(dst)] = sc
                    if exps is not None:
                        sides["e"][a : a + len(dst)] = exps
                if not ok:
                    self._raise_overflow(cand, seg_start, item)

            return fill

        encoders = [
            (ShardEncoder(min(g.P, cand.shape[0] - s0), g.K, g.D, g.stored, g.P, g.C, checksum=g.checksums), fill_of(s0))
            for s0 in range(0, cand.shape[0], g.P)
        ]
        return encoders, sides

    def _raise_overflow(self, cand: np.ndarray, seg_start: int, item: str) -> None:
        """Raise Float16Overflow for the first candidate value that does not fit the storage form."""
        form = self._geo.form
        limit = {"float16": L.FLOAT16_MAX, "bfloat16": BFLOAT16_MAX}.get(form, np.inf)
        bad_mask = ~np.isfinite(cand) | (np.abs(cand.astype(np.float32)) > limit)
        s, t, c = (int(v) for v in np.argwhere(bad_mask)[0])
        what = {"float16": "do not fit float16 (|x| > 65504, inf or NaN)", "bfloat16": "do not fit bfloat16 (inf or NaN)"}
        raise Float16Overflow(
            f"{int(bad_mask.sum())} candidate value(s) {what.get(form, 'are not finite')}; "
            f"first at segment {seg_start + s}, token {t}, channel {c}: {cand[s, t, c]!r}",
            item=item,
            segment=seg_start + s,
        )

    def write_block(
        self,
        video_id: str,
        query_id: str,
        seg_start: int,
        candidates: np.ndarray,
        relevance: np.ndarray,
        *,
        version: str | None = None,
    ) -> None:
        """Write segments ``[seg_start, seg_start + n)``: candidates ``(n, K, D)`` float, relevance ``(n,)`` in [0, 1].

        ``seg_start`` must be a multiple of ``segments_per_shard`` and ``n`` a multiple of it
        unless the block ends the entry. Candidates are converted to the cache's storage form;
        values that do not fit it (float16: |x| > 65504; any: inf/NaN) raise Float16Overflow
        before anything is written. ``version``: the version being written (default: the one
        this writer began, else the entry's recorded pending version). Idempotent.
        """
        g = self._geo
        n_seg, version = self._entry(video_id, query_id, version)
        item = f"{video_id}/{query_id}"
        cand = np.asarray(candidates)
        rel = np.asarray(relevance)
        if not isinstance(seg_start, (int, np.integer)) or isinstance(seg_start, bool):
            raise InvalidCacheBlock(f"seg_start must be an int, got {seg_start!r}", item=item)
        seg_start = int(seg_start)
        if cand.ndim != 3 or cand.shape[1:] != (g.K, g.D) or cand.shape[0] < 1:
            raise InvalidCacheBlock(f"candidates shape {cand.shape} is not (n>=1, {g.K}, {g.D})", item=item)
        if not np.issubdtype(cand.dtype, np.floating):
            raise InvalidCacheBlock(f"candidates dtype {cand.dtype} is not floating point", item=item)
        n = cand.shape[0]
        if rel.shape != (n,) or not (np.issubdtype(rel.dtype, np.floating) or np.issubdtype(rel.dtype, np.integer)):
            raise InvalidCacheBlock(f"relevance shape {rel.shape} / dtype {rel.dtype} is not ({n},) float", item=item)
        end = seg_start + n
        if seg_start < 0 or seg_start % g.P or end > n_seg or (n % g.P and end != n_seg):
            raise InvalidCacheBlock(
                f"block [{seg_start}, {end}) is not whole shards of {g.P} segments inside [0, {n_seg})", item=item
            )
        rel32 = rel.astype(np.float32)
        bad_rel = ~(np.isfinite(rel32) & (rel32 >= 0) & (rel32 <= 1))
        if bad_rel.any():
            bad = int(np.flatnonzero(bad_rel)[0])
            raise InvalidCacheBlock(f"relevance of segment {bad + seg_start} is not in [0, 1]: {rel32[bad]!r}", item=item)
        encoders, sides = self._shard_encoders(np.ascontiguousarray(cand), seg_start, item)
        shards = range(seg_start // g.P, -(-end // g.P))

        def side_shard(side: _SideArray, i: int) -> np.ndarray:
            return encode_shard(sides[side.kind][i * g.P : (i + 1) * g.P][:, None, :], g.P, 1, checksum=g.checksums)

        def rel_chunk(i: int) -> bytes:
            chunk = np.full(g.P, np.nan, dtype="<f4")
            part = rel32[i * g.P : (i + 1) * g.P]
            chunk[: len(part)] = part
            raw = chunk.tobytes()
            return raw + (crc32c_bytes(raw) if g.checksums else b"")

        # Candidates (and int8 side arrays) first, relevance last: a relevance chunk present means its block landed.
        cand_keys = [L.candidates_shard_key(video_id, query_id, shard, version) for shard in shards]
        side_keys = [[side.key_of(video_id, query_id, shard, version) for shard in shards] for side in g.sides]
        rel_keys = [L.relevance_chunk_key(video_id, query_id, shard, version) for shard in shards]
        root = local_root(self.store)
        if root is not None:  # stream each shard to disk through this thread's buffer ring
            def put_candidates() -> None:
                # conversions on one core, checksums and writes on the other (see _WRITE_BEHIND)
                with this_thread_torch_threads(1) as pipelined:
                    behind = _WRITE_BEHIND if pipelined else 0
                    ring = thread_piece_ring(behind + 1)  # the same memory for every put of this thread
                    items: list[tuple[str, Any]] = [
                        (os.path.join(root, key), enc.pieces(fill, ring=ring))
                        for key, (enc, fill) in zip(cand_keys, encoders)
                    ]
                    # the side shards are encoded once all candidate pieces (which fill them) were made
                    items += [
                        (os.path.join(root, key), _deferred(side_shard, side, i))
                        for side, keys in zip(g.sides, side_keys)
                        for i, key in enumerate(keys)
                    ]
                    fs_mod.put_local_files(items, write_behind=behind)

            retry_call(put_candidates, what=f"put {root}/{cand_keys[0]}")
            retry_call(
                lambda: fs_mod.put_local_files([(os.path.join(root, k), [rel_chunk(i)]) for i, k in enumerate(rel_keys)]),
                what=f"put {root}/{rel_keys[0]}",
            )
            return
        objects = [enc.encode(fill) for enc, fill in encoders]
        store = self.store

        async def put() -> None:
            puts = [_put_bytes(store, key, obj) for key, obj in zip(cand_keys, objects)]
            puts += [_put_bytes(store, key, side_shard(side, i)) for side, keys in zip(g.sides, side_keys) for i, key in enumerate(keys)]
            await _gather_limited(puts)
            await _gather_limited([_put_bytes(store, key, rel_chunk(i)) for i, key in enumerate(rel_keys)])

        sync(put())

    def _arrays_present(self, video_id: str, query_id: str) -> bool:
        """The version's array metadata objects exist and are the ones this writer would create."""
        n_seg, version = self._entry(video_id, query_id, None)
        g = self._geo
        expected = _array_metadata(g.form, n_seg, g.K, g.D, g.P, g.C, g.channel_scaled)
        vpath = L.data_path(video_id, query_id, version)

        async def run() -> list[Any]:
            return await _gather_limited([_get_bytes(self.store, L.metadata_key(f"{vpath}/{n}")) for n in expected])

        return sync(run()) == list(expected.values())

    async def _shard_problems(self, video_id: str, query_id: str, n_seg: int, version: str) -> dict[int, EntryIncomplete]:
        """Shard number → what is wrong with it (missing, torn, bad index checksum, absent chunks)."""
        g, store, item = self._geo, self.store, f"{video_id}/{query_id}"
        kinds = [(L.candidates_shard_key, g.index_nbytes, g.K // g.C, g.chunk_nbytes)]
        kinds += [(side.key_of, side.index_nbytes, 1, side.chunk_nbytes) for side in g.sides]

        async def check(shard: int) -> EntryIncomplete | None:
            for key_of, index_nbytes, chunks, chunk_nbytes in kinds:
                key = key_of(video_id, query_id, shard, version)
                where = f"{item} shard {shard} ({key})"
                try:
                    size = await store.getsize(key)
                except FileNotFoundError:
                    return EntryIncomplete(f"shard {shard} is missing ({key})", item=item)
                try:
                    raw = await _get_bytes(store, key, SuffixByteRequest(index_nbytes))
                    index = decode_index(raw or b"", g.P, chunks, item=where)
                    check_shard(index, g.shard_segments(shard, n_seg), chunk_nbytes, size - index_nbytes, item=where)
                except EntryIncomplete as exc:
                    return exc
            return None

        results = await _gather_limited([check(s) for s in range(g.n_shards(n_seg))])
        return {s: r for s, r in enumerate(results) if r is not None}

    def missing_segments(self, video_id: str, query_id: str, *, version: str | None = None) -> list[tuple[int, int]]:
        """Segment ranges of the version being written whose blocks have not landed intact."""
        g = self._geo
        n_seg, version = self._entry(video_id, query_id, version)

        async def run() -> np.ndarray:
            rel, problems = await asyncio.gather(
                _read_relevance_raw(self.store, g, video_id, query_id, n_seg, version),
                self._shard_problems(video_id, query_id, n_seg, version),
            )
            missing = np.isnan(rel)
            for shard in problems:
                missing[shard * g.P : (shard + 1) * g.P] = True
            return missing

        return _segment_ranges(sync(run()))

    def finalize_entry(self, video_id: str, query_id: str, *, version: str | None = None) -> None:
        """Verify every block of the version landed intact, then switch the entry to it (one put, last).

        Checks: no relevance chunk is missing or fails its crc32c; every shard exists, its index
        checksum is valid and every in-bounds chunk is present with the expected size.
        EntryIncomplete (naming the segment ranges / shard) otherwise; the entry then keeps its
        previous complete version, if any. The entry group written records the version's
        inputs, so recorded inputs and tokens always agree; the superseded version is deleted
        after the switch.
        """
        g = self._geo
        n_seg, version = self._entry(video_id, query_id, version)
        item = f"{video_id}/{query_id}"
        epath = L.entry_path(video_id, query_id)
        store = self.store

        async def verify_and_switch() -> None:  # one round trip to zarr's event loop
            rel = await _read_relevance_raw(store, g, video_id, query_id, n_seg, version)
            missing = _segment_ranges(np.isnan(rel))
            if missing:
                raise EntryIncomplete(f"blocks missing for segment ranges {missing[:8]}", item=item, missing=missing)
            problems = await self._shard_problems(video_id, query_id, n_seg, version)
            if problems:
                raise problems[min(problems)]
            vattrs, current = await asyncio.gather(
                _get_attrs(store, L.data_path(video_id, query_id, version)), _get_attrs(store, epath)
            )
            if vattrs is None:
                raise EntryNotFound(f"entry version {version} vanished before finalising", item=item)
            attrs, previous = self._completed_attrs(video_id, query_id, n_seg, version, vattrs, current)
            await _put_group(store, epath, attrs)  # the switch: readers see the old version or this one
            if previous is not None and previous != version:
                await store.delete_dir(L.data_path(video_id, query_id, previous))

        sync(verify_and_switch())

    def _completed_attrs(
        self, video_id: str, query_id: str, n_seg: int, version: str, vattrs: dict[str, Any], current: dict[str, Any] | None
    ) -> tuple[dict[str, Any], str | None]:
        """The entry group's attributes once ``version`` is complete, and the complete version it supersedes (if any)."""
        g = self._geo
        inputs = vattrs[L.ENTRY_INPUTS]
        attrs = {
            L.ROOT_KIND: L.ENTRY_KIND,
            L.ENTRY_VIDEO_ID: video_id,
            L.ENTRY_QUERY_ID: query_id,
            L.ENTRY_QUERY_TEXT: inputs["query_text"],
            L.ENTRY_PROMPT_TEMPLATE: inputs["prompt_template"],
            L.ENTRY_N_SEGMENTS: n_seg,
            L.ENTRY_K: g.K,
            L.ENTRY_D: g.D,
            L.ENTRY_INPUTS: inputs,
            L.ENTRY_INPUTS_SHA256: vattrs[L.ENTRY_INPUTS_SHA256],
            L.ENTRY_VERSION: version,
            L.ENTRY_STARTED_AT: vattrs.get(L.ENTRY_STARTED_AT),
            L.ENTRY_COMPLETE: True,
            L.ENTRY_COMPLETED_AT: _now(),
            L.ENTRY_PACKAGE_VERSION: tempo_ops.__version__,
        }
        previous = (current or {}).get(L.ENTRY_VERSION) if (current or {}).get(L.ENTRY_COMPLETE) is True else None
        return attrs, previous if isinstance(previous, str) else None

    def is_complete(
        self, video_id: str, query_id: str, *, query_text: str | None = None, prompt_template: str | None = None
    ) -> bool:
        """True when the entry carries the completion marker (and, where given, was computed from
        this ``query_text`` under this ``prompt_template``: otherwise it is stale)."""
        attrs = sync(_get_attrs(self.store, L.entry_path(video_id, query_id)))
        if attrs is None or attrs.get(L.ENTRY_COMPLETE) is not True:
            return False
        wanted = {L.ENTRY_QUERY_TEXT: query_text, L.ENTRY_PROMPT_TEMPLATE: prompt_template}
        return all(attrs.get(k) == v for k, v in wanted.items() if v is not None)


def _reopen_writer(url: str, config: dict[str, Any], storage_options: dict[str, Any] | None) -> CacheWriter:
    return CacheWriter.open(url, config, storage_options=storage_options)


async def _read_relevance_raw(
    store: Any, g: _Geometry, video_id: str, query_id: str, n_seg: int, version: str | None
) -> np.ndarray:
    """(S,) float32 from the relevance chunks; NaN where a chunk is absent, torn or fails its crc32c."""
    keys = [L.relevance_chunk_key(video_id, query_id, c, version) for c in range(g.n_shards(n_seg))]
    raws = await _gather_limited([_get_bytes(store, k) for k in keys])
    out = np.full(g.n_shards(n_seg) * g.P, np.nan, dtype=np.float32)
    for c, raw in enumerate(raws):
        chunk = _decode_relevance_chunk(raw, g)
        if chunk is not None:
            out[c * g.P : (c + 1) * g.P] = chunk
    return out[:n_seg]


class CacheReader:
    """Reads a token cache of layout v1 or v2. Checks the root on opening (CacheLayoutError)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        store: Any = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        """``store``: an already-open Zarr store for ``url`` (e.g. a byte-counting wrapper)."""
        self.url = url
        self.store = store if store is not None else open_store(url, storage_options, read_only=True, policy=retry)
        self.root_attrs = L.check_layout(_root_attrs(self.store, url), url)
        self._geo = _Geometry(self.root_attrs)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.root_attrs[L.ROOT_CONFIG])

    @property
    def fingerprint(self) -> str:
        return str(self.root_attrs[L.ROOT_FINGERPRINT])

    @property
    def layout_version(self) -> int:
        return int(self.root_attrs[L.ROOT_LAYOUT_VERSION])

    @property
    def storage_form(self) -> str:
        """"float16" (v1 and v2), "bfloat16" or "int8" (v2)."""
        return self._geo.form

    @property
    def segments_per_shard(self) -> int:
        return self._geo.P

    def _video_attrs_all(self) -> list[tuple[str, dict[str, Any] | None]]:
        async def run() -> list[tuple[str, dict[str, Any] | None]]:
            keys = await _list_children(self.store, L.VIDEOS)
            attrs = await _gather_limited([_get_attrs(self.store, f"{L.VIDEOS}/{k}") for k in keys])
            return list(zip(keys, attrs))

        return sync(run())

    def video_ids(self) -> list[str]:
        """Original ids of the videos written (sorted)."""
        return sorted(a[L.VIDEO_ID] for _, a in self._video_attrs_all() if a and L.VIDEO_ID in a)

    def video_meta(self, video_id: str) -> dict[str, Any]:
        """The record given to ``write_video``. EntryNotFound if the video is absent."""
        attrs = sync(_get_attrs(self.store, L.video_path(video_id)))
        if attrs is None or L.VIDEO_META not in attrs:
            raise EntryNotFound("video not in cache", item=video_id)
        return dict(attrs[L.VIDEO_META])

    def scan(self) -> list[dict[str, Any]]:
        """One row per video: ``{"key", "attrs", "entries": [{"key", "attrs" (None if unreadable), "complete"}]}``.

        Reads only group ``zarr.json`` objects (no array data). Entry groups are the children
        of ``queries/`` (v2 version subgroups lie one level deeper and are not listed).
        """

        async def run() -> list[dict[str, Any]]:
            vkeys = await _list_children(self.store, L.VIDEOS)

            async def video(vkey: str) -> dict[str, Any]:
                vpath = f"{L.VIDEOS}/{vkey}"
                qkeys = await _list_children(self.store, f"{vpath}/{L.QUERIES}")
                vattrs, *qattrs = await _gather_limited(
                    [_get_attrs(self.store, vpath)] + [_get_attrs(self.store, f"{vpath}/{L.QUERIES}/{q}") for q in qkeys]
                )
                entries = [
                    {"key": q, "attrs": a, "complete": bool(a and a.get(L.ENTRY_COMPLETE) is True)}
                    for q, a in zip(qkeys, qattrs)
                ]
                return {"key": vkey, "attrs": vattrs, "entries": entries}

            return await _gather_limited([video(v) for v in vkeys], limit=16)

        return sync(run())

    def entries(self, complete_only: bool = True) -> list[tuple[str, str]]:
        """(video_id, query_id) pairs, sorted; only complete ones unless ``complete_only=False``.

        Entries whose metadata cannot be read are not in this list: see ``unreadable_entries``.
        """
        out = []
        for v in self.scan():
            for e in v["entries"]:
                a = e["attrs"]
                if a is None or L.ENTRY_VIDEO_ID not in a or L.ENTRY_QUERY_ID not in a:
                    continue
                if e["complete"] or not complete_only:
                    out.append((a[L.ENTRY_VIDEO_ID], a[L.ENTRY_QUERY_ID]))
        return sorted(out)

    def unreadable_entries(self, rows: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
        """Nodes listed in the cache whose metadata is missing or damaged: ``[{"key", "reason"}]``.

        ``key`` is the store path (``videos/{vkey}`` or ``videos/{vkey}/queries/{qkey}``): the
        original ids are in that unreadable metadata, so the sanitised keys are all there is.
        """
        out = []
        for v in rows if rows is not None else self.scan():
            vpath = f"{L.VIDEOS}/{v['key']}"
            if v["attrs"] is None or L.VIDEO_ID not in v["attrs"]:
                out.append({"key": vpath, "reason": "video zarr.json is missing or damaged"})
            for e in v["entries"]:
                a = e["attrs"]
                if a is None or L.ENTRY_VIDEO_ID not in a or L.ENTRY_QUERY_ID not in a:
                    out.append({"key": f"{vpath}/{L.QUERIES}/{e['key']}", "reason": "entry zarr.json is missing or damaged"})
        return out

    def leftovers(self, rows: list[dict[str, Any]] | None = None, *, now: float | None = None) -> list[dict[str, Any]]:
        """What crashed writes left behind and nothing reads: ``[{"kind", "key", "nbytes", "age_s"}]``.

        ``kind`` is ``"unreferenced_version"`` — a version subgroup that is neither an entry's
        complete version nor its recorded pending one (a crash between the switch and deleting
        the superseded version, or a ``--force``/``--repair`` run that died before switching;
        ``age_s`` from its ``started_at``) — or ``"partial_file"``, a local ``*.partial``
        temporary of an interrupted put (``age_s`` from its mtime; local caches only). A
        version being written right now beside a complete one is unreferenced too: only
        ``prune_leftovers`` with an age threshold decides what is safe to delete.
        """
        now = _dt.datetime.now(_dt.timezone.utc).timestamp() if now is None else now
        if self.layout_version < 2:
            return []
        candidates: list[tuple[str, set[Any]]] = []  # (entry path, the versions it references)
        for v in rows if rows is not None else self.scan():
            for e in v["entries"]:
                a = e["attrs"] or {}
                keep = {a.get(L.ENTRY_VERSION), a.get(L.ENTRY_PENDING)}
                candidates.append((f"{L.VIDEOS}/{v['key']}/{L.QUERIES}/{e['key']}", keep))

        async def run() -> list[dict[str, Any]]:
            async def unreferenced(epath: str, keep: set[Any]) -> list[dict[str, Any]]:
                names = [n for n in await _list_children(self.store, epath) if L.VERSION_NAME.fullmatch(n) and n not in keep]
                out = []
                for name in names:
                    attrs = await _get_attrs(self.store, f"{epath}/{name}") or {}
                    started = attrs.get(L.ENTRY_STARTED_AT)
                    try:
                        age = now - _dt.datetime.fromisoformat(started).timestamp() if isinstance(started, str) else None
                    except ValueError:
                        age = None
                    nbytes = await self.store.getsize_prefix(f"{epath}/{name}")
                    out.append({"kind": "unreferenced_version", "key": f"{epath}/{name}", "nbytes": int(nbytes), "age_s": age})
                return out

            found = await _gather_limited([unreferenced(p, k) for p, k in candidates], limit=16)
            return [x for xs in found for x in xs]

        found = sync(run())
        root = local_root(self.store)
        if root is not None:
            for dirpath, _, files in os.walk(root):
                for f in files:
                    if f.endswith(".partial"):
                        try:
                            st = os.stat(os.path.join(dirpath, f))
                        except FileNotFoundError:  # its put just finished (renamed) or was cleaned up
                            continue
                        key = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                        found.append({"kind": "partial_file", "key": key, "nbytes": st.st_size, "age_s": now - st.st_mtime})
        return sorted(found, key=lambda x: x["key"])

    def entry(self, video_id: str, query_id: str) -> EntryReader:
        """Reader of a complete entry. EntryNotFound when absent or incomplete; CacheCorrupt when damaged."""
        item = f"{video_id}/{query_id}"
        epath = L.entry_path(video_id, query_id)
        eattrs, status = sync(_get_json_status(self.store, L.metadata_key(epath)))
        if status == _JSON_DAMAGED:
            raise CacheCorrupt("entry zarr.json is damaged", item=item, chunk=L.metadata_key(epath))
        eattrs = None if eattrs is None else eattrs.get("attributes", {})
        if eattrs is None or eattrs.get(L.ENTRY_COMPLETE) is not True:
            raise EntryNotFound("entry absent or incomplete", item=item)
        version = eattrs.get(L.ENTRY_VERSION) if self.layout_version >= 2 else None
        if self.layout_version >= 2 and not isinstance(version, str):
            raise CacheCorrupt("complete entry names no version", item=item, chunk=L.metadata_key(epath))
        names = [L.CANDIDATES, L.RELEVANCE] + [side.name for side in self._geo.sides]
        dpath = L.data_path(video_id, query_id, version)

        async def load() -> list[Any]:
            return list(
                await asyncio.gather(
                    _get_attrs(self.store, L.video_path(video_id)),
                    _get_attrs(self.store, dpath) if version else asyncio.sleep(0, {}),
                    *[_get_json(self.store, L.metadata_key(f"{dpath}/{n}")) for n in names],
                )
            )

        vattrs, version_attrs, *metas = sync(load())
        if vattrs is None:
            raise CacheCorrupt("entry's video record is missing or damaged", item=item, chunk=L.metadata_key(L.video_path(video_id)))
        if version_attrs is None or (version and version_attrs.get(L.ENTRY_INPUTS_SHA256) != eattrs.get(L.ENTRY_INPUTS_SHA256)):
            raise CacheCorrupt(f"entry version {version} is missing or records other inputs", item=item, chunk=dpath)
        for n, m in zip(names, metas):
            if m is None:
                raise CacheCorrupt(f"{n} array metadata is missing or damaged", item=item, chunk=L.metadata_key(f"{dpath}/{n}"))
        return EntryReader(self, video_id, query_id, eattrs, vattrs, dict(zip(names, metas)), version)


def _direct_readable(metas: dict[str, dict[str, Any]], g: _Geometry) -> bool:
    """True when the arrays are encoded exactly as our direct reader expects."""
    little = {"name": "bytes", "configuration": {"endian": "little"}}

    def sharded(chunk: list[int], itemsize: int = 4) -> list[dict[str, Any]]:
        data = little if itemsize > 1 else {"name": "bytes"}  # zarr writes no endianness for 1-byte types
        return [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": chunk,
                    "codecs": [data, {"name": "crc32c"}] if g.checksums else [data],
                    "index_codecs": [little, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ]

    cmeta = metas[L.CANDIDATES]
    ok = (
        cmeta.get("codecs") == sharded([1, g.C, g.D], g.stored.itemsize)
        and cmeta.get("data_type") == _FORM_DTYPE[g.form][0]
        and cmeta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") == [g.P, g.K, g.D]
    )
    for side in g.sides:
        smeta = metas[side.name]
        ok = ok and smeta.get("codecs") == sharded([1, side.count], side.dtype.itemsize)
        ok = ok and smeta.get("data_type") == ("float32" if side.per_token else "int8")
    return ok


class EntryReader:
    """One complete (video, query) entry: metadata, relevance and budget-proportional, verified token reads."""

    def __init__(
        self,
        reader: CacheReader,
        video_id: str,
        query_id: str,
        entry_attrs: dict[str, Any],
        video_attrs: dict[str, Any],
        metas: dict[str, dict[str, Any]],
        version: str | None = None,
    ) -> None:
        self._reader = reader
        self._store = reader.store
        self._geo = reader._geo
        self.video_id = video_id
        self.query_id = query_id
        self.version = version
        self.attrs = entry_attrs
        self.query_text: str = entry_attrs[L.ENTRY_QUERY_TEXT]
        self.inputs: dict[str, Any] | None = entry_attrs.get(L.ENTRY_INPUTS)  # None for v1 entries
        self.prompt_template: str | None = entry_attrs.get(L.ENTRY_PROMPT_TEMPLATE, (self.inputs or {}).get("prompt_template"))
        """Template ``query_text`` was rendered with (None: an entry written before templates were recorded)."""
        self.n_segments: int = int(entry_attrs[L.ENTRY_N_SEGMENTS])
        self.K: int = int(entry_attrs[L.ENTRY_K])
        self.D: int = int(entry_attrs[L.ENTRY_D])
        self.storage_form: str = self._geo.form
        meta = video_attrs.get(L.VIDEO_META, {})
        self.timestamps: list[float] = [float(t) for t in meta.get("timestamps", [])]
        self.timestamp_texts: list[str] = list(meta.get("timestamp_texts", []))
        self.direct = _direct_readable(metas, self._geo)
        self._indexes: dict[tuple[str, int], np.ndarray] = {}

    def _item(self) -> str:
        return f"{self.video_id}/{self.query_id}"

    def check_question(self, question: str, options: Sequence[str] | None = None) -> None:
        """Raise EntryInputsMismatch unless this entry was computed for ``question`` (with ``options``).

        The entry records the text its compressor read: the question rendered under the entry's
        prompt template (``render_query``). Entries that recorded no template (written before
        templates existed) recorded the question alone, or its plain rendering.
        """
        template = self.prompt_template or DEFAULT_TEMPLATE
        expected = {render_query(question, options, template)}
        if self.prompt_template is None:
            expected.add(question)
        if self.query_text not in expected:
            raise EntryInputsMismatch(
                f"the entry was computed for query text {self.query_text!r} (template {template}); the manifest's "
                f"question renders as {sorted(expected)[0]!r}: recompute it with `tempo compress`",
                item=self._item(),
            )

    def _corrupt(self, reason: str, chunk: str) -> CacheCorrupt:
        return CacheCorrupt(f"{reason} [{chunk}]", item=self._item(), chunk=chunk)

    def candidates_array(self) -> zarr.Array:
        """The stored candidates as a plain read-only ``zarr.Array`` (S, K, D) (float16 / bf16 bits uint16 / int8)."""
        return zarr.open_array(self._store, path=L.candidates_path(self.video_id, self.query_id, self.version), mode="r")

    def relevance(self) -> np.ndarray:
        """Relevance scores ``(S,)`` float32 in [0, 1]. CacheCorrupt when a chunk is missing, damaged or out of range."""
        g = self._geo
        keys = [L.relevance_chunk_key(self.video_id, self.query_id, c, self.version) for c in range(g.n_shards(self.n_segments))]

        async def run() -> list[bytes | None]:
            return await _gather_limited([_get_bytes(self._store, k) for k in keys])

        out = np.empty(len(keys) * g.P, dtype=np.float32)
        for c, (key, raw) in enumerate(zip(keys, sync(run()))):
            chunk = _decode_relevance_chunk(raw, g)
            if chunk is None:
                why = "missing" if raw is None else ("checksum mismatch" if len(raw) == g.rel_chunk_nbytes else "truncated")
                raise self._corrupt(f"relevance chunk {c} {why}", key)
            out[c * g.P : (c + 1) * g.P] = chunk
        out = out[: self.n_segments]
        bad = ~(np.isfinite(out) & (out >= 0) & (out <= 1))
        if bad.any():
            s = int(np.flatnonzero(bad)[0])
            raise self._corrupt(f"relevance of segment {s} is {float(out[s])!r}, not in [0, 1]", keys[s // g.P])
        return out

    def _check_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        if len(ranges) != self.n_segments:
            raise InvalidTokenRange(f"{len(ranges)} ranges given for {self.n_segments} segments", item=self._item())
        out = []
        for i, r in enumerate(ranges):
            try:
                a, b = (int(x) for x in r)
            except (TypeError, ValueError):
                raise InvalidTokenRange(f"range of segment {i} is not a (start, stop) pair: {r!r}", item=self._item()) from None
            if not 0 <= a <= b <= self.K:
                raise InvalidTokenRange(f"range {(a, b)} of segment {i} is outside [0, {self.K}]", item=self._item())
            out.append((a, b))
        return out

    def read_token_ranges(
        self, ranges: Sequence[tuple[int, int]], *, method: str = "auto", dtype: str | None = None
    ) -> list[np.ndarray]:
        """Tokens ``[start, stop)`` of every segment: ``ranges[i]`` belongs to segment i (len S).

        Returns a list of S arrays ``(stop - start, D)`` (views into one buffer), of ``dtype``
        "float32" or "float16"; default: float16 for float16 caches, float32 for bfloat16 and
        int8 ones (``read_stored`` gives the stored values). ``method``: "direct" reads whole
        inner chunks via the shard index (one range request per contiguous run + one index read
        per touched shard) and verifies each chunk's crc32c; "zarr" uses plain zarr slicing
        (zarr verifies the crc32c; missing chunks are detected by their NaN fill); "auto" =
        direct when the arrays' codecs allow it. CacheCorrupt names the entry and the chunk.
        """
        dtype = dtype or ("float16" if self.storage_form == "float16" else "float32")
        if dtype not in ("float16", "float32"):
            raise InvalidTokenRange(f"dtype must be 'float16' or 'float32', got {dtype!r}", item=self._item())
        stored, sides, starts = self._read(self._check_ranges(ranges), method)
        values = self._to_float(stored, sides, starts, np.dtype(dtype))
        return [values[starts[i] : starts[i + 1]] for i in range(self.n_segments)]

    def read_stored(
        self, ranges: Sequence[tuple[int, int]], *, method: str = "auto"
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None, np.ndarray | None]:
        """The stored values of the ranges: (tokens per segment, int8 scales per segment or None,
        int8 channel exponents ``(S, D)`` or None).

        Tokens are float16, uint16 (bfloat16 bit patterns) or int8 ``(n_i, D)``; scales float32
        ``(n_i,)``; exponents int8 (rows of segments with an empty range hold -128, unread).
        Token ``t`` of segment ``i`` is ``q[t] * scales[i][t] * 2**exponents[i]`` (float32).
        """
        stored, sides, starts = self._read(self._check_ranges(ranges), method)
        toks = [stored[starts[i] : starts[i + 1]] for i in range(self.n_segments)]
        sc = None if "s" not in sides else [sides["s"][starts[i] : starts[i + 1]] for i in range(self.n_segments)]
        return toks, sc, sides.get("e")

    def _to_float(self, stored: np.ndarray, sides: dict[str, np.ndarray], starts: np.ndarray, dtype: np.dtype) -> np.ndarray:
        if self.storage_form == "float16":
            return stored if dtype == np.float16 else stored.astype(dtype)
        if self.storage_form == "bfloat16":
            values = from_bf16_bits(stored)
        else:  # a segment at a time (its rows stay in cache), each with its own channel exponents
            values = np.empty(stored.shape, dtype=np.float32)
            exps = sides.get("e")
            for i in range(self.n_segments):
                a, b = int(starts[i]), int(starts[i + 1])
                if b > a:
                    dequantize_int8(stored[a:b], sides["s"][a:b], None if exps is None else exps[i], out=values[a:b])
        return values if dtype == np.float32 else values.astype(dtype)

    def _read(self, rs: list[tuple[int, int]], method: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Read validated ranges into one ``(sum of lengths, D)`` stored-dtype buffer; return it, the
        int8 side arrays by kind (scales ``(rows,)`` float32; exponents ``(S, D)`` int8) and row starts."""
        g = self._geo
        lengths = np.array([b - a for a, b in rs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out = np.empty((int(starts[-1]), self.D), dtype=g.stored)
        sides = {
            side.kind: np.empty(int(starts[-1]), dtype=side.dtype) if side.per_token
            else np.full((self.n_segments, side.count), L.INT8_MISSING, dtype=side.dtype)
            for side in g.sides
        }
        if method not in ("auto", "direct", "zarr"):
            raise InvalidTokenRange(f"unknown read method {method!r}", item=self._item())
        use_direct = method == "direct" or (method == "auto" and self.direct)
        if use_direct and not self.direct:
            raise CacheLayoutError("candidates are not encoded for direct reads; use method='zarr'", item=self._item())
        if use_direct and g.checksums:
            sync(self._read_direct_chunks(rs, starts, out, sides))
        elif use_direct:
            sync(self._read_direct_v1(rs, starts, out))
        else:
            self._read_zarr(rs, starts, out, sides)
        return out, sides, starts

    def _read_zarr(self, rs: list[tuple[int, int]], starts: np.ndarray, out: np.ndarray, sides: dict[str, np.ndarray]) -> None:
        arr = self.candidates_array()
        dpath = L.data_path(self.video_id, self.query_id, self.version)
        side_arrays = [(side, zarr.open_array(self._store, path=f"{dpath}/{side.name}", mode="r")) for side in self._geo.sides]
        for i, (a, b) in enumerate(rs):
            if b <= a:
                continue
            copies = [(arr, (i, slice(a, b)), out, slice(starts[i], starts[i + 1]))]
            copies += [
                (sarr, (i, slice(a, b)) if side.per_token else i, sides[side.kind], slice(starts[i], starts[i + 1]) if side.per_token else i)
                for side, sarr in side_arrays
            ]
            for src, sel, dst, at in copies:
                try:
                    dst[at] = src[sel]
                except Exception as exc:  # zarr raises its own errors for a failed crc32c or a torn shard
                    why = f"segment {i} tokens [{a}, {b}) unreadable ({type(exc).__name__}: {exc})"
                    raise self._corrupt(why, src.path) from exc
            block = out[starts[i] : starts[i + 1]]
            missing = (
                np.isnan(block).any() if self.storage_form == "float16"
                else (block == L.BF16_NAN_BITS).any() if self.storage_form == "bfloat16"
                else (block == L.INT8_MISSING).any()
            )
            if missing:
                raise self._corrupt(f"segment {i} tokens [{a}, {b}) read as the fill value (chunk missing)", arr.path)
            for side, sarr in side_arrays:
                if side.bad_values(sides[side.kind][starts[i] : starts[i + 1]] if side.per_token else sides[side.kind][i]):
                    raise self._corrupt(f"{side.name} of segment {i} read as the fill value (chunk missing)", sarr.path)

    async def _index(self, kind: str, shard: int) -> np.ndarray:
        """The (checksum-verified) shard index of candidates (``kind`` "c") or an int8 side array ("s", "e")."""
        if (kind, shard) not in self._indexes:
            g = self._geo
            if kind == "c":
                key, nbytes, chunks = L.candidates_shard_key(self.video_id, self.query_id, shard, self.version), g.index_nbytes, g.K // g.C
            else:
                side = next(sd for sd in g.sides if sd.kind == kind)
                key, nbytes, chunks = side.key_of(self.video_id, self.query_id, shard, self.version), side.index_nbytes, 1
            raw = await _get_bytes(self._store, key, SuffixByteRequest(nbytes))
            if raw is None:
                raise self._corrupt(f"shard {shard} is missing", key)
            try:
                self._indexes[(kind, shard)] = decode_index(raw, g.P, chunks, item=self._item())
            except CacheCorrupt as exc:
                raise self._corrupt(f"shard {shard}: {exc.reason}", key) from None
        return self._indexes[(kind, shard)]

    async def _read_direct_chunks(
        self, rs: list[tuple[int, int]], starts: np.ndarray, out: np.ndarray, sides: dict[str, np.ndarray]
    ) -> None:
        """v2: fetch the whole inner chunks holding the ranges (merged into runs), verify each crc32c, copy rows."""
        g = self._geo
        touched = [i for i, (a, b) in enumerate(rs) if b > a]
        shards = sorted({i // g.P for i in touched})
        kinds = ["c"] + [side.kind for side in g.sides]
        by_kind = {side.kind: side for side in g.sides}
        indexes = dict(zip([(k, s) for k in kinds for s in shards], await _gather_limited([self._index(k, s) for k in kinds for s in shards])))
        # per key: [(offset, nbytes, chunk-handler args)]
        wanted: dict[str, list[tuple[int, int, tuple[Any, ...]]]] = {}
        for i in touched:
            a, b = rs[i]
            shard, local = divmod(i, g.P)
            ckey = L.candidates_shard_key(self.video_id, self.query_id, shard, self.version)
            index = indexes[("c", shard)]
            for c in range(a // g.C, (b - 1) // g.C + 1):
                off, nb = int(index[local, c, 0]), int(index[local, c, 1])
                if off == int(L_EMPTY) or nb != g.chunk_nbytes:
                    raise self._corrupt(f"segment {i} token chunk {c} is {'missing' if off == int(L_EMPTY) else 'mis-sized'}", ckey)
                lo, hi = max(a, c * g.C), min(b, (c + 1) * g.C)
                wanted.setdefault(ckey, []).append((off, nb, ("c", i, c, lo - c * g.C, hi - c * g.C, int(starts[i]) + lo - a)))
            for side in g.sides:
                skey = side.key_of(self.video_id, self.query_id, shard, self.version)
                sidx = indexes[(side.kind, shard)]
                off, nb = int(sidx[local, 0, 0]), int(sidx[local, 0, 1])
                if off == int(L_EMPTY) or nb != side.chunk_nbytes:
                    raise self._corrupt(f"{side.name} of segment {i} are missing", skey)
                wanted.setdefault(skey, []).append((off, nb, (side.kind, i, 0, a, b, int(starts[i]))))
        requests = []
        for key, chunks in wanted.items():
            chunks.sort(key=lambda t: t[0])
            run: list[tuple[int, int, tuple[Any, ...]]] = []
            for ch in chunks:
                if run and run[-1][0] + run[-1][1] == ch[0]:
                    run.append(ch)
                else:
                    if run:
                        requests.append((key, run))
                    run = [ch]
            requests.append((key, run))

        async def fetch(key: str, run: list[tuple[int, int, tuple[Any, ...]]]) -> None:
            start, stop = run[0][0], run[-1][0] + run[-1][1]
            raw = await _get_array(self._store, key, RangeByteRequest(start, stop))
            if raw is None or len(raw) != stop - start:
                raise self._corrupt(f"short read [{start}, {stop})", key)
            rows = raw.reshape(len(run), -1)  # a run: chunks of one array (one size, checked above) back to back
            ok = chunk_rows_crc_ok(rows)
            kind = run[0][2][0]
            if not ok.all():
                _, seg, c, *_ = run[int(np.argmin(ok))][2]
                what = f"token chunk {c}" if kind == "c" else f"{by_kind[kind].name} chunk"
                raise self._corrupt(f"segment {seg} {what} fails its crc32c", key)
            if kind == "c":
                vals = rows[:, : -g.crc].view(g.stored).reshape(len(run), g.C, self.D)
                for j, (_, _, (_, _, _, r0, r1, row)) in enumerate(run):
                    out[row : row + r1 - r0] = vals[j, r0:r1]
                return
            side = by_kind[kind]
            side_vals = rows[:, : -g.crc].view(side.dtype)
            for j, (_, _, (_, seg, _, r0, r1, row)) in enumerate(run):
                vals = side_vals[j, r0:r1] if side.per_token else side_vals[j]
                if side.bad_values(vals):
                    raise self._corrupt(f"{side.name} of segment {seg} are not valid", key)
                if side.per_token:
                    sides[kind][row : row + r1 - r0] = vals
                else:
                    sides[kind][seg] = vals

        await _gather_limited([fetch(k, r) for k, r in requests])

    async def _read_direct_v1(self, rs: list[tuple[int, int]], starts: np.ndarray, out: np.ndarray) -> None:
        """v1 (no per-chunk checksum): read exactly the selected bytes via the (checksummed) shard index."""
        g = self._geo
        shards = sorted({i // g.P for i, (a, b) in enumerate(rs) if b > a})
        indexes = await _gather_limited([self._index("c", s) for s in shards])
        requests: list[tuple[str, int, int, int]] = []  # key, offset, nbytes, out_row
        for shard, index in zip(shards, indexes):
            pieces = []
            key = L.candidates_shard_key(self.video_id, self.query_id, shard)
            for i in range(shard * g.P, min(self.n_segments, (shard + 1) * g.P)):
                a, b = rs[i]
                if b > a:
                    try:
                        pieces += plan_segment(index, i - shard * g.P, a, b, g.C, g.token_nbytes, int(starts[i]))
                    except EntryIncomplete as exc:
                        raise self._corrupt(f"segment {i}: {exc.reason}", key) from None
            requests += [(key, off, n, group[0].out_row) for off, n, group in merge_pieces(pieces, g.token_nbytes)]
        flat = out.reshape(-1).view(np.uint8)

        async def fetch(key: str, off: int, n: int, row: int) -> None:
            raw = await _get_array(self._store, key, RangeByteRequest(off, off + n))
            if raw is None or len(raw) != n:
                raise self._corrupt(f"short read [{off}, {off + n})", key)
            flat[row * g.token_nbytes : row * g.token_nbytes + n] = raw

        await _gather_limited([fetch(*r) for r in requests])
        if np.isnan(out).any():  # v1 chunks carry no checksum; a NaN can only be damage (the writer refuses NaN)
            raise self._corrupt("candidates hold NaN (damaged chunk)", L.candidates_path(self.video_id, self.query_id))

    def read_all(self, *, method: str = "auto", dtype: str | None = None) -> np.ndarray:
        """All candidates ``(S, K, D)`` (dtype as in ``read_token_ranges``)."""
        stored, sides, starts = self._read([(0, self.K)] * self.n_segments, method)
        dtype = dtype or ("float16" if self.storage_form == "float16" else "float32")
        return self._to_float(stored, sides, starts, np.dtype(dtype)).reshape(self.n_segments, self.K, self.D)

    def verify(self, *, full: bool = True) -> list[dict[str, str]]:
        """Check the entry's stored data; return its problems ``[{"chunk", "reason"}]`` (empty: intact).

        Always: relevance (present, crc32c, in [0, 1]) and every shard index. ``full``: every
        inner chunk's crc32c too (reads the whole entry; v1 entries have no chunk checksums, so
        their values are checked for NaN instead).
        """
        problems: list[dict[str, str]] = []
        try:
            self.relevance()
        except CacheCorrupt as exc:
            problems.append({"chunk": str(exc.details.get("chunk")), "reason": exc.reason})
        g = self._geo
        kinds = ["c"] + [side.kind for side in g.sides]
        for shard in range(g.n_shards(self.n_segments)):
            for kind in kinds:
                try:
                    sync(self._index(kind, shard))
                except CacheCorrupt as exc:
                    problems.append({"chunk": str(exc.details.get("chunk")), "reason": exc.reason})
        if full and not problems:
            try:
                self._read([(0, self.K)] * self.n_segments, "auto")
            except CacheCorrupt as exc:
                problems.append({"chunk": str(exc.details.get("chunk")), "reason": exc.reason})
        return problems


def cache_summary(url: str, storage_options: dict[str, Any] | None = None, *, reader: CacheReader | None = None) -> dict[str, Any]:
    """Configuration, counts and per-video rows of a cache (for ``tempo inspect``).

    Returns ``{"url", "layout_version", "fingerprint", "config", "tempo_ops_version",
    "created_at", "segments_per_shard", "token_chunk", "storage_form", "int8_scheme" (int8 caches,
    else None), "counts": {"videos",
    "queries", "complete", "incomplete", "unreadable"}, "unreadable": [{"key", "reason"}],
    "total_bytes", "videos": [{"video_id", "n_segments", "queries_complete", "queries_total",
    "bytes"}]}``. Bytes are stored object sizes.
    """
    reader = reader or CacheReader(url, storage_options)
    rows = reader.scan()
    unreadable = reader.unreadable_entries(rows)
    store = reader.store

    async def sizes() -> tuple[int, dict[str, int]]:
        keys = [k async for k in store.list_prefix("")]
        vals = await _gather_limited([store.getsize(k) for k in keys])
        per: dict[str, int] = {}
        for k, v in zip(keys, vals):
            parts = k.split("/")
            if len(parts) > 2 and parts[0] == L.VIDEOS:
                per[parts[1]] = per.get(parts[1], 0) + int(v)
        return sum(int(v) for v in vals), per

    total, per_video = sync(sizes())
    videos = []
    n_complete = n_total = 0
    for row in rows:
        attrs = row["attrs"] or {}
        done = sum(1 for e in row["entries"] if e["complete"])
        n_complete += done
        n_total += len(row["entries"])
        videos.append(
            {
                "video_id": attrs.get(L.VIDEO_ID, row["key"]),
                "n_segments": attrs.get(L.VIDEO_N_SEGMENTS),
                "queries_complete": done,
                "queries_total": len(row["entries"]),
                "bytes": per_video.get(row["key"], 0),
            }
        )
    videos.sort(key=lambda v: str(v["video_id"]))
    ra = reader.root_attrs
    return {
        "url": url,
        "layout_version": reader.layout_version,
        "fingerprint": reader.fingerprint,
        "config": reader.config,
        "tempo_ops_version": ra.get(L.ROOT_PACKAGE_VERSION),
        "created_at": ra.get(L.ROOT_CREATED_AT),
        "segments_per_shard": reader.segments_per_shard,
        "token_chunk": int(ra[L.ROOT_TOKEN_CHUNK]),
        "storage_form": reader.storage_form,
        "int8_scheme": ra.get(L.ROOT_INT8_SCHEME, "token") if reader.storage_form == "int8" else None,
        "counts": {
            "videos": len(rows),
            "queries": n_total,
            "complete": n_complete,
            "incomplete": n_total - n_complete,
            "unreadable": len(unreadable),
        },
        "unreadable": unreadable,
        "total_bytes": total,
        "videos": videos,
    }
