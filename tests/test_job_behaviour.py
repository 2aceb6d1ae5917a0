"""The jobs as a user runs them: exit code, one-line message, nothing lost (issue 15's defects).

Each test runs ``tempo ...`` (in-process through ``pipelines.cli.main``, or as a subprocess
where signals are involved) on a tiny corpus of one-segment clips and the tiny models.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from pipelines.cli import main as tempo
from tempo_ops.synthetic import write_test_video


def _corpus(
    root: Path, *, answers: bool = True, extra_lines: list | None = None, n_videos: int = 2, n_frames: int = 40
) -> Path:
    """``n_videos`` clips (40 frames at 10 fps: one 8-frame segment) with two questions each
    (answered or not) + ``extra_lines``."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_videos):
        write_test_video(root / f"v{i}.mp4", n_frames=n_frames, fps=10, width=48, height=32)
        qs = [{"query_id": f"q{j}", "text": f"What happens {j}?"} for j in range(2)]
        if answers:
            for q in qs:
                q.update(options=["A. yes", "B. no"], answer="A")
        lines.append({"video_id": f"v{i}", "uri": f"v{i}.mp4", "queries": qs})
    lines += extra_lines or []
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return manifest


def _compress(manifest: Path, cache: Path, models: dict, *extra: str) -> list[str]:
    return ["compress", "--manifest", str(manifest), "--cache", str(cache), "--svlm", models["svlm"], "--compressor", models["tempo"], *extra]


