"""WebDataset shard sets: deterministic writing, completion records, index, reading, collation.

Format and names: ``schemas.shard_sample``. Writing rules:

- Deterministic bytes: pax tar, members in sorted order, fixed mtime / uid / gid / names /
  mode, .npy bytes from ``np.lib.format.write_array`` (no pickle). Same samples → same bytes.
- Deterministic assignment (``assign_shards``): samples sorted by key; a new shard starts
  when the next sample would push the current one over ``shard_size_bytes``.
- Crash safety: a local shard is written to ``.{name}.tmp-{random}`` and renamed; on any
  store a shard counts as done only once its completion record ``shard-N.done.json`` (size,
  SHA-256, planned-keys digest) exists, written after the tar. Leftover temp files of a
  killed run are removed by ``cleanup_partials`` and ignored by everything else.
- ``index.json`` is written last, once per shard set; a set whose index exists with the
  same plan digest is skipped on re-runs (``shard_set_complete``).

Reading: ``shard_dataset`` builds a ``webdataset`` pipeline that opens shards through
fsspec (local, gs://, memory://, ...), splits shards by node and by DataLoader worker, and
yields decoded samples; ``collate_samples`` pads a list of them into a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from schemas.shard_sample import (
    INDEX_NAME,
    MEMBERS,
    SHARD_FORMAT_VERSION,
    canonical_json,
    check_index,
    completion_record_name,
    decode_sample,
    shard_name,
)
from tempo_ops.chunking import consecutive_chunks
from tempo_ops.errors import ShardError, ShardFormatError

FIXED_MTIME = 1_577_836_800  # 2020-01-01T00:00:00Z: fixed so that tar bytes are reproducible
TAR_BLOCK = 512
_TMP_MARK = ".tmp-"


# --------------------------------------------------------------------------- planning
def estimate_sample_bytes(n_tokens: int, dim: int, n_segments: int, json_bytes: int = 2048) -> int:
    """Approximate tar bytes of one sample: members + tar headers/padding (used to cut shards)."""
    payload = n_tokens * dim * 2 + 128 + n_segments * 2 + 128 + json_bytes + n_segments * 40
    return payload + len(MEMBERS) * 3 * TAR_BLOCK  # header, pax header, padding per member


def assign_shards(sizes: dict[str, int], shard_size_bytes: int) -> list[list[str]]:
    """Deterministically group sample keys into shards.

    Keys are taken in sorted order; a new shard starts when adding the next sample would
    make the current one exceed ``shard_size_bytes`` (a sample larger than the limit gets
    a shard of its own). Returns the keys of each shard, in order.
    """
    if shard_size_bytes <= 0:
        raise ShardError(f"shard size must be positive, got {shard_size_bytes} bytes", item="shard_size")
    keys = sorted(sizes)
    return [[keys[i] for i in chunk] for chunk in consecutive_chunks([int(sizes[k]) for k in keys], shard_size_bytes)]


def keys_digest(keys: Sequence[str]) -> str:
    """SHA-256 (hex) of an ordered key list: identifies a shard's (or set's) plan."""
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- writing
def _fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingWriter:
    """File-like wrapper that counts and hashes everything written through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


def write_tar(fileobj: Any, samples: Iterable[tuple[str, dict[str, bytes]]]) -> list[str]:
    """Write ``(key, {member: bytes})`` samples to ``fileobj`` as a deterministic pax tar.

    Members of a sample are written in sorted name order as ``{key}.{member}``. Keys must be
    dot-free and slash-free and appear in strictly increasing order. Headers come from
    ``tarfile`` (pax format); member bytes are written straight through (no extra copies),
    and the archive ends like ``tarfile``'s (two zero blocks, padded to a 10240-byte record).
    Returns the keys written.
    """
    written: list[str] = []
    offset = 0
    for key, members in samples:
        if not key or "." in key or "/" in key:
            raise ShardError("sample key must be non-empty, dot-free and slash-free", item=key)
        if written and key <= written[-1]:
            raise ShardError(f"sample keys must be strictly increasing (after {written[-1]!r})", item=key)
        for member in sorted(members):
            data = members[member]
            header = _tarinfo(f"{key}.{member}", len(data)).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            fileobj.write(header)
            fileobj.write(data)
            pad = -len(data) % TAR_BLOCK
            if pad:
                fileobj.write(b"\0" * pad)
            offset += len(header) + len(data) + pad
        written.append(key)
    end = 2 * TAR_BLOCK
    end += -(offset + end) % tarfile.RECORDSIZE
    fileobj.write(b"\0" * end)
    return written


