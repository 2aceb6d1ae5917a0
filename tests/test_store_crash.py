"""Token cache under SIGKILL and with several writer processes at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_store_support import P, S, block_data, open_writer, write_entry

from tempo_ops.errors import EntryIncomplete, EntryNotFound
from tempo_ops.store import CacheReader

SUPPORT = Path(__file__).with_name("test_store_support.py")
REPO = SUPPORT.parent.parent


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, str(SUPPORT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"writer failed ({proc.returncode}):\n{out}\n{err}"


def _assert_equal_caches(a: str, b: str) -> None:
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.entries() == rb.entries()
    for v, q in ra.entries():
        ea, eb = ra.entry(v, q), rb.entry(v, q)
        np.testing.assert_array_equal(ea.read_all(), eb.read_all())
        np.testing.assert_array_equal(ea.relevance(), eb.relevance())
        assert (ea.query_text, ea.timestamps, ea.timestamp_texts) == (eb.query_text, eb.timestamps, eb.timestamp_texts)
        assert ra.video_meta(v) == rb.video_meta(v)


def test_sigkill_mid_write_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    crashed, clean = str(tmp_path / "crashed"), str(tmp_path / "clean")
    open_writer(crashed)  # the "driver" creates the root
    # q0 completes; q1 is rewritten block after block until the kill lands mid-write
    proc = _spawn("write", crashed, "vid", "q0,q1", "--signal-after", "9", "--loop")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"writer did not signal: {line!r} {proc.stderr.read() if proc.stderr else ''}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    reader = CacheReader(crashed)
    assert reader.entries() == [("vid", "q0")], "only the finalised entry is visible"
    assert reader.entries(complete_only=False) == [("vid", "q0"), ("vid", "q1")]
    with pytest.raises(EntryNotFound):
        reader.entry("vid", "q1")  # the killed entry is absent
    cand0, rel0 = block_data("vid", "q0")
    np.testing.assert_array_equal(reader.entry("vid", "q0").read_all(), cand0.astype(np.float16))
    np.testing.assert_array_equal(reader.entry("vid", "q0").relevance(), rel0)

    # the re-run: q0 is skipped, q1 is recreated and completed
    writer = open_writer(crashed)
    assert writer.begin_entry("vid", "q0", "question q0?", S) is False
    assert writer.begin_entry("vid", "q1", "question q1?", S) is True
    with pytest.raises(EntryIncomplete):
        writer.finalize_entry("vid", "q1")  # nothing written since the restart
    write_entry(writer, "vid", "q1")

    reference = open_writer(clean)
    write_entry(reference, "vid", "q0")
    write_entry(reference, "vid", "q1")
    _assert_equal_caches(crashed, clean)
    leftovers = [p for p in Path(crashed).rglob("*.partial")]
    assert all("q1" not in str(p) for p in leftovers), "begin_entry clears a crashed entry's debris"


def test_two_processes_write_different_videos(tmp_path: Path) -> None:
    cache, clean = str(tmp_path / "cache"), str(tmp_path / "clean")
    open_writer(cache)
    procs = [_spawn("write", cache, video, "qa,qb") for video in ("video-A", "video-B")]
    for p in procs:
        _finish(p)
    reference = open_writer(clean)
    for video in ("video-A", "video-B"):
        for q in ("qa", "qb"):
            write_entry(reference, video, q)
    assert CacheReader(cache).entries() == [("video-A", "qa"), ("video-A", "qb"), ("video-B", "qa"), ("video-B", "qb")]
    _assert_equal_caches(cache, clean)


def test_two_processes_write_units_of_one_entry_then_finalize(tmp_path: Path) -> None:
    cache, clean = str(tmp_path / "cache"), str(tmp_path / "clean")
    writer = open_writer(cache)
    write_entry(writer, "vid", "q", units=[])  # write_video + begin_entry only
    units = list(range(0, S, P))  # 0, 4, 8 (the last one short)
    procs = [_spawn("units", cache, "vid", "q", "--units", ",".join(str(u) for u in part)) for part in (units[::2], units[1::2])]
    for p in procs:
        _finish(p)
    writer.finalize_entry("vid", "q")
    write_entry(open_writer(clean), "vid", "q")
    _assert_equal_caches(cache, clean)
