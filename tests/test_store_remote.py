"""Token cache on object stores: GCS (fake-gcs-server), a flaky filesystem, and the retry helpers."""

from __future__ import annotations

import random
import threading
import uuid

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from gcs_emulator import gcs_server  # noqa: F401 - pytest fixture
from test_store_support import P, S, block_data, make_config, make_meta, open_writer, write_entry

from tempo_ops.errors import CacheWriteError, FingerprintMismatch, VideoReadError
from tempo_ops.fs import RetryPolicy, is_transient, retry_call
from tempo_ops.store import CacheReader, CacheWriter, cache_summary

FAST = RetryPolicy(max_attempts=4, base_delay_s=0.0, max_delay_s=0.0)
# 20% failures before and after each put: ~36% of put attempts fail; 30 attempts make giving up ~1e-13.
PATIENT = RetryPolicy(max_attempts=30, base_delay_s=0.001, max_delay_s=0.004)


# ------------------------------------------------------------------ GCS emulator
def test_gcs_end_to_end(gcs_server) -> None:  # noqa: F811 - fixture
    bucket = f"tempo-{uuid.uuid4().hex[:8]}"
    gcs_server.create_bucket(bucket)
    url = f"gs://{bucket}/cache"
    opts = gcs_server.storage_options
    writer = open_writer(url, storage_options=opts)
    write_entry(writer, "video/1", "q1")
    write_entry(writer, "video/1", "q2", units=[0, 4])  # left incomplete
    reader = CacheReader(url, storage_options=opts)
    assert reader.entries() == [("video/1", "q1")]
    assert reader.entries(complete_only=False) == [("video/1", "q1"), ("video/1", "q2")]
    e = reader.entry("video/1", "q1")
    cand, rel = block_data("video/1", "q1")
    np.testing.assert_array_equal(e.read_all(), cand.astype(np.float16))
    np.testing.assert_array_equal(e.read_all(method="zarr"), cand.astype(np.float16))
    np.testing.assert_array_equal(e.relevance(), rel)
    heads = e.read_token_ranges([(0, k) for k in range(1, S + 1)])
    for i, h in enumerate(heads):
        np.testing.assert_array_equal(h, cand[i, : i + 1].astype(np.float16))
    assert reader.video_meta("video/1") == make_meta()
    # objects per entry stay few: entry + version group + 2 array metadata + shards + relevance chunks
    fs = fsspec.filesystem("gs", **opts)
    entry_objects = [p for p in fs.find(f"{bucket}/cache/videos") if "/queries/q1/" in p]
    assert len(entry_objects) == 2 + 2 + 2 * (-(-S // P))
    summary = cache_summary(url, opts)
    assert summary["counts"] == {"videos": 1, "queries": 2, "complete": 1, "incomplete": 1, "unreadable": 0}
    assert summary["total_bytes"] == sum(fs.du(f"{bucket}/cache", total=False).values())
    with pytest.raises(FingerprintMismatch, match="compressor.svlm_name"):
        CacheWriter.open(url, make_config(svlm_name="other"), storage_options=opts)


# ------------------------------------------------------------------ flaky filesystem
class FlakyMemoryFS(MemoryFileSystem):
    """In-memory filesystem failing ~``rate`` of requests with transient errors.

    Failures happen before or (for writes) after the operation took effect, as on a real
    network where a response can be lost after the server applied the request.
    """

    protocol = "flaky"
    store: dict = {}  # noqa: RUF012 - fsspec's memory fs keeps its files on the class
    pseudo_dirs = [""]  # noqa: RUF012
    rate = 0.2
    rng = random.Random(1234)
    failures = 0
    lock = threading.Lock()

    def _maybe_fail(self, op: str, path: str) -> None:
        with FlakyMemoryFS.lock:
            fail = FlakyMemoryFS.rng.random() < FlakyMemoryFS.rate
            if fail:
                FlakyMemoryFS.failures += 1
        if fail:
            exc = random.choice([ConnectionResetError, TimeoutError, OSError])  # noqa: S311
            raise exc(f"injected transient failure: {op} {path}")

    def cat_file(self, path, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
        self._maybe_fail("cat", path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path, value, **kwargs):  # type: ignore[no-untyped-def]
        self._maybe_fail("pipe", path)
        super().pipe_file(path, value, **kwargs)
        self._maybe_fail("pipe-ack", path)

    def ls(self, path, detail=True, **kwargs):  # type: ignore[no-untyped-def]
        self._maybe_fail("ls", path)
        return super().ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):  # type: ignore[no-untyped-def]
        self._maybe_fail("info", path)
        return super().info(path, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):  # type: ignore[no-untyped-def]
        self._maybe_fail("rm", path)
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


def test_flaky_store_writer_ends_complete_and_correct() -> None:
    fsspec.register_implementation("flaky", FlakyMemoryFS, clobber=True)
    url = f"flaky://cache-{uuid.uuid4().hex[:8]}"
    FlakyMemoryFS.failures = 0
    writer = open_writer(url, retry=PATIENT)
    for q in ("q1", "q2"):
        write_entry(writer, "vid", q)
    assert writer.begin_entry("vid", "q1", "question q1?", S) is False
    assert FlakyMemoryFS.failures > 10, "the wrapper must actually have injected failures"
    reader = CacheReader(url, retry=PATIENT)
    assert reader.entries() == [("vid", "q1"), ("vid", "q2")]
    for q in ("q1", "q2"):
        cand, rel = block_data("vid", q)
        e = reader.entry("vid", q)
        np.testing.assert_array_equal(e.read_all(), cand.astype(np.float16))
        np.testing.assert_array_equal(e.relevance(), rel)
        np.testing.assert_array_equal(e.read_token_ranges([(2, 9)] * S)[3], cand[3, 2:9].astype(np.float16))


# ------------------------------------------------------------------ retry helpers
class HttpError(Exception):
    """Stands in for gcsfs.retry.HttpError (same name and ``code`` attribute)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"http {code}")
        self.code = code


def test_is_transient_classification() -> None:
    assert is_transient(OSError("reset")) and is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert not is_transient(FileNotFoundError("x")) and not is_transient(PermissionError("x"))
    assert is_transient(HttpError(503)) and is_transient(HttpError(429)) and is_transient(HttpError(500))
    assert not is_transient(HttpError(404)) and not is_transient(HttpError(403))
    assert is_transient(VideoReadError("net", item="gs://v")) and not is_transient(FingerprintMismatch("x"))
    assert not is_transient(ValueError("bug"))
    gcsfs_retry = pytest.importorskip("gcsfs.retry")
    assert is_transient(gcsfs_retry.HttpError({"code": 502, "message": "bad gateway"}))
    assert not is_transient(gcsfs_retry.HttpError({"code": 412, "message": "precondition"}))


def test_retry_call_retries_then_succeeds_or_gives_up() -> None:
    calls = []

    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise HttpError(503)
        return x * 2

    assert retry_call(flaky, 21, policy=FAST) == 42 and len(calls) == 3

    def always() -> None:
        calls.append(0)
        raise ConnectionResetError("down")

    calls.clear()
    with pytest.raises(CacheWriteError, match="gave up after 4 attempts") as info:
        retry_call(always, policy=FAST, what="put gs://b/k")
    assert len(calls) == 4 and info.value.item == "put gs://b/k" and info.value.transient

    def missing() -> None:
        calls.append(0)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry_call(missing, policy=FAST)
    assert len(calls) == 1


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.1, max_delay_s=1.0)
    delays = [policy.delay(n) for n in range(8)]
    for n, d in enumerate(delays):
        full = min(1.0, 0.1 * 2**n)
        assert 0.5 * full <= d <= full