@dataclass(frozen=True)
class ShardRecord:
    """Completion record of one shard (contents of ``shard-N.done.json``)."""

    name: str
    samples: int
    bytes: int
    sha256: str
    keys_sha256: str  # digest of the keys planned for this shard
    failed: list[str]  # planned keys that could not be written (dead-lettered)
    format_version: int = SHARD_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "keys_sha256": self.keys_sha256,
            "failed": list(self.failed),
            "format_version": self.format_version,
        }


def write_shard(
    set_url: str,
    n: int,
    samples: Iterable[tuple[str, dict[str, bytes]]],
    *,
    planned_keys: Sequence[str],
    storage_options: dict | None = None,
) -> ShardRecord:
    """Write shard ``n`` of the shard set at ``set_url`` and then its completion record.

    ``samples`` is consumed lazily (one sample in memory at a time); keys in ``planned_keys``
    that it does not yield are recorded as ``failed``. If writing raises, the partial shard
    is removed (local) or left without a completion record (object stores), and the error
    propagates: nothing looks complete.
    """
    fs, base = _fs(set_url, storage_options)
    fs.makedirs(base, exist_ok=True)
    final = f"{base}/{shard_name(n)}"
    record_path = f"{base}/{completion_record_name(n)}"
    if fs.exists(record_path):
        fs.rm(record_path)  # a stale record must never vouch for the new bytes
    target = f"{base}/.{shard_name(n)}{_TMP_MARK}{uuid.uuid4().hex}" if _is_local(fs) else final
    try:
        with fs.open(target, "wb") as raw:
            hw = _HashingWriter(raw)
            written = write_tar(hw, samples)
        if target != final:
            os.replace(target, final)
    except BaseException:
        try:
            if fs.exists(target):
                fs.rm(target)
        except OSError:
            pass
        raise
    done = set(written)
    record = ShardRecord(
        name=shard_name(n),
        samples=len(written),
        bytes=hw.size,
        sha256=hw.sha.hexdigest(),
        keys_sha256=keys_digest(planned_keys),
        failed=[k for k in planned_keys if k not in done],
    )
    with fs.open(record_path, "wb") as fh:
        fh.write(canonical_json(record.to_dict()))
    return record