def _shards(cache: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["shards", "--cache", str(cache), "--manifest", str(manifest), "--out", str(out), "--budgets", "64", *extra]


def _one_error_line(err: str, code: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error [")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error [{code}]"), lines[0]
    assert "Traceback" not in err
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sidecars(base: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in base.parent.glob(base.name + ".*") if p.is_file()}


@pytest.fixture(scope="module")
def compressed(tiny_models, tmp_path_factory):
    """A complete cache of the answered corpus: (manifest, cache)."""
    root = tmp_path_factory.mktemp("answered")
    manifest = _corpus(root / "c")
    cache = root / "cache.zarr"
    assert tempo(_compress(manifest, cache, tiny_models)) == 0
    return manifest, cache


# --------------------------------------------------------------------------- 1: no qualifying entry
def test_shards_with_no_annotated_entry_write_empty_sets(compressed, tmp_path, capsys):
    _, cache = compressed
    unanswered = _corpus(tmp_path / "c", answers=False)  # same ids, no answers
    out = tmp_path / "shards"
    assert tempo(_shards(cache, unanswered, out, "--policies", "ata,uniform")) == 0
    printed = capsys.readouterr().out
    assert "64-ata: 0 samples" in printed and "64-uniform: 0 samples" in printed
    assert "4 have no answer" in printed
    for name in ("64-ata", "64-uniform"):
        index = json.loads((out / name / "index.json").read_text())
        assert index["total_samples"] == 0 and index["shards"] == []
    summary = json.loads((tmp_path / "shards.summary.json").read_text())
    assert summary["status"] == "complete" and summary["counts"]["unannotated"] == 4


# --------------------------------------------------------------------------- 2: outputs never inside inputs
@pytest.mark.parametrize("where", ["cache", "inside_cache", "encloses_cache", "file"])
def test_shards_out_overlapping_an_input_or_a_file_is_refused(compressed, tmp_path, capsys, where):
    manifest, cache = compressed
    before = _tree(cache), _sidecars(cache)
    out = {
        "cache": cache,
        "inside_cache": cache / "shards",
        "encloses_cache": cache.parent,
        "file": tmp_path / "a_file",
    }[where]
    if where == "file":
        out.write_text("x")
    assert tempo(_shards(cache, manifest, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "config_error" if where == "file" else "output_overlaps_input")
    assert str(out) in line
    assert (_tree(cache), _sidecars(cache)) == before  # nothing of the cache was touched


def test_compress_cache_equal_to_manifest_is_refused(tiny_models, tmp_path, capsys):
    manifest = _corpus(tmp_path / "c", n_videos=1)
    before = manifest.read_bytes()
    assert tempo(_compress(manifest, manifest, tiny_models)) == 2
    _one_error_line(capsys.readouterr().err, "output_overlaps_input")
    assert manifest.read_bytes() == before


# --------------------------------------------------------------------------- 3, 7, 10: validation
BAD_LINES = {
    "lone_surrogate_id": ('{"video_id": "bad\\ud800x", "uri": "v0.mp4"}', "video_id", "lone surrogate"),
    "lone_surrogate_text": (
        '{"video_id": "s", "uri": "v0.mp4", "queries": [{"query_id": "q", "text": "a\\udc00"}]}',
        "queries[0].text",
        "lone surrogate",
    ),
    "empty_text": ({"video_id": "e", "uri": "v0.mp4", "queries": [{"query_id": "q", "text": "  "}]}, "queries[0].text", "must not be empty"),
    "nan_metadata": ('{"video_id": "n", "uri": "v0.mp4", "metadata": {"score": NaN}}', "metadata.score", "non-finite"),
    "infinity": ('{"video_id": "i", "uri": "v0.mp4", "metadata": {"x": [1, -Infinity]}}', "metadata.x[1]", "non-finite"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_validation_rejects_what_the_pipeline_cannot_store(tiny_models, tmp_path, capsys, kind):
    line, field, message = BAD_LINES[kind]
    manifest = _corpus(tmp_path / "c", n_videos=1, extra_lines=[line])
    assert tempo(["validate-manifest", str(manifest)]) != 0
    out = capsys.readouterr()
    assert f"line 2: {field}: " in out.out + out.err and message in out.out + out.err
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress(manifest, cache, tiny_models)) == 2
    err = _one_error_line(capsys.readouterr().err, "manifest_invalid")
    assert "line 2" in err
    assert not cache.exists()  # refused before any work


def test_invalid_utf8_is_reported_on_its_line(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"video_id": "a", "uri": "a.mp4"}\n{"video_id": "b\xff", "uri": "b.mp4"}\n')
    assert tempo(["validate-manifest", str(manifest)]) != 0
    out = capsys.readouterr()
    assert "line 2: <line>: not UTF-8 text" in out.out + out.err
    assert "line 0" not in out.out + out.err


# --------------------------------------------------------------------------- 4: device
def test_unavailable_device_is_a_typed_error_before_any_work(tiny_models, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    manifest = _corpus(tmp_path / "c", n_videos=1)
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress(manifest, cache, tiny_models, "--device", "cuda")) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "device_unavailable")
    assert "loading compressor" not in err
    assert not cache.exists()


# --------------------------------------------------------------------------- 6: budgets
@pytest.mark.parametrize("budgets", ["0", "64,-3"])
def test_budgets_below_one_are_refused(compressed, tmp_path, capsys, budgets):
    manifest, cache = compressed
    out = tmp_path / "shards"
    assert tempo(["shards", "--cache", str(cache), "--manifest", str(manifest), "--out", str(out), "--budgets", budgets]) == 2
    assert "below 1 token" in _one_error_line(capsys.readouterr().err, "config_error")
    assert not out.exists()


# --------------------------------------------------------------------------- 8: dry run
def test_dry_run_loads_no_model_plans_net_of_complete_and_reports_mismatch(compressed, tiny_models, capsys, monkeypatch):
    import pipelines.units as compress_job  # the compressor loader of compress and index

    def no_model(spec):
        raise AssertionError("the dry run loaded the model")

    monkeypatch.setattr(compress_job, "load_compressor", no_model)
    manifest, cache = compressed
    before = _tree(cache)
    assert tempo(_compress(manifest, cache, tiny_models, "--dry-run")) == 0
    out = capsys.readouterr()
    plan = json.loads(out.err.strip().splitlines()[-1])["dry_run"]
    assert plan["entries"] == 0 and plan["skipped_complete"] == 4 and plan["segments"] == 0
    assert "0 (video, query) entries to compute (4 already complete)" in out.out
    assert tempo(_compress(manifest, cache, tiny_models, "--dry-run", "--force")) == 0
    plan = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["dry_run"]
    assert plan["entries"] == 4 and plan["segments"] == 2
    assert tempo(_compress(manifest, cache, tiny_models, "--dry-run", "--max-frames", "64")) == 2
    assert "max_frames" in _one_error_line(capsys.readouterr().err, "fingerprint_mismatch")
    assert _tree(cache) == before


def test_sampling_mismatch_is_refused_before_the_model_loads(compressed, tiny_models, capsys, monkeypatch):
    import pipelines.units as compress_job  # the compressor loader of compress and index

    monkeypatch.setattr(compress_job, "load_compressor", lambda spec: (_ for _ in ()).throw(AssertionError("model loaded")))
    manifest, cache = compressed
    assert tempo(_compress(manifest, cache, tiny_models, "--max-frames", "64")) == 2
    _one_error_line(capsys.readouterr().err, "fingerprint_mismatch")


# --------------------------------------------------------------------------- 11: storage errors
def _failing_local_set(monkeypatch, err: int, under: Path, *, after: int = 0) -> list[int]:
    """Local writes under ``under`` (``put_local_files``, the one local write primitive) raise
    OSError(err) after ``after`` successful calls; returns the call counter."""
    from tempo_ops import fs as fs_mod

    real = fs_mod.put_local_files
    calls = [0]

    def put(items, **kwargs):
        if not items[0][0].startswith(f"{under}{os.sep}"):
            return real(items, **kwargs)
        calls[0] += 1
        if calls[0] > after:
            raise OSError(err, os.strerror(err), items[0][0])
        return real(items, **kwargs)

    monkeypatch.setattr(fs_mod, "put_local_files", put)
    return calls


def test_read_only_cache_stops_at_once_keeping_what_is_complete(compressed, tiny_models, tmp_path, capsys, monkeypatch):
    import shutil

    from tempo_ops.store import CacheReader

    manifest, source = compressed
    cache = tmp_path / "cache.zarr"
    shutil.copytree(source, cache)
    calls = _failing_local_set(monkeypatch, errno.EROFS, cache)
    assert tempo(_compress(manifest, cache, tiny_models, "--force")) == 2
    line = _one_error_line(capsys.readouterr().err, "cache_not_writable")
    assert str(cache) in line and "Read-only file system" in line
    assert calls[0] <= 4  # no retries with backoff, no attempt per item
    monkeypatch.undo()
    assert len(CacheReader(str(cache)).entries(complete_only=True)) == 4  # complete work kept


def test_disk_full_stops_at_once_with_one_line(tiny_models, tmp_path, capsys, monkeypatch):
    manifest = _corpus(tmp_path / "c", n_videos=2)
    cache = tmp_path / "cache.zarr"
    calls = _failing_local_set(monkeypatch, errno.ENOSPC, cache, after=2)  # the cache root is created, then the disk fills
    assert tempo(_compress(manifest, cache, tiny_models)) == 2
    line = _one_error_line(capsys.readouterr().err, "disk_full")
    assert str(cache) in line
    assert calls[0] <= 5
    monkeypatch.undo()
    summary = json.loads(Path(str(cache) + ".summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["code"] == "disk_full"


def test_permission_error_is_classified_with_its_path():
    from tempo_ops.errors import CacheNotWritable, DiskFull
    from tempo_ops.fs import RetryPolicy, retry_call, storage_error

    calls = []

    def put():
        calls.append(1)
        raise PermissionError(errno.EACCES, "Permission denied", "/data/cache/x")

    with pytest.raises(CacheNotWritable, match="/data/cache/x"):
        retry_call(put, policy=RetryPolicy(max_attempts=8, base_delay_s=1.0), what="put /data/cache/x")
    assert len(calls) == 1
    assert isinstance(storage_error(OSError(errno.ENOSPC, "No space left on device", "/d/f")), DiskFull)
    assert storage_error(OSError(errno.EACCES, "Permission denied", "/d/f"), "get /d/f") is None  # reads: per item
    assert storage_error(TimeoutError()) is None


# --------------------------------------------------------------------------- 13: --limit reads only what it needs
def test_limit_stops_reading_the_manifest_early(tiny_models, tmp_path, capsys, monkeypatch):
    from schemas import manifest as manifest_schema

    manifest = _corpus(tmp_path / "c", n_videos=2, extra_lines=["not json at all"] + [{"video_id": f"x{i}", "uri": "v0.mp4"} for i in range(50)])
    read = []
    real_lines = manifest_schema._lines

    def counting(url):
        for item in real_lines(url):
            read.append(item[0])
            yield item

    monkeypatch.setattr(manifest_schema, "_lines", counting)
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress(manifest, cache, tiny_models, "--limit", "1", "--dry-run")) == 0
    assert max(read) <= 2  # validation and planning stopped after the first entry
    plan = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["dry_run"]
    assert plan["videos"] == 1 and plan["entries"] == 2
    assert tempo(_compress(manifest, cache, tiny_models, "--dry-run")) == 2  # the whole file has line 3
    assert "line 3" in _one_error_line(capsys.readouterr().err, "manifest_invalid")


# --------------------------------------------------------------------------- 14: messages
def test_messages_say_what_happened(tmp_path):
    from tempo_ops import video
    from tempo_ops.errors import AbsurdDimensions, VideoReadError

    y4m = tmp_path / "huge.y4m"
    y4m.write_bytes(b"YUV4MPEG2 W100000 H100000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + b"\0" * 64)
    with pytest.raises(AbsurdDimensions, match="100000x100000"):
        video.probe_video(str(y4m))
    with pytest.raises(VideoReadError, match="cannot connect"):
        video.probe_video("http://127.0.0.1:9/clip.mp4")  # port 9 (discard): refused


# --------------------------------------------------------------------------- friction: counts, history, _generic
def test_counts_history_and_query_agnostic_entries(tiny_models, tmp_path, capsys):
    extra = [
        {"video_id": "missing", "uri": "missing.mp4", "queries": [{"query_id": "a", "text": "x?"}, {"query_id": "b", "text": "y?"}]},
        {"video_id": "plain", "uri": "v0.mp4"},  # no questions: the query-agnostic entry
    ]
    # 10 s at 2 fps: 20 sampled frames in segments of 8, 8 and 4 (not 3 * 8).
    manifest = _corpus(tmp_path / "c", n_videos=1, extra_lines=extra, n_frames=100)
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress(manifest, cache, tiny_models)) == 1
    s1 = json.loads(Path(str(cache) + ".summary.json").read_text())
    c = s1["counts"]
    assert (c["queries_planned"], c["queries_completed"], c["queries_failed"], c["queries_pending"]) == (5, 3, 2, 0)
    assert (c["videos_planned"], c["videos_failed"]) == (2, 1)
    assert s1["status"] == "items_failed" and s1["failures"]["by_code"] == {"video_not_found": 1}
    assert tempo(_compress(manifest, cache, tiny_models)) == 1
    s2 = json.loads(Path(str(cache) + ".summary.json").read_text())
    assert s2["run_id"] != s1["run_id"] and s2["counts"]["queries_skipped_complete"] == 3
    runs = Path(str(cache) + ".runs")
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        f"{s['run_id']}.{kind}" for s in (s1, s2) for kind in ("summary.json", "deadletter.jsonl")
    )
    assert json.loads((runs / f"{s1['run_id']}.summary.json").read_text()) == s1  # history is kept
    capsys.readouterr()

    out = tmp_path / "shards"
    assert tempo(_shards(cache, manifest, out)) == 0
    summary = json.loads((tmp_path / "shards.summary.json").read_text())
    assert summary["counts"]["query_agnostic"] == 1 and summary["counts"]["not_in_manifest"] == 0
    assert summary["counts"]["unannotated"] == 0 and summary["sets"]["64-ata"]["samples"] == 2
    # tokens per frame use the video's real number of sampled frames.
    from tempo_ops.store import CacheReader

    frames = len(CacheReader(str(cache)).video_meta("v0")["frame_indices"])
    assert frames == 20
    stats = json.loads((out / "64-ata" / "index.json").read_text())["stats"]
    assert stats["mean_tokens_per_frame"] == pytest.approx(stats["mean_tokens"] / frames)


def test_progress_line_has_totals_rate_and_eta():
    from pipelines.beam_support import format_progress

    line = format_progress({"done": 10, "total": 40, "blocks_done": 3, "blocks_total": 8, "videos_planned_done": 2}, "segments", 5.0)
    assert line == "10/40 segments (25%), 2.0 segments/s, ETA 15s, 5s elapsed | blocks 3/8, videos_planned 2"


def test_help_texts_say_what_options_do(capsys):
    with pytest.raises(SystemExit):
        tempo(["shards", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "uniform and its ignore it" in text
    assert "model" not in text.split("--local_mode", 1)[1]
    assert "--storage-option" in text


# --------------------------------------------------------------------------- friction: concurrent runs
def _foreign_lease(cache: Path, video_id: str, unit: int, *, pid: int) -> None:
    import socket

    from tempo_ops import leases

    url = leases.lease_url(str(cache), video_id, unit)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    Path(url).write_text(json.dumps({"run_id": "other-run", "host": socket.gethostname(), "pid": pid, "expires_at": time.time() + 600}))


def test_units_leased_by_another_run_are_left_to_it(tiny_models, tmp_path, capsys):
    from tempo_ops.store import CacheReader

    manifest = _corpus(tmp_path / "c", n_videos=2)
    cache = tmp_path / "cache.zarr"
    _foreign_lease(cache, "v1", 0, pid=os.getpid())  # a live process on this host holds v1's only unit
    assert tempo(_compress(manifest, cache, tiny_models)) == 0  # nothing failed: v1 is the other run's
    err = capsys.readouterr().err
    assert "another run (other-run" in err and "2 (video, query) entries are left for it" in err
    c = json.loads(Path(str(cache) + ".summary.json").read_text())["counts"]
    assert (c["units_held_elsewhere"], c["queries_left_to_other_run"], c["queries_completed"]) == (1, 2, 2)
    assert sorted(CacheReader(str(cache)).entries()) == [("v0", "q0"), ("v0", "q1")]
    assert [p.name for p in Path(str(cache) + ".leases").rglob("*.json")] == ["000000.json"]  # ours released

    _foreign_lease(cache, "v1", 0, pid=2**22 + 12345)  # beyond pid_max: a process that cannot exist
    assert tempo(_compress(manifest, cache, tiny_models)) == 0  # a lease of a dead process is taken over
    c = json.loads(Path(str(cache) + ".summary.json").read_text())["counts"]
    assert (c.get("units_held_elsewhere", 0), c["queries_completed"], c["queries_skipped_complete"]) == (0, 2, 2)
    assert not Path(str(cache) + ".leases").exists()


def test_lease_acquire_release():
    import socket

    from tempo_ops import leases

    cache = "memory://tempo-lease-test/cache.zarr"
    assert leases.acquire(cache, "a/b", 3, "run-1") is None
    held = leases.acquire(cache, "a/b", 3, "run-2")
    assert held is not None and held.run_id == "run-1" and held.host == socket.gethostname()
    assert leases.acquire(cache, "a/b", 3, "run-1") is None  # re-entrant for its own run
    leases.release(cache, "a/b", 3, "run-2")  # not its lease: kept
    assert leases.read_lease(leases.lease_url(cache, "a/b", 3)).run_id == "run-1"
    assert leases.release_run(cache, "run-1") == 1
    assert leases.acquire(cache, "a/b", 3, "run-2") is None
    expired = leases.Lease("run-3", "elsewhere", 1, time.time() - 1)
    assert not expired.live() and leases.Lease("run-3", "elsewhere", 1, time.time() + 60).live()


# --------------------------------------------------------------------------- friction: what partial re-runs reproduce
def test_query_computed_in_a_smaller_batch_is_equal_within_float16_tolerance(tiny_models, tmp_path):
    """A re-run that computes only some of a video's queries batches fewer of them through the
    model; batch composition may move values by float rounding (about 1 ulp of float16), so
    they are equal within that tolerance, not necessarily byte-identical (README, "Compress")."""
    import numpy as np

    from tempo_ops.store import CacheReader

    both = _corpus(tmp_path / "both", n_videos=1)
    reference = tmp_path / "reference.zarr"
    assert tempo(_compress(both, reference, tiny_models)) == 0
    lines = [json.loads(x) for x in both.read_text().splitlines()]
    lines[0]["queries"] = lines[0]["queries"][:1]  # first run: q0 only
    first = tmp_path / "both" / "first.jsonl"
    first.write_text(json.dumps(lines[0]) + "\n")
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress(first, cache, tiny_models)) == 0
    assert tempo(_compress(both, cache, tiny_models)) == 0  # q1 now computed alone
    ref, got = CacheReader(str(reference)), CacheReader(str(cache))
    for qid in ("q0", "q1"):
        a = ref.entry("v0", qid).read_all().astype(np.float32)
        b = got.entry("v0", qid).read_all().astype(np.float32)
        ulp = np.spacing(np.abs(a).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(a - b) <= 2 * ulp + 1e-7), qid
        np.testing.assert_allclose(ref.entry("v0", qid).relevance(), got.entry("v0", qid).relevance(), rtol=1e-3, atol=1e-4)
