"""The Zarr v3 segment index: ``IndexWriter``, ``IndexReader``, ``IndexVideo``, ``index_summary``.

Layout and attribute names: ``schemas/index_layout.py`` / ``schemas/INDEX_LAYOUT.md``.

Write protocol (``tempo index``)::

    w = IndexWriter.open(url, config, deepstack_layers=L)   # driver: creates root / checks fingerprint
    if w.begin_video(video_id, meta, S):                     # one worker per video; False: complete
        landed = w.landed_units(video_id)                    # resume: units already written intact
        w.write_unit(video_id, u, seg_start, features)       # one writer per unit, in parallel
        w.finalize_video(video_id, n_units)                  # verify every unit, marker last

Each unit group is written by exactly one work unit: its arrays first, its ``zarr.json``
(with ``complete: true``) last, every object by one whole-object put (retried, idempotent).
The low-level store helpers are the token cache's (``tempo_ops.store``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

import tempo_ops
from schemas import cache_layout as CL
from schemas import index_layout as L
from tempo_ops.errors import (
    CacheCorrupt,
    CacheLayoutError,
    EntryIncomplete,
    InvalidCacheBlock,
    VideoNotIndexed,
)
from tempo_ops.fs import DEFAULT_RETRY, RetryPolicy, open_store
from tempo_ops.store import (
    _gather_limited,
    _get_attrs,
    _get_bytes,
    _list_children,
    _now,
    _put_bytes,
    _put_group,
    create_root,
    open_root_for_writing,
)
from tempo_ops.svlm.compressor import SegmentFeatures


# --------------------------------------------------------------------------- storage forms
def to_stored(t: torch.Tensor, stored_dtype: str) -> np.ndarray:
    """A float tensor in its stored form: bfloat16 → ``uint16`` bit patterns (round to nearest
    even, lossless for bf16 input), float32 → ``float32``."""
    if stored_dtype == "bfloat16":
        return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if stored_dtype == "float32":
        return t.detach().to("cpu", torch.float32).contiguous().numpy()
    raise InvalidCacheBlock(f"unknown stored dtype {stored_dtype!r}", item="stored_dtype")


def from_stored(a: np.ndarray, stored_dtype: str) -> torch.Tensor:
    """Inverse of ``to_stored``: ``torch.bfloat16`` or ``torch.float32`` (CPU)."""
    if stored_dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def stored_nbytes_per_segment(n_visual: int, hidden: int, deepstack_layers: int, prefix_len: int, stored_dtype: str) -> int:
    """Bytes one segment takes in an index (array data only; metadata and shard overhead excluded)."""
    width = 2 if stored_dtype == "bfloat16" else 4
    return n_visual * hidden * (1 + deepstack_layers) * width + prefix_len * 5 + 4 * 3 + 4 + 4 + 8


def _encode_unit(features: Sequence[SegmentFeatures], stored_dtype: str, layers: int, hidden: int) -> dict[str, np.ndarray]:
    """The unit's arrays (names of ``L.ARRAYS``), padded to the unit's largest segment."""
    n = len(features)
    n_vis = [int(f.visual.shape[0]) for f in features]
    p_len = [int(f.input_ids.numel()) for f in features]
    width_n, width_p = max(n_vis), max(p_len)
    dt = np.uint16 if stored_dtype == "bfloat16" else np.float32
    visual = np.zeros((n, width_n, hidden), dtype=dt)
    deepstack = np.zeros((n, layers, width_n, hidden), dtype=dt)
    ids = np.full((n, width_p), -1, dtype=np.int32)
    mm = np.zeros((n, width_p), dtype=np.int8)
    for i, f in enumerate(features):
        if tuple(f.visual.shape) != (n_vis[i], hidden) or tuple(f.deepstack.shape) != (layers, n_vis[i], hidden):
            raise InvalidCacheBlock(
                f"segment {i}: visual {tuple(f.visual.shape)} / deepstack {tuple(f.deepstack.shape)} do not fit "
                f"L={layers}, D={hidden}",
                item=f.label,
            )
        visual[i, : n_vis[i]] = to_stored(f.visual, stored_dtype)
        deepstack[i, :, : n_vis[i]] = to_stored(f.deepstack, stored_dtype)
        ids[i, : p_len[i]] = f.input_ids.cpu().numpy()
        mm[i, : p_len[i]] = f.mm_token_type_ids.cpu().numpy()
    if stored_dtype == "float32" and not (np.isfinite(visual).all() and np.isfinite(deepstack).all()):
        raise InvalidCacheBlock("visual features are not finite", item=features[0].label)
    return {
        "visual": visual,
        "deepstack": deepstack,
        "n_visual": np.asarray(n_vis, dtype=np.int32),
        "input_ids": ids,
        "mm_token_type_ids": mm,
        "prefix_length": np.asarray(p_len, dtype=np.int32),
        "grid": np.stack([f.grid.cpu().numpy().reshape(3) for f in features]).astype(np.int32),
        "start_position": np.asarray([f.start_position for f in features], dtype=np.int64),
    }


def _chunks(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # One chunk per segment for the big arrays (reading one segment reads its bytes only).
    return (1, *shape[1:]) if name in ("visual", "deepstack") else shape


def _unit_objects(arrays: dict[str, np.ndarray], *, checksum: bool) -> dict[str, bytes]:
    """Every object (``name/zarr.json``, ``name/c/...``) of the unit's arrays, as zarr writes them.

    ``checksum`` (layout 2): each chunk carries zarr's ``crc32c`` codec, so plain zarr verifies it too.
    """
    scratch = zarr.storage.MemoryStore()
    for name in L.ARRAYS:
        a = arrays[name]
        arr = zarr.create_array(
            store=scratch, name=name, shape=a.shape, dtype=a.dtype, chunks=_chunks(name, a.shape),
            compressors=[zarr.codecs.Crc32cCodec()] if checksum else None, filters=None, fill_value=0,
            # layout 2 writes all-zero chunks too, so an absent chunk is always damage (reads check it)
            config={"write_empty_chunks": checksum},
        )
        arr[...] = a

    async def collect() -> dict[str, bytes]:
        keys = [k async for k in scratch.list_prefix("") if k != L.METADATA_FILE]
        raws = await _gather_limited([_get_bytes(scratch, k) for k in keys])
        return {k: r for k, r in zip(keys, raws) if r is not None}

    return sync(collect())


class IndexWriter:
    """Writes videos and their units into a segment index. Picklable (reopens by URL)."""

    def __init__(self, url: str, store: Any, root_attrs: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
        self.url = url
        self.store = store
        self.root_attrs = root_attrs
        self.storage_options = storage_options

    @classmethod
    def open(
        cls,
        url: str,
        config: dict[str, Any],
        *,
        deepstack_layers: int,
        segments_per_unit: int = L.DEFAULT_SEGMENTS_PER_UNIT,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> IndexWriter:
        """Open (create if absent) the index at ``url``; an existing one must have the same fingerprint."""
        cfg = L.validate_config(config)
        fingerprint = L.config_fingerprint(cfg)
        store, root = open_root_for_writing(
            url,
            storage_options,
            retry,
            cfg,
            fingerprint,
            create=lambda store: cls._create_root(url, store, cfg, fingerprint, segments_per_unit, deepstack_layers),
            check=L.check_layout,
            what="index",
        )
        return cls(url, store, root, storage_options)

    @staticmethod
    def _create_root(url: str, store: Any, cfg: dict, fingerprint: str, segments_per_unit: int, layers: int) -> dict:
        if segments_per_unit < 1 or layers < 0:
            raise CacheLayoutError(f"segments_per_unit ({segments_per_unit}) must be >= 1", item=url)
        attrs = {
            L.ROOT_KIND: L.INDEX_KIND,
            L.ROOT_LAYOUT_VERSION: L.LAYOUT_VERSION,
            L.ROOT_FINGERPRINT: fingerprint,
            L.ROOT_CONFIG: cfg,
            L.ROOT_PACKAGE_VERSION: tempo_ops.__version__,
            L.ROOT_CREATED_AT: _now(),
            L.ROOT_SEGMENTS_PER_UNIT: int(segments_per_unit),
            L.ROOT_D: int(cfg["svlm"]["hidden_size"]),
            L.ROOT_DEEPSTACK_LAYERS: int(layers),
        }
        return create_root(url, store, attrs, what="Tempo segment index")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen_writer, (self.url, self.root_attrs[L.ROOT_CONFIG], self.deepstack_layers, self.segments_per_unit, self.storage_options))

    @property
    def segments_per_unit(self) -> int:
        return int(self.root_attrs[L.ROOT_SEGMENTS_PER_UNIT])

    @property
    def deepstack_layers(self) -> int:
        return int(self.root_attrs[L.ROOT_DEEPSTACK_LAYERS])

    @property
    def stored_dtype(self) -> str:
        return str(self.root_attrs[L.ROOT_CONFIG]["stored_dtype"])

    @property
    def fingerprint(self) -> str:
        return str(self.root_attrs[L.ROOT_FINGERPRINT])

    def is_complete(self, video_id: str) -> bool:
        attrs = sync(_get_attrs(self.store, L.video_path(video_id)))
        return attrs is not None and attrs.get(L.VIDEO_COMPLETE) is True

    def begin_video(self, video_id: str, meta: dict[str, Any], n_segments: int, *, force: bool = False) -> bool:
        """Prepare the video's record. False: already complete (skip).

        An incomplete video with the same record keeps its landed units (resume); a changed
        one, or any with ``force``, is recreated empty (marker removed first).
        """
        record = CL.validate_video_meta(video_id, meta)
        if len(record["timestamps"]) != n_segments:
            raise InvalidCacheBlock(f"n_segments {n_segments} differs from the record's timestamps", item=video_id)
        path = L.video_path(video_id)
        current = sync(_get_attrs(self.store, path))
        same = current is not None and current.get(L.VIDEO_META) == record and current.get(L.VIDEO_N_SEGMENTS) == n_segments
        if same and not force:
            return current.get(L.VIDEO_COMPLETE) is not True
        attrs = {
            L.ROOT_KIND: L.VIDEO_KIND,
            L.VIDEO_ID: video_id,
            L.VIDEO_N_SEGMENTS: int(n_segments),
            L.VIDEO_META: record,
            L.VIDEO_WRITTEN_AT: _now(),
            L.ROOT_PACKAGE_VERSION: tempo_ops.__version__,
        }

        async def recreate() -> None:
            if current is not None:  # marker off first: a crash mid-delete must not leave a "complete" video
                await _put_group(self.store, path, {k: v for k, v in current.items() if k != L.VIDEO_COMPLETE})
            await self.store.delete_dir(path)
            await _put_group(self.store, path, attrs)
            await _put_group(self.store, L.units_path(video_id), {})

        sync(recreate())
        return True

    def _unit_attrs(self, video_id: str) -> dict[int, dict[str, Any]]:
        async def run() -> dict[int, dict[str, Any]]:
            names = [n for n in await _list_children(self.store, L.units_path(video_id)) if n.isdigit()]
            attrs = await _gather_limited([_get_attrs(self.store, L.unit_path(video_id, int(n))) for n in names])
            return {int(n): a for n, a in zip(names, attrs) if a is not None}

        try:
            return sync(run())
        except FileNotFoundError:
            return {}

    def landed_units(self, video_id: str) -> dict[int, tuple[int, int]]:
        """Unit number → its ``(seg_start, seg_stop)`` for every unit carrying its completion marker."""
        return {
            u: (int(a[L.UNIT_SEG_START]), int(a[L.UNIT_SEG_STOP]))
            for u, a in self._unit_attrs(video_id).items()
            if a.get(L.UNIT_COMPLETE) is True and a.get(L.UNIT_STORED_DTYPE) == self.stored_dtype
        }

    def write_unit(self, video_id: str, unit: int, seg_start: int, features: Sequence[SegmentFeatures]) -> int:
        """Write segments ``[seg_start, seg_start + len(features))`` as unit ``unit``; returns bytes written.

        The unit's old objects are removed first (marker first); its group with the
        completion marker is written last.
        """
        if not features:
            raise InvalidCacheBlock("a unit needs at least one segment", item=f"{video_id} unit {unit}")
        d = int(self.root_attrs[L.ROOT_D])
        arrays = _encode_unit(features, self.stored_dtype, self.deepstack_layers, d)
        objects = _unit_objects(arrays, checksum=int(self.root_attrs[L.ROOT_LAYOUT_VERSION]) >= 2)
        path = L.unit_path(video_id, unit)
        attrs = {
            L.ROOT_KIND: L.UNIT_KIND,
            L.UNIT_SEG_START: int(seg_start),
            L.UNIT_SEG_STOP: int(seg_start) + len(features),
            L.UNIT_STORED_DTYPE: self.stored_dtype,
            L.UNIT_ENCODING: L.BF16_ENCODING if self.stored_dtype == "bfloat16" else "float32",
            L.UNIT_COMPLETE: True,
            "written_at": _now(),
        }

        async def put() -> None:
            current = await _get_attrs(self.store, path)
            if current is not None:
                await _put_group(self.store, path, {k: v for k, v in current.items() if k != L.UNIT_COMPLETE})
                await self.store.delete_dir(path)
            await _gather_limited([_put_bytes(self.store, f"{path}/{k}", v) for k, v in objects.items()])
            await _put_group(self.store, path, attrs)  # the marker, last

        sync(put())
        return sum(len(v) for v in objects.values())

    def finalize_video(self, video_id: str, n_units: int) -> None:
        """Check that units ``0..n_units-1`` landed and tile ``[0, S)``; then write the video's marker."""
        path = L.video_path(video_id)
        attrs = sync(_get_attrs(self.store, path))
        if attrs is None:
            raise EntryIncomplete("video record vanished before finalising", item=video_id)
        landed = self.landed_units(video_id)
        missing = [u for u in range(n_units) if u not in landed]
        if missing:
            raise EntryIncomplete(f"units {missing[:8]} have not landed", item=video_id, missing=missing)
        stops = 0
        for u in range(n_units):
            a, b = landed[u]
            if a != stops:
                raise EntryIncomplete(f"unit {u} starts at segment {a}, expected {stops}", item=video_id)
            stops = b
        if stops != attrs.get(L.VIDEO_N_SEGMENTS):
            raise EntryIncomplete(f"units cover {stops} segments, the video has {attrs.get(L.VIDEO_N_SEGMENTS)}", item=video_id)
        attrs.update({L.VIDEO_COMPLETE: True, L.VIDEO_COMPLETED_AT: _now(), "n_units": n_units})
        sync(_put_group(self.store, path, attrs))