def read_completion(set_url: str, n: int, *, storage_options: dict | None = None) -> ShardRecord | None:
    """Shard ``n``'s completion record, or None when the shard is not complete.

    A record only counts when the tar exists with the recorded size.
    """
    fs, base = _fs(set_url, storage_options)
    record_path = f"{base}/{completion_record_name(n)}"
    try:
        with fs.open(record_path, "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn record is no record
    if doc.get("format_version") != SHARD_FORMAT_VERSION:
        return None
    try:
        size = fs.size(f"{base}/{doc['name']}")
    except (FileNotFoundError, KeyError):
        return None
    if size != doc.get("bytes"):
        return None
    return ShardRecord(
        name=doc["name"],
        samples=int(doc["samples"]),
        bytes=int(doc["bytes"]),
        sha256=str(doc["sha256"]),
        keys_sha256=str(doc["keys_sha256"]),
        failed=list(doc.get("failed", [])),
    )


def shard_done(set_url: str, n: int, planned_keys: Sequence[str], *, storage_options: dict | None = None) -> bool:
    """True when shard ``n`` is complete for exactly this plan and no sample failed (skip it)."""
    rec = read_completion(set_url, n, storage_options=storage_options)
    return rec is not None and rec.keys_sha256 == keys_digest(planned_keys) and not rec.failed


def cleanup_partials(set_url: str, *, storage_options: dict | None = None) -> list[str]:
    """Remove temp files left by killed writers in a local shard set; returns removed paths."""
    fs, base = _fs(set_url, storage_options)
    if not _is_local(fs) or not fs.exists(base):
        return []
    removed = []
    for path in fs.ls(base, detail=False):
        name = posixpath.basename(path)
        if name.startswith(".shard-") and _TMP_MARK in name:
            fs.rm(path)
            removed.append(path)
    return removed


def write_index(set_url: str, doc: dict[str, Any], *, storage_options: dict | None = None) -> str:
    """Write the shard set's ``index.json`` (last step of a set); returns its URL-path."""
    check_index(doc, item=set_url)
    fs, base = _fs(set_url, storage_options)
    path = f"{base}/{INDEX_NAME}"
    data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    if _is_local(fs):
        fs.makedirs(base, exist_ok=True)  # an empty set (0 samples) has no shard that made it
        tmp = f"{base}/.{INDEX_NAME}{_TMP_MARK}{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as fh:
            fh.write(data)
    return path


def read_index(index_url: str, *, storage_options: dict | None = None) -> dict[str, Any]:
    """Read and check a shard-set ``index.json`` (URL of the file or of its directory)."""
    if not index_url.rstrip("/").endswith(INDEX_NAME):
        index_url = index_url.rstrip("/") + "/" + INDEX_NAME
    fs, path = _fs(index_url, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError as exc:
        raise ShardError("shard-set index not found (the set is incomplete or absent)", item=index_url) from exc
    except ValueError as exc:
        raise ShardFormatError(f"index is not valid JSON: {exc}", item=index_url) from exc
    return check_index(doc, item=index_url)


def shard_set_complete(set_url: str, plan_sha256: str, *, storage_options: dict | None = None) -> bool:
    """True when the set's ``index.json`` exists for the same plan with no failed sample (re-runs skip it)."""
    try:
        doc = read_index(set_url, storage_options=storage_options)
    except (ShardError, ShardFormatError):
        return False
    return doc.get("plan_sha256") == plan_sha256 and not doc.get("failed")


# --------------------------------------------------------------------------- reading
def shard_urls(urls_or_index: str | Sequence[str], *, storage_options: dict | None = None) -> list[str]:
    """Shard URLs from an ``index.json`` URL / shard-set directory, or a list of tar URLs."""
    if isinstance(urls_or_index, str):
        if urls_or_index.endswith(".tar"):
            return [urls_or_index]
        doc = read_index(urls_or_index, storage_options=storage_options)
        base = urls_or_index.rstrip("/")
        if base.endswith(INDEX_NAME):
            base = base[: -len(INDEX_NAME)].rstrip("/")
        return [f"{base}/{s['name']}" for s in doc["shards"]]
    return [str(u) for u in urls_or_index]


def _fsspec_opener(storage_options: dict | None) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def open_streams(data: Iterable[dict]) -> Iterator[dict]:
        for sample in data:
            url = sample["url"]
            with fsspec.open(url, "rb", **(storage_options or {})) as stream:
                yield dict(sample, stream=stream)

    return open_streams


def _decode_stage(data: Iterable[dict]) -> Iterator[dict]:
    for sample in data:
        yield decode_sample(sample)


def shard_dataset(
    urls_or_index: str | Sequence[str],
    *,
    shuffle: int = 0,
    nodesplitter: Callable | None = None,
    workersplitter: Callable | None = None,
    storage_options: dict | None = None,
    seed: int = 0,
) -> Any:
    """A ``webdataset.DataPipeline`` (a torch ``IterableDataset``) over decoded samples.

    Args:
        urls_or_index: an ``index.json`` URL or shard-set directory URL (shards taken from the
            index), one ``.tar`` URL, or a list of tar URLs; any fsspec URL.
        shuffle: 0 for file order; n > 0 shuffles shards and keeps a sample buffer of n.
        nodesplitter: splits shards across nodes (default ``webdataset.split_by_node``,
            torch.distributed rank/world size); workersplitter likewise across DataLoader
            workers (default ``webdataset.split_by_worker``).
        storage_options: passed to ``fsspec.open`` (no gsutil involved).

    Yields dicts from ``schemas.shard_sample.decode_sample``: ``tokens (T, D) float16``,
    ``alloc (S,) int16``, ``offsets``, ``timestamp_texts``, ``timestamps_s``, ``meta``.
    """
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    urls = shard_urls(urls_or_index, storage_options=storage_options)
    stages: list[Any] = [wds.SimpleShardList(urls)]
    stages.append(nodesplitter or wds.split_by_node)
    stages.append(workersplitter or wds.split_by_worker)
    if shuffle:
        stages.append(wds.shuffle(max(1, len(urls)), seed=seed))
    stages += [_fsspec_opener(storage_options), tar_file_expander, group_by_keys, _decode_stage]
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    return wds.DataPipeline(*stages)


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad decoded samples into one batch.

    Returns ``tokens (B, Tmax, D) float16`` (zero padded), ``mask (B, Tmax) bool`` (True on
    real tokens), ``lengths (B,) int64``, ``alloc (B, Smax) int16`` (zero padded),
    ``n_segments (B,) int64``, ``offsets`` list of ``(S_b+1,)``, ``timestamp_texts`` list,
    ``meta`` list, ``keys`` list.
    """
    if not samples:
        raise ShardError("cannot collate an empty batch", item="collate")
    dims = {s["tokens"].shape[1] for s in samples}
    if len(dims) != 1:
        raise ShardError(f"samples have different token widths {sorted(dims)}", item="collate")
    D = dims.pop()
    lengths = np.array([s["tokens"].shape[0] for s in samples], dtype=np.int64)
    n_seg = np.array([s["alloc"].shape[0] for s in samples], dtype=np.int64)
    B, T, S = len(samples), int(lengths.max()), int(n_seg.max())
    tokens = np.zeros((B, T, D), dtype=np.float16)
    mask = np.zeros((B, T), dtype=bool)
    alloc = np.zeros((B, S), dtype=np.int16)
    for b, s in enumerate(samples):
        tokens[b, : lengths[b]] = s["tokens"]
        mask[b, : lengths[b]] = True
        alloc[b, : n_seg[b]] = s["alloc"]
    return {
        "tokens": tokens,
        "mask": mask,
        "lengths": lengths,
        "alloc": alloc,
        "n_segments": n_seg,
        "offsets": [s["offsets"] for s in samples],
        "timestamp_texts": [s["timestamp_texts"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "keys": [s["__key__"] for s in samples],
    }


def collate_torch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``collate_samples`` with array fields as torch tensors (for ``DataLoader(collate_fn=...)``)."""
    import torch

    batch = collate_samples(samples)
    for name in ("tokens", "mask", "lengths", "alloc", "n_segments"):
        batch[name] = torch.from_numpy(batch[name])
    return batch


# --------------------------------------------------------------------------- planning shard sets
@dataclass(frozen=True)
class PlannedSample:
    """One sample of a shard set, decided on the driver from cheap metadata (relevance only)."""

    key: str
    video_id: str
    query_id: str
    question: str
    options: list[str] | None
    answer: str | None
    allocation: tuple[int, ...]
    est_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class ShardTask:
    """All a worker needs to pack and write one shard (one writer per shard)."""

    set_name: str
    budget: int
    policy: str
    n: int
    samples: tuple[PlannedSample, ...]

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]


@dataclass(frozen=True)
class ShardSetPlan:
    """The deterministic plan of one shard set: its shards in order and the plan digest."""

    set_name: str
    budget: int
    policy: str
    tasks: tuple[ShardTask, ...]
    plan_sha256: str
    stats: dict[str, Any]


def plan_shard_set(
    set_name: str,
    budget: int,
    policy: str,
    samples: Sequence[PlannedSample],
    shard_size_bytes: int,
    *,
    stats: dict[str, Any] | None = None,
) -> ShardSetPlan:
    """Assign ``samples`` to shards (``assign_shards``) and digest the plan.

    Raises ``ShardError`` on duplicate sample keys (two (video, query) pairs must never share one).
    """
    by_key: dict[str, PlannedSample] = {}
    for s in samples:
        if s.key in by_key:
            raise ShardError("duplicate sample key in one shard set", item=s.key)
        by_key[s.key] = s
    groups = assign_shards({k: s.est_bytes for k, s in by_key.items()}, shard_size_bytes)
    tasks = tuple(
        ShardTask(set_name, budget, policy, n, tuple(by_key[k] for k in keys)) for n, keys in enumerate(groups)
    )
    digest = hashlib.sha256()
    for t in tasks:
        digest.update(f"{t.n}:{keys_digest(t.keys)}\n".encode())
    return ShardSetPlan(set_name, budget, policy, tasks, digest.hexdigest(), dict(stats or {}))


def make_index(
    plan: ShardSetPlan,
    records: Sequence[ShardRecord],
    *,
    pack_mode: str,
    cache_fingerprint: Any,
) -> dict[str, Any]:
    """The ``index.json`` document of a shard set from its plan and its shards' completion records."""
    recs = sorted(records, key=lambda r: r.name)
    if [r.name for r in recs] != [shard_name(t.n) for t in plan.tasks]:
        raise ShardError("completion records do not match the planned shards", item=plan.set_name)
    return {
        "kind": "tempo-shard-set",
        "format_version": SHARD_FORMAT_VERSION,
        "set": plan.set_name,
        "budget": plan.budget,
        "policy": plan.policy,
        "pack_mode": pack_mode,
        "cache_fingerprint": cache_fingerprint,
        "plan_sha256": plan.plan_sha256,
        "total_samples": sum(r.samples for r in recs),
        "total_bytes": sum(r.bytes for r in recs),
        "failed": sorted(k for r in recs for k in r.failed),
        "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in recs],
        "stats": plan.stats,
    }


def build_sample(
    entry_reader: Any,
    planned: PlannedSample,
    *,
    budget: int,
    policy: str,
    pack_mode: str = "head",
    cache_fingerprint: Any = None,
) -> tuple[str, dict[str, bytes]]:
    """Pack one planned sample from its cache entry and encode its tar members.

    ``entry_reader`` provides ``n_segments, K, D, timestamps, timestamp_texts,
    read_token_ranges`` (``tempo_ops.store.EntryReader``). Returns ``(key, {member: bytes})``.
    """
    from schemas.shard_sample import SampleMeta, encode_sample
    from tempo_ops.packing import pack

    packed = pack(entry_reader, np.asarray(planned.allocation, dtype=np.int64), list(entry_reader.timestamp_texts), mode=pack_mode)
    meta = SampleMeta(
        key=planned.key,
        video_id=planned.video_id,
        query_id=planned.query_id,
        question=planned.question,
        options=planned.options,
        answer=planned.answer,
        budget=int(budget),
        policy=policy,
        pack_mode=pack_mode,
        n_segments=int(entry_reader.n_segments),
        n_tokens=int(packed.tokens.shape[0]),
        dim=int(entry_reader.D),
        cache_fingerprint=cache_fingerprint,
        prompt_template=getattr(entry_reader, "prompt_template", None),
        query_text=getattr(entry_reader, "query_text", None),
        metadata=dict(planned.metadata),
    )
    members = encode_sample(
        meta, packed.tokens, packed.allocation, packed.offsets, packed.timestamp_texts, list(entry_reader.timestamps)
    )
    return planned.key, members
