"""Cache maintenance: ``verify_cache`` and ``prune_leftovers`` (``tempo verify``), ``migrate_cache`` (``tempo migrate``).

Both are plain functions over ``tempo_ops.store``; the CLI adapters are ``pipelines/verify_cmd.py``
and ``pipelines/migrate_cmd.py``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from zarr.core.sync import sync

from schemas import cache_layout as L
from tempo_ops.errors import CacheCorrupt, ConfigError, EntryNotFound
from tempo_ops.fs import local_root, open_store, url_to_fs
from tempo_ops.store import CacheReader, CacheWriter


def select_entries(pairs: Sequence[tuple[str, str]], wanted: Sequence[str] | None) -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs named by ``wanted`` (items ``VIDEO_ID`` = all its entries, or ``VIDEO_ID/QUERY_ID``) and the unmatched items."""
    if wanted is None:
        return list(pairs), []
    chosen: dict[tuple[str, str], None] = {}
    unmatched = []
    for item in wanted:
        hits = [p for p in pairs if item == p[0] or item == f"{p[0]}/{p[1]}"]
        if not hits:
            unmatched.append(item)
        chosen.update(dict.fromkeys(hits))
    return sorted(chosen), unmatched


def verify_cache(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    entries: Sequence[str] | None = None,
    full: bool = True,
    reader: CacheReader | None = None,
) -> dict[str, Any]:
    """Scan a cache (or the ``entries`` named) and report what is wrong.

    ``full`` checks every chunk's crc32c (reads all data); otherwise metadata, shard indexes
    and relevance only. Returns ``{"url", "layout_version", "storage_form", "full", "checked",
    "ok", "corrupt": [{"video_id", "query_id", "problems": [{"chunk", "reason"}]}],
    "incomplete": [{"video_id", "query_id"}], "missing": [item], "unreadable": [{"key",
    "reason"}], "leftovers": [{"kind", "key", "nbytes", "age_s"}] (``CacheReader.leftovers``:
    wasted space, never served, so not counted against ``clean``), "clean": bool}``. A damaged
    root raises CacheLayoutError.
    """
    reader = reader or CacheReader(url, storage_options)
    rows = reader.scan()
    unreadable = reader.unreadable_entries(rows)
    listed = reader.entries(complete_only=False)
    complete = set(reader.entries(complete_only=True))
    chosen, missing = select_entries(listed, entries)
    corrupt, incomplete, ok = [], [], 0
    for video_id, query_id in chosen:
        if (video_id, query_id) not in complete:
            incomplete.append({"video_id": video_id, "query_id": query_id})
            continue
        try:
            problems = reader.entry(video_id, query_id).verify(full=full)
        except (CacheCorrupt, EntryNotFound) as exc:
            problems = [{"chunk": str(exc.details.get("chunk", "")), "reason": exc.reason}]
        if problems:
            corrupt.append({"video_id": video_id, "query_id": query_id, "problems": problems})
        else:
            ok += 1
    return {
        "url": url,
        "layout_version": reader.layout_version,
        "storage_form": reader.storage_form,
        "full": full,
        "checked": len(chosen),
        "ok": ok,
        "corrupt": corrupt,
        "incomplete": incomplete,
        "missing": missing,
        "unreadable": unreadable if entries is None else [],
        "leftovers": reader.leftovers(rows) if entries is None else [],
        "clean": not (corrupt or incomplete or missing or (unreadable and entries is None)),
    }


def prune_leftovers(url: str, storage_options: dict[str, Any] | None = None, *, older_than_s: float) -> dict[str, Any]:
    """Delete the leftovers (``CacheReader.leftovers``) older than ``older_than_s`` seconds.

    Younger ones — and versions whose age is unknown — are kept: an unreferenced version may
    belong to a ``--force``/``--repair`` run still writing it. Returns ``{"removed": [...],
    "kept": [...], "removed_nbytes"}``.
    """
    reader = CacheReader(url, storage_options)  # checks the root first: a wrong path is refused, never created
    store = open_store(url, storage_options)  # writable (readers open read-only), for the deletes
    removed, kept = [], []
    for item in reader.leftovers():
        if item["age_s"] is None or item["age_s"] < older_than_s:
            kept.append(item)
            continue
        if item["kind"] == "partial_file":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(local_root(store) or "", item["key"]))
        else:
            sync(store.delete_dir(item["key"]))
        removed.append(item)
    return {"removed": removed, "kept": kept, "removed_nbytes": sum(i["nbytes"] for i in removed)}


def migrate_cache(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    form: str = "float16",
    keep_backup: bool = True,
) -> dict[str, Any]:
    """Convert a layout-v1 cache to layout v2 (checksums, versioned entries) in place-safely.

    Writes a complete new store at ``{url}.v2-migrating`` (complete entries only, values
    converted to ``form``: float16 keeps them bit-exact), verifies it, then swaps: the old
    store becomes ``{url}.v1-backup`` (deleted unless ``keep_backup``) and the new one takes
    ``url``. A crash before the swap leaves the original untouched. Returns counts and paths.
    """
    if form not in L.STORAGE_FORMS:
        raise ConfigError(f"storage form must be one of {list(L.STORAGE_FORMS)}, got {form!r}", item="form")
    old = CacheReader(url, storage_options)
    if old.layout_version == L.LAYOUT_VERSION:
        raise ConfigError(f"the cache is already layout {L.LAYOUT_VERSION}", item=url)
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    tmp, backup = f"{path}.v2-migrating", f"{path}.v1-backup"
    if fs.exists(backup):
        raise ConfigError(f"{backup} exists (a previous migration's backup): move it away first", item=url)
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)  # a previous, interrupted migration
    tmp_url = url.rstrip("/") + ".v2-migrating"
    config = dict(old.config, stored_dtype=form)
    k = int(old.root_attrs[L.ROOT_K])
    chunk = L.DEFAULT_TOKEN_CHUNK if k % L.DEFAULT_TOKEN_CHUNK == 0 else int(old.root_attrs[L.ROOT_TOKEN_CHUNK])
    writer = CacheWriter.open(tmp_url, config, storage_options=storage_options, segments_per_shard=old.segments_per_shard, token_chunk=chunk)
    p = writer.segments_per_shard
    counts = {"videos": 0, "entries": 0, "skipped_incomplete": 0}
    complete = set(old.entries(complete_only=True))
    for video_id in old.video_ids():
        writer.write_video(video_id, old.video_meta(video_id))
        counts["videos"] += 1
    for video_id, query_id in old.entries(complete_only=False):
        if (video_id, query_id) not in complete:
            counts["skipped_incomplete"] += 1
            continue
        e = old.entry(video_id, query_id)
        values, rel = e.read_all(dtype="float32"), e.relevance()  # both verified (index crc, range)
        writer.begin_entry(video_id, query_id, e.query_text, e.n_segments, force=True)
        for s0 in range(0, e.n_segments, p):
            writer.write_block(video_id, query_id, s0, values[s0 : s0 + p], rel[s0 : s0 + p])
        writer.finalize_entry(video_id, query_id)
        counts["entries"] += 1
    report = verify_cache(tmp_url, storage_options, full=True)
    if not report["clean"]:
        raise CacheCorrupt(f"the migrated store failed verification: {report['corrupt'][:2]}", item=tmp_url)
    fs.mv(path, backup, recursive=True)
    fs.mv(tmp, path, recursive=True)
    if not keep_backup:
        fs.rm(backup, recursive=True)
    return {"url": url, "storage_form": form, "backup": backup if keep_backup else None, "counts": counts}
