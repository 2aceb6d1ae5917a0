"""The Zarr v3 token cache: ``CacheWriter``, ``CacheReader``, ``EntryReader``, ``cache_summary``.

Layout and attribute names: ``schemas/cache_layout.py`` / ``schemas/CACHE_LAYOUT.md``.

Write protocol (compression job)::

    w = CacheWriter.open(url, config)              # driver, once: creates root / checks fingerprint
    w.write_video(video_id, meta)                  # one worker per video
    if w.begin_entry(video_id, query_id, text, S,  # False: already complete, skip
                     prompt_template=name):      # text = render_query(question, options, name)
        w.write_block(video_id, query_id, seg_start, cand (n, K, D), rel (n,))  # units in parallel,
        ...                                        #   seg_start % w.segments_per_shard == 0
        w.finalize_entry(video_id, query_id)       # one worker: verify all blocks, marker last

Every write is a whole-object put (retried on transient errors, so idempotent); each
candidates shard and relevance chunk belongs to exactly one work unit; an entry without its
completion marker is invisible to readers and is recreated from scratch by ``begin_entry``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import tempo_ops
from schemas import cache_layout as L
from tempo_ops.errors import (
    CacheLayoutError,
    CacheNotWritable,
    EntryIncomplete,
    EntryNotFound,
    FingerprintMismatch,
    Float16Overflow,
    InvalidCacheBlock,
    InvalidTokenRange,
)
from tempo_ops.fs import DEFAULT_RETRY, RangeByteRequest, RetryPolicy, SuffixByteRequest, open_store
from tempo_ops.query_text import DEFAULT_TEMPLATE, TEMPLATES
from tempo_ops.store_shard import check_shard, decode_index, encode_shard, merge_pieces, plan_segment

_PROTO = default_buffer_prototype()
_MAX_CONCURRENCY = 64


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


async def _get_bytes(store: Any, key: str, byte_range: Any = None) -> bytes | None:
    buf = await store.get(key, _PROTO, byte_range)
    return None if buf is None else buf.to_bytes()


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

    Shared by the token cache and the segment index. Raises CacheNotWritable, the checker's
    CacheLayoutError, or FingerprintMismatch naming the differing config fields.
    """
    try:
        store = open_store(url, storage_options, policy=retry)
        root = sync(_get_attrs(store, ""))
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
    hierarchy exists once its root does). Refuses a location that holds anything else."""

    async def list_root() -> list[str]:
        return sorted([n async for n in store.list_dir("")])

    try:
        existing = sync(list_root())
    except FileNotFoundError:
        existing = []
    existing = [n for n in existing if n.rstrip("/") not in (L.VIDEOS, L.METADATA_FILE)]  # a concurrent creator's
    if existing:
        raise CacheLayoutError(f"not a {what} and not empty (holds {existing[:5]})", item=url)

    async def create() -> None:
        await _put_group(store, L.VIDEOS, {})
        await _put_group(store, "", attrs)

    try:
        sync(create())
    except OSError as exc:
        raise CacheNotWritable(f"cannot create the {what}: {exc}", item=url) from exc
    return attrs


@functools.lru_cache(maxsize=64)
def _array_metadata(n_segments: int, k: int, d: int, p: int, c: int) -> tuple[bytes, bytes]:
    """``zarr.json`` bytes of the candidates and relevance arrays, as zarr itself writes them.

    Built in a scratch MemoryStore and copied by one put each: letting zarr create the arrays
    in the cache would also make it (re)write parent group metadata when an existence check
    fails transiently, wiping the entry's attributes.
    """
    scratch = zarr.storage.MemoryStore()
    zarr.create_array(
        store=scratch,
        name="candidates",
        shape=(n_segments, k, d),
        dtype="float16",
        shards=(p, k, d),
        chunks=(1, c, d),
        compressors=None,
        filters=None,
        fill_value=0.0,
        dimension_names=L.CANDIDATES_DIMS,
    )
    zarr.create_array(
        store=scratch,
        name="relevance",
        shape=(n_segments,),
        dtype="float32",
        chunks=(p,),
        compressors=None,
        filters=None,
        fill_value=float("nan"),
        dimension_names=L.RELEVANCE_DIMS,
    )

    async def read() -> tuple[bytes, bytes]:
        a = await _get_bytes(scratch, L.metadata_key("candidates"))
        b = await _get_bytes(scratch, L.metadata_key("relevance"))
        assert a is not None and b is not None
        return a, b

    return sync(read())


class _Geometry:
    """Shapes shared by writer and reader: K, D, P (segments per shard), C (token chunk)."""

    def __init__(self, root_attrs: dict[str, Any]) -> None:
        self.K = int(root_attrs[L.ROOT_K])
        self.D = int(root_attrs[L.ROOT_D])
        self.P = int(root_attrs[L.ROOT_SEGMENTS_PER_SHARD])
        self.C = int(root_attrs[L.ROOT_TOKEN_CHUNK])
        self.token_nbytes = self.D * 2
        self.chunk_nbytes = self.C * self.token_nbytes
        self.index_nbytes = L.shard_index_nbytes(self.P, self.K, self.C)

    def n_shards(self, n_segments: int) -> int:
        return -(-n_segments // self.P)

    def shard_segments(self, shard: int, n_segments: int) -> int:
        return min(self.P, n_segments - shard * self.P)


class CacheWriter:
    """Writes videos and (video, query) entries into a token cache. Picklable (reopens by URL)."""

    def __init__(self, url: str, store: Any, root_attrs: dict[str, Any], storage_options: dict[str, Any] | None):
        self.url = url
        self.store = store
        self.root_attrs = root_attrs
        self.storage_options = storage_options
        self._geo = _Geometry(root_attrs)
        self._entries: dict[tuple[str, str], int] = {}  # (video_id, query_id) -> n_segments

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

        A new cache stores ``config``, its fingerprint and the geometry (``segments_per_shard``,
        ``token_chunk``; an existing cache keeps its own). An existing cache must have the same
        fingerprint, else FingerprintMismatch names the differing fields.
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
            check=L.check_layout,
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
        }
        return create_root(url, store, attrs, what="Tempo token cache")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen_writer, (self.url, self.root_attrs[L.ROOT_CONFIG], self.storage_options))

    # ------------------------------------------------------------ properties
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
    def fingerprint(self) -> str:
        return str(self.root_attrs[L.ROOT_FINGERPRINT])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.root_attrs[L.ROOT_CONFIG])

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
    def begin_entry(
        self,
        video_id: str,
        query_id: str,
        query_text: str,
        n_segments: int,
        *,
        prompt_template: str = DEFAULT_TEMPLATE,
        force: bool = False,
        resume: bool = False,
    ) -> bool:
        """Prepare the (video, query) entry for ``n_segments`` segments. False: already complete (skip).

        ``query_text`` is the text the compressor read (the query rendered under
        ``prompt_template``, a name in ``tempo_ops.query_text.TEMPLATES``); both are stored and
        both are part of the entry's identity, like its shape.

        An incomplete entry (crashed run) is deleted and recreated empty — or, with
        ``resume=True`` and the same query text and shape, kept as is so the blocks that
        landed intact (see ``missing_segments``) need not be rewritten. With ``force`` a
        complete entry is recreated too (its marker is removed first). A complete entry whose
        query text, prompt template or shape differs is recomputed as well.
        """
        if not isinstance(query_text, str):
            raise InvalidCacheBlock("query_text must be a string", item=f"{video_id}/{query_id}")
        if not isinstance(prompt_template, str) or prompt_template not in TEMPLATES:
            raise InvalidCacheBlock(
                f"prompt_template must be one of {', '.join(TEMPLATES)}, got {prompt_template!r}", item=f"{video_id}/{query_id}"
            )
        if not isinstance(n_segments, (int, np.integer)) or isinstance(n_segments, bool) or n_segments < 1:
            raise InvalidCacheBlock(f"n_segments must be a positive int, got {n_segments!r}", item=f"{video_id}/{query_id}")
        n_segments = int(n_segments)
        epath = L.entry_path(video_id, query_id)
        item = f"{video_id}/{query_id}"
        video = sync(_get_attrs(self.store, L.video_path(video_id)))
        if video is None:
            raise EntryNotFound("video not written yet (call write_video first)", item=video_id)
        if video.get(L.VIDEO_N_SEGMENTS) != n_segments:
            raise InvalidCacheBlock(
                f"n_segments {n_segments} differs from the video's {video.get(L.VIDEO_N_SEGMENTS)} timestamps", item=item
            )
        current = sync(_get_attrs(self.store, epath))
        attrs = {
            L.ROOT_KIND: L.ENTRY_KIND,
            L.ENTRY_VIDEO_ID: video_id,
            L.ENTRY_QUERY_ID: query_id,
            L.ENTRY_QUERY_TEXT: query_text,
            L.ENTRY_PROMPT_TEMPLATE: prompt_template,
            L.ENTRY_N_SEGMENTS: n_segments,
            L.ENTRY_K: self._geo.K,
            L.ENTRY_D: self._geo.D,
        }
        if current is not None and current.get(L.ENTRY_COMPLETE) is True and not force:
            if all(current.get(k) == v for k, v in attrs.items()):
                self._entries[(video_id, query_id)] = n_segments
                return False
        if (
            resume
            and not force
            and current is not None
            and current.get(L.ENTRY_COMPLETE) is not True
            and all(current.get(k) == v for k, v in attrs.items())
            and self._arrays_present(video_id, query_id)
        ):
            self._entries[(video_id, query_id)] = n_segments
            return True
        attrs[L.ENTRY_STARTED_AT] = _now()
        attrs[L.ENTRY_PACKAGE_VERSION] = tempo_ops.__version__

        async def recreate() -> None:
            if current is not None and current.get(L.ENTRY_COMPLETE) is True:
                # Remove the marker first: a crash during the rewrite must not leave a "complete" entry.
                await _put_group(self.store, epath, {k: v for k, v in current.items() if k != L.ENTRY_COMPLETE})
            await self.store.delete_dir(epath)
            await _put_group(self.store, epath, attrs)

        sync(recreate())
        g = self._geo
        cand_meta, rel_meta = _array_metadata(n_segments, g.K, g.D, g.P, g.C)

        async def create_arrays() -> None:
            await _put_bytes(self.store, L.metadata_key(L.candidates_path(video_id, query_id)), cand_meta)
            await _put_bytes(self.store, L.metadata_key(L.relevance_path(video_id, query_id)), rel_meta)

        sync(create_arrays())
        self._entries[(video_id, query_id)] = n_segments
        return True

    def _n_segments(self, video_id: str, query_id: str) -> int:
        key = (video_id, query_id)
        if key not in self._entries:
            attrs = sync(_get_attrs(self.store, L.entry_path(video_id, query_id)))
            if attrs is None or L.ENTRY_N_SEGMENTS not in attrs:
                raise EntryNotFound("entry not begun (call begin_entry first)", item=f"{video_id}/{query_id}")
            self._entries[key] = int(attrs[L.ENTRY_N_SEGMENTS])
        return self._entries[key]

    def write_block(
        self, video_id: str, query_id: str, seg_start: int, candidates: np.ndarray, relevance: np.ndarray
    ) -> None:
        """Write segments ``[seg_start, seg_start + n)``: candidates ``(n, K, D)`` float16/32, relevance ``(n,)`` float32.

        ``seg_start`` must be a multiple of ``segments_per_shard`` and ``n`` a multiple of it
        unless the block ends the entry. Values that do not fit float16 raise Float16Overflow
        before anything is written. Rewriting a block is idempotent.
        """
        g = self._geo
        n_seg = self._n_segments(video_id, query_id)
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
        if not np.all(np.isfinite(rel32)):
            bad = int(np.flatnonzero(~np.isfinite(rel32))[0]) + seg_start
            raise InvalidCacheBlock(f"relevance of segment {bad} is not finite", item=item)
        if cand.dtype == np.float16:  # only inf/NaN can be wrong (numpy's float16 max/min are slow)
            fits = bool(np.isfinite(cand).all())
        else:  # no temporaries: NaN propagates through max/min and fails the comparison
            fits = bool(cand.max() <= L.FLOAT16_MAX and cand.min() >= -L.FLOAT16_MAX)
        if not fits:
            bad_mask = ~np.isfinite(cand) | (np.abs(cand) > L.FLOAT16_MAX)
            s, t, c = (int(v) for v in np.argwhere(bad_mask)[0])
            raise Float16Overflow(
                f"{int(bad_mask.sum())} candidate value(s) do not fit float16 (|x| > 65504, inf or NaN); "
                f"first at segment {seg_start + s}, token {t}, channel {c}: {cand[s, t, c]!r}",
                item=item,
                segment=seg_start + s,
            )
        c16 = cand.astype("<f2", copy=False)
        store = self.store

        async def put() -> None:
            # Candidates first, relevance last: a relevance chunk present means its block landed.
            shard_puts = []
            for s0 in range(seg_start, end, g.P):
                shard = s0 // g.P
                data = encode_shard(c16[s0 - seg_start : s0 - seg_start + g.P], g.P, g.C)
                shard_puts.append(_put_bytes(store, L.candidates_shard_key(video_id, query_id, shard), data))
            await _gather_limited(shard_puts)
            rel_puts = []
            for s0 in range(seg_start, end, g.P):
                chunk = np.full(g.P, np.nan, dtype="<f4")
                part = rel32[s0 - seg_start : s0 - seg_start + g.P]
                chunk[: len(part)] = part
                rel_puts.append(_put_bytes(store, L.relevance_chunk_key(video_id, query_id, s0 // g.P), chunk.tobytes()))
            await _gather_limited(rel_puts)

        sync(put())

    def _arrays_present(self, video_id: str, query_id: str) -> bool:
        """Both array metadata objects exist and are the ones this writer would create."""
        async def run() -> tuple[Any, Any]:
            return tuple(
                await asyncio.gather(
                    _get_bytes(self.store, L.metadata_key(L.candidates_path(video_id, query_id))),
                    _get_bytes(self.store, L.metadata_key(L.relevance_path(video_id, query_id))),
                )
            )

        n_seg = self._n_segments(video_id, query_id)
        g = self._geo
        return sync(run()) == _array_metadata(n_seg, g.K, g.D, g.P, g.C)

    async def _shard_problems(self, video_id: str, query_id: str, n_seg: int) -> dict[int, EntryIncomplete]:
        """Shard number → what is wrong with it (missing, torn, bad checksum, absent chunks)."""
        g, store, item = self._geo, self.store, f"{video_id}/{query_id}"

        async def check(shard: int) -> EntryIncomplete | None:
            key = L.candidates_shard_key(video_id, query_id, shard)
            where = f"{item} shard {shard}"
            try:
                size = await store.getsize(key)
            except FileNotFoundError:
                return EntryIncomplete(f"candidates shard {shard} is missing", item=item)
            try:
                raw = await _get_bytes(store, key, SuffixByteRequest(g.index_nbytes))
                index = decode_index(raw or b"", g.P, g.K // g.C, item=where)
                check_shard(index, g.shard_segments(shard, n_seg), g.chunk_nbytes, size - g.index_nbytes, item=where)
            except EntryIncomplete as exc:
                return exc
            return None

        results = await _gather_limited([check(s) for s in range(g.n_shards(n_seg))])
        return {s: r for s, r in enumerate(results) if r is not None}

    def missing_segments(self, video_id: str, query_id: str) -> list[tuple[int, int]]:
        """Segment ranges whose blocks have not landed intact: relevance still NaN, or shard damaged."""
        g = self._geo
        n_seg = self._n_segments(video_id, query_id)

        async def run() -> np.ndarray:
            rel, problems = await asyncio.gather(
                _read_relevance_raw(self.store, g, video_id, query_id, n_seg),
                self._shard_problems(video_id, query_id, n_seg),
            )
            missing = np.isnan(rel)
            for shard in problems:
                missing[shard * g.P : (shard + 1) * g.P] = True
            return missing

        return _segment_ranges(sync(run()))

    def finalize_entry(self, video_id: str, query_id: str) -> None:
        """Verify every block landed intact, then write the completion marker (last).

        Checks: no relevance NaN remains; every candidates shard exists, its index checksum
        is valid and every in-bounds chunk is present with the raw size. EntryIncomplete
        (naming the segment ranges / shard) otherwise; the entry then stays incomplete.
        """
        g = self._geo
        n_seg = self._n_segments(video_id, query_id)
        item = f"{video_id}/{query_id}"
        epath = L.entry_path(video_id, query_id)
        store = self.store

        async def verify() -> dict[str, Any]:
            rel = await _read_relevance_raw(store, g, video_id, query_id, n_seg)
            missing = _segment_ranges(np.isnan(rel))
            if missing:
                raise EntryIncomplete(f"blocks missing for segment ranges {missing[:8]}", item=item, missing=missing)
            problems = await self._shard_problems(video_id, query_id, n_seg)
            if problems:
                raise problems[min(problems)]
            attrs = await _get_attrs(store, epath)
            if attrs is None:
                raise EntryNotFound("entry metadata vanished before finalising", item=item)
            return attrs

        attrs = sync(verify())
        attrs.update({L.ENTRY_COMPLETE: True, L.ENTRY_COMPLETED_AT: _now(), L.ENTRY_PACKAGE_VERSION: tempo_ops.__version__})
        sync(_put_group(store, epath, attrs))

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


async def _read_relevance_raw(store: Any, g: _Geometry, video_id: str, query_id: str, n_seg: int) -> np.ndarray:
    """(S,) float32 from the relevance chunks; NaN where a chunk is absent."""
    keys = [L.relevance_chunk_key(video_id, query_id, c) for c in range(g.n_shards(n_seg))]
    raws = await _gather_limited([_get_bytes(store, k) for k in keys])
    out = np.full(g.n_shards(n_seg) * g.P, np.nan, dtype=np.float32)
    for c, raw in enumerate(raws):
        if raw is not None and len(raw) == g.P * 4:
            out[c * g.P : (c + 1) * g.P] = np.frombuffer(raw, dtype="<f4")
    return out[:n_seg]


class CacheReader:
    """Reads a token cache. Checks the layout version on opening (CacheLayoutError)."""

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
        try:
            root = sync(_get_attrs(self.store, ""))
        except FileNotFoundError:  # a local path that does not exist
            root = None
        self.root_attrs = L.check_layout(root, url)
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

        Reads only group ``zarr.json`` objects (no array data).
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
        """(video_id, query_id) pairs, sorted; only complete ones unless ``complete_only=False``."""
        out = []
        for v in self.scan():
            for e in v["entries"]:
                a = e["attrs"]
                if a is None or L.ENTRY_VIDEO_ID not in a or L.ENTRY_QUERY_ID not in a:
                    continue
                if e["complete"] or not complete_only:
                    out.append((a[L.ENTRY_VIDEO_ID], a[L.ENTRY_QUERY_ID]))
        return sorted(out)

    def entry(self, video_id: str, query_id: str) -> EntryReader:
        """Reader of a complete entry. EntryNotFound when absent or incomplete."""
        item = f"{video_id}/{query_id}"

        async def load() -> tuple[Any, Any, Any]:
            return tuple(
                await asyncio.gather(
                    _get_attrs(self.store, L.entry_path(video_id, query_id)),
                    _get_attrs(self.store, L.video_path(video_id)),
                    _get_json(self.store, L.metadata_key(L.candidates_path(video_id, query_id))),
                )
            )

        eattrs, vattrs, cmeta = sync(load())
        if eattrs is None or eattrs.get(L.ENTRY_COMPLETE) is not True:
            raise EntryNotFound("entry absent or incomplete", item=item)
        if vattrs is None or cmeta is None:
            raise EntryNotFound("entry's video record or candidates metadata is missing", item=item)
        return EntryReader(self, video_id, query_id, eattrs, vattrs, cmeta)


def _direct_readable(cmeta: dict[str, Any], g: _Geometry) -> bool:
    """True when the candidates array is encoded exactly as our direct reader expects."""
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    expected = [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [1, g.C, g.D],
                "codecs": [little],
                "index_codecs": [little, {"name": "crc32c"}],
                "index_location": "end",
            },
        }
    ]
    return (
        cmeta.get("codecs") == expected
        and cmeta.get("data_type") == "float16"
        and cmeta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") == [g.P, g.K, g.D]
    )


class EntryReader:
    """One complete (video, query) entry: metadata, relevance and budget-proportional token reads."""

    def __init__(
        self,
        reader: CacheReader,
        video_id: str,
        query_id: str,
        entry_attrs: dict[str, Any],
        video_attrs: dict[str, Any],
        candidates_meta: dict[str, Any],
    ) -> None:
        self._reader = reader
        self._store = reader.store
        self._geo = reader._geo
        self.video_id = video_id
        self.query_id = query_id
        self.attrs = entry_attrs
        self.query_text: str = entry_attrs[L.ENTRY_QUERY_TEXT]
        self.prompt_template: str | None = entry_attrs.get(L.ENTRY_PROMPT_TEMPLATE)
        """Template ``query_text`` was rendered with (None: an entry written before templates were recorded)."""
        self.n_segments: int = int(entry_attrs[L.ENTRY_N_SEGMENTS])
        self.K: int = int(entry_attrs[L.ENTRY_K])
        self.D: int = int(entry_attrs[L.ENTRY_D])
        meta = video_attrs.get(L.VIDEO_META, {})
        self.timestamps: list[float] = [float(t) for t in meta.get("timestamps", [])]
        self.timestamp_texts: list[str] = list(meta.get("timestamp_texts", []))
        self.direct = _direct_readable(candidates_meta, self._geo)
        self._indexes: dict[int, np.ndarray] = {}

    def _item(self) -> str:
        return f"{self.video_id}/{self.query_id}"

    def candidates_array(self) -> zarr.Array:
        """The candidates as a plain read-only ``zarr.Array`` (S, K, D) float16."""
        return zarr.open_array(self._store, path=L.candidates_path(self.video_id, self.query_id), mode="r")

    def relevance(self) -> np.ndarray:
        """Relevance scores ``(S,)`` float32 (reads only the relevance chunks)."""
        arr = zarr.open_array(self._store, path=L.relevance_path(self.video_id, self.query_id), mode="r")
        return np.asarray(arr[:], dtype=np.float32)

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

    def read_token_ranges(self, ranges: Sequence[tuple[int, int]], *, method: str = "auto") -> list[np.ndarray]:
        """Tokens ``[start, stop)`` of every segment: ``ranges[i]`` belongs to segment i (len S).

        Returns a list of S arrays ``(stop - start, D)`` float16 (views into one buffer).
        ``method``: "direct" reads exactly the selected bytes via the shard index (one
        range request per contiguous run + one index read per touched shard); "zarr" uses
        plain zarr slicing (reads whole touched inner chunks); "auto" = direct when the
        array's codecs allow it.
        """
        out, starts = self._read(self._check_ranges(ranges), method)
        return [out[starts[i] : starts[i + 1]] for i in range(self.n_segments)]

    def _read(self, rs: list[tuple[int, int]], method: str) -> tuple[np.ndarray, np.ndarray]:
        """Read validated ranges into one ``(sum of lengths, D)`` float16 buffer; return it and row starts."""
        lengths = np.array([b - a for a, b in rs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out = np.empty((int(starts[-1]), self.D), dtype=np.float16)
        if method not in ("auto", "direct", "zarr"):
            raise InvalidTokenRange(f"unknown read method {method!r}", item=self._item())
        use_direct = method == "direct" or (method == "auto" and self.direct)
        if use_direct and not self.direct:
            raise CacheLayoutError("candidates are not encoded for direct reads; use method='zarr'", item=self._item())
        if use_direct:
            sync(self._read_direct(rs, starts, out))
        else:
            arr = self.candidates_array()
            for i, (a, b) in enumerate(rs):
                if b > a:
                    out[starts[i] : starts[i + 1]] = arr[i, a:b]
        return out, starts

    async def _shard_index(self, shard: int) -> np.ndarray:
        if shard not in self._indexes:
            g = self._geo
            key = L.candidates_shard_key(self.video_id, self.query_id, shard)
            raw = await _get_bytes(self._store, key, SuffixByteRequest(g.index_nbytes))
            if raw is None:
                raise EntryIncomplete(f"candidates shard {shard} is missing", item=self._item())
            self._indexes[shard] = decode_index(raw, g.P, g.K // g.C, item=f"{self._item()} shard {shard}")
        return self._indexes[shard]

    async def _read_direct(self, rs: list[tuple[int, int]], starts: np.ndarray, out: np.ndarray) -> None:
        g = self._geo
        shards = sorted({i // g.P for i, (a, b) in enumerate(rs) if b > a})
        indexes = await _gather_limited([self._shard_index(s) for s in shards])
        requests: list[tuple[str, int, int, int]] = []  # key, offset, nbytes, out_row
        for shard, index in zip(shards, indexes):
            pieces = []
            for i in range(shard * g.P, min(self.n_segments, (shard + 1) * g.P)):
                a, b = rs[i]
                if b > a:
                    pieces += plan_segment(index, i - shard * g.P, a, b, g.C, g.token_nbytes, int(starts[i]))
            key = L.candidates_shard_key(self.video_id, self.query_id, shard)
            requests += [(key, off, n, group[0].out_row) for off, n, group in merge_pieces(pieces, g.token_nbytes)]
        flat = out.reshape(-1).view(np.uint8)

        async def fetch(key: str, off: int, n: int, row: int) -> None:
            raw = await _get_bytes(self._store, key, RangeByteRequest(off, off + n))
            if raw is None or len(raw) != n:
                raise EntryIncomplete(f"short read at {key} [{off}, {off + n})", item=self._item())
            flat[row * g.token_nbytes : row * g.token_nbytes + n] = np.frombuffer(raw, dtype=np.uint8)

        await _gather_limited([fetch(*r) for r in requests])

    def read_all(self, *, method: str = "auto") -> np.ndarray:
        """All candidates ``(S, K, D)`` float16."""
        out, _ = self._read([(0, self.K)] * self.n_segments, method)
        return out.reshape(self.n_segments, self.K, self.D)


def cache_summary(url: str, storage_options: dict[str, Any] | None = None, *, reader: CacheReader | None = None) -> dict[str, Any]:
    """Configuration, counts and per-video rows of a cache (for ``tempo inspect``).

    Returns ``{"url", "layout_version", "fingerprint", "config", "tempo_ops_version",
    "created_at", "segments_per_shard", "token_chunk", "counts": {"videos", "queries",
    "complete", "incomplete"}, "total_bytes", "videos": [{"video_id", "n_segments",
    "queries_complete", "queries_total", "bytes"}]}``. Bytes are stored object sizes.
    """
    reader = reader or CacheReader(url, storage_options)
    rows = reader.scan()
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
        "counts": {"videos": len(rows), "queries": n_total, "complete": n_complete, "incomplete": n_total - n_complete},
        "total_bytes": total,
        "videos": videos,
    }