def _reopen_writer(url: str, config: dict, layers: int, per_unit: int, storage_options: dict | None) -> IndexWriter:
    return IndexWriter.open(url, config, deepstack_layers=layers, segments_per_unit=per_unit, storage_options=storage_options)


class IndexReader:
    """Reads a segment index. Checks the layout version on opening (CacheLayoutError)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.url = url
        self.store = open_store(url, storage_options, read_only=True, policy=retry)
        try:
            root = sync(_get_attrs(self.store, ""))
        except FileNotFoundError:
            root = None
        self.root_attrs = L.check_layout(root, url)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.root_attrs[L.ROOT_CONFIG])

    @property
    def fingerprint(self) -> str:
        return str(self.root_attrs[L.ROOT_FINGERPRINT])

    @property
    def stored_dtype(self) -> str:
        return str(self.config["stored_dtype"])

    def video_ids(self, complete_only: bool = True) -> list[str]:
        """Original ids of the indexed videos (only complete ones unless told otherwise), sorted."""

        async def run() -> list[dict[str, Any] | None]:
            keys = await _list_children(self.store, L.VIDEOS)
            return await _gather_limited([_get_attrs(self.store, f"{L.VIDEOS}/{k}") for k in keys])

        try:
            rows = sync(run())
        except FileNotFoundError:
            rows = []
        return sorted(
            a[L.VIDEO_ID] for a in rows if a and L.VIDEO_ID in a and (a.get(L.VIDEO_COMPLETE) is True or not complete_only)
        )

    def video(self, video_id: str) -> IndexVideo:
        """A complete video. VideoNotIndexed when it is absent or incomplete."""
        attrs = sync(_get_attrs(self.store, L.video_path(video_id)))
        if attrs is None:
            raise VideoNotIndexed("video is not in the index", item=video_id, index=self.url)
        if attrs.get(L.VIDEO_COMPLETE) is not True:
            raise VideoNotIndexed("video's index entry is incomplete (its indexing did not finish)", item=video_id, index=self.url)
        return IndexVideo(self, video_id, attrs)


class IndexVideo:
    """One complete indexed video: its record and its segments' features."""

    def __init__(self, reader: IndexReader, video_id: str, attrs: dict[str, Any]) -> None:
        self._reader = reader
        self.video_id = video_id
        self.attrs = attrs
        self.meta: dict[str, Any] = dict(attrs[L.VIDEO_META])
        self.n_segments = int(attrs[L.VIDEO_N_SEGMENTS])
        self.n_units = int(attrs.get("n_units", math.ceil(self.n_segments / reader.root_attrs[L.ROOT_SEGMENTS_PER_UNIT])))
        self.timestamps: list[float] = [float(t) for t in self.meta["timestamps"]]
        self.timestamp_texts: list[str] = list(self.meta["timestamp_texts"])

    def _unit_of(self, segment: int) -> int:
        return segment // int(self._reader.root_attrs[L.ROOT_SEGMENTS_PER_UNIT])

    def features(self, start: int = 0, stop: int | None = None) -> list[SegmentFeatures]:
        """``SegmentFeatures`` of segments ``[start, stop)`` (CPU tensors in the stored dtype:
        bfloat16 or float32; the compressor casts them to its own)."""
        stop = self.n_segments if stop is None else stop
        if not 0 <= start <= stop <= self.n_segments:
            raise InvalidCacheBlock(f"segment range [{start}, {stop}) is outside [0, {self.n_segments})", item=self.video_id)
        out: list[SegmentFeatures] = []
        stored = self._reader.stored_dtype
        checksummed = int(self._reader.root_attrs[L.ROOT_LAYOUT_VERSION]) >= 2
        for u in sorted({self._unit_of(s) for s in range(start, stop)}):
            path = L.unit_path(self.video_id, u)
            uattrs = sync(_get_attrs(self._reader.store, path))
            if uattrs is None or uattrs.get(L.UNIT_COMPLETE) is not True:
                raise EntryIncomplete(f"unit {u} is missing", item=self.video_id)
            a0 = int(uattrs[L.UNIT_SEG_START])
            lo, hi = max(start, a0) - a0, min(stop, int(uattrs[L.UNIT_SEG_STOP])) - a0
            small, visual, deepstack = _read_unit(
                self._reader.store, path, lo, hi, item=f"{self.video_id} unit {u}", checksummed=checksummed
            )
            for j in range(lo, hi):
                n, p = int(small["n_visual"][j]), int(small["prefix_length"][j])
                out.append(
                    SegmentFeatures(
                        input_ids=torch.from_numpy(small["input_ids"][j, :p].astype(np.int64)),
                        mm_token_type_ids=torch.from_numpy(small["mm_token_type_ids"][j, :p].astype(np.int64)),
                        grid=torch.from_numpy(small["grid"][j].astype(np.int64)),
                        visual=from_stored(visual[j - lo, :n], stored),
                        deepstack=from_stored(deepstack[j - lo, :, :n], stored),
                        start_position=int(small["start_position"][j]),
                        label=f"{self.video_id} segment {a0 + j} (start_position {int(small['start_position'][j])})",
                    )
                )
        return out


