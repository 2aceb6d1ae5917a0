"""Work-unit leases: two ``tempo compress`` runs on one cache split the work instead of both doing all of it.

Before a run decodes a work unit (a run of whole cache shards of one video) it takes the
unit's lease, a small JSON object beside the cache::

    {cache}.leases/{sanitize_key(video_id)}/{unit:06d}.json
    {"run_id": "...", "host": "...", "pid": 123, "expires_at": 1796000000.0}

A unit whose lease another *live* run holds is skipped (that run computes it). A lease is
live until ``expires_at`` (default one hour after it was taken) and, when taken on this host,
only while its process exists, so a run killed with SIGKILL does not block the re-run. Leases
are released when the unit's blocks have landed (or failed) and, for whatever is left, when
the run ends or is interrupted.

Taking a lease is "read, write ours, read back": on stores with read-after-write
consistency (local files, GCS) of two runs racing for one unit exactly one sees its own
lease on the read back (the last writer wins; the other backs off). One object per unit,
each written by one run at a time: no shared mutable metadata object (GCS allows about one
update per second per object, and many writers of one object would contend for it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from tempo_ops.fs import url_to_fs, write_bytes_atomic
from tempo_ops.keys import sanitize_key

LEASE_TTL_S = 3600.0


@dataclass(frozen=True)
class Lease:
    """Who computes a unit: run id, host, process id, and when the lease lapses (epoch seconds)."""

    run_id: str
    host: str
    pid: int
    expires_at: float

    def live(self, now: float | None = None) -> bool:
        """Not expired and, when taken on this host, its process still exists."""
        if (time.time() if now is None else now) >= self.expires_at:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another user's process: it exists
                return True
        return True


def leases_root(cache_url: str) -> str:
    """``{cache}.leases`` (beside the cache: the cache's own tree holds only Zarr objects)."""
    return f"{cache_url.rstrip('/')}.leases"


def lease_url(cache_url: str, video_id: str, unit: int) -> str:
    """URL of the lease of ``unit`` of ``video_id``."""
    return f"{leases_root(cache_url)}/{sanitize_key(video_id)}/{int(unit):06d}.json"


def read_lease(url: str) -> Lease | None:
    """The lease at ``url``; None when there is none (or it is unreadable: treated as free)."""
    fs, path = url_to_fs(url)
    try:
        doc = json.loads(fs.cat_file(path))
        return Lease(str(doc["run_id"]), str(doc["host"]), int(doc["pid"]), float(doc["expires_at"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def acquire(cache_url: str, video_id: str, unit: int, run_id: str, *, ttl_s: float = LEASE_TTL_S) -> Lease | None:
    """Take the unit's lease for ``run_id``; returns None when taken, else the live lease of the run holding it."""
    url = lease_url(cache_url, video_id, unit)
    held = read_lease(url)
    if held is not None and held.run_id != run_id and held.live():
        return held
    mine = Lease(run_id, socket.gethostname(), os.getpid(), time.time() + ttl_s)
    write_bytes_atomic(url, json.dumps(asdict(mine)).encode())
    back = read_lease(url)
    if back is not None and back.run_id != run_id:
        return back  # another run wrote after us: it computes the unit
    return None


def release(cache_url: str, video_id: str, unit: int, run_id: str) -> None:
    """Drop the unit's lease if ``run_id`` holds it."""
    url = lease_url(cache_url, video_id, unit)
    held = read_lease(url)
    if held is not None and held.run_id == run_id:
        fs, path = url_to_fs(url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def release_run(cache_url: str, run_id: str) -> int:
    """Drop every lease ``run_id`` still holds (end or interruption of a run); returns how many."""
    fs, root = url_to_fs(leases_root(cache_url))
    try:
        paths = [p for p in fs.find(root) if p.endswith(".json")]
    except FileNotFoundError:
        return 0
    dropped = 0
    for path in paths:
        try:
            doc: dict[str, Any] = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue
        if doc.get("run_id") == run_id:
            try:
                fs.rm_file(path)
                dropped += 1
            except FileNotFoundError:
                pass
    _prune_empty_dirs(fs, root)
    return dropped


def _prune_empty_dirs(fs: Any, root: str) -> None:
    """Remove empty per-video folders (local file systems keep them; object stores have none)."""
    try:
        for d in sorted((p for p in fs.find(root, withdirs=True) if fs.isdir(p)), key=len, reverse=True):
            if not fs.ls(d):
                fs.rmdir(d)
        if not fs.ls(root):
            fs.rmdir(root)
    except (FileNotFoundError, OSError):
        pass


__all__ = ["LEASE_TTL_S", "Lease", "acquire", "lease_url", "leases_root", "read_lease", "release", "release_run"]