_SMALL_ARRAYS = ("n_visual", "input_ids", "mm_token_type_ids", "prefix_length", "grid", "start_position")


def _read_unit(
    store: Any, path: str, lo: int, hi: int, *, item: str, checksummed: bool
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A unit's small arrays whole and rows ``[lo, hi)`` of ``visual`` / ``deepstack``.

    In layout 2 (``checksummed``) every chunk read must exist (a deleted chunk would read as
    the fill value, zeros) and pass its crc32c: CacheCorrupt naming the unit and the chunk otherwise.
    """
    try:
        grp = zarr.open_group(store, path=path, mode="r")
        arrays = {n: grp[n] for n in (*_SMALL_ARRAYS, "visual", "deepstack")}
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise CacheCorrupt(f"unit array metadata is missing or damaged ({exc})", item=item, chunk=path) from None

    def chunk_keys(name: str) -> list[str]:
        arr = arrays[name]
        rows = range(lo, hi) if name in ("visual", "deepstack") else range(1)
        return [] if arr.size == 0 else [f"{path}/{name}/c/" + "/".join([str(r)] + ["0"] * (arr.ndim - 1)) for r in rows]

    if checksummed:  # layout 1 left all-zero chunks out, so absence proves nothing there

        async def listed() -> set[str]:  # one listing of the unit, not a request per chunk
            return {k async for k in store.list_prefix(f"{path}/")}

        present = sync(listed())
        missing = [k for n in arrays for k in chunk_keys(n) if k not in present]
        if missing:
            raise CacheCorrupt(f"{len(missing)} chunk(s) of the unit are missing", item=item, chunk=missing[0])
    try:
        small = {n: np.asarray(arrays[n][...]) for n in _SMALL_ARRAYS}
        return small, np.asarray(arrays["visual"][lo:hi]), np.asarray(arrays["deepstack"][lo:hi])
    except ValueError as exc:  # zarr's crc32c codec: "Stored and computed checksum do not match"
        raise CacheCorrupt(f"a chunk of the unit is damaged: fails its crc32c or is truncated ({exc})", item=item, chunk=path) from None


def index_nbytes(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Total stored bytes under an index (or any Zarr store) at ``url``."""
    store = open_store(url, storage_options, read_only=True)

    async def run() -> int:
        keys = [k async for k in store.list_prefix("")]
        return sum(int(v) for v in await _gather_limited([store.getsize(k) for k in keys]))

    return sync(run())
