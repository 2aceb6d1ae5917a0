"""SIGINT and SIGTERM during ``tempo compress`` (a subprocess, as a user's Ctrl-C or a scheduler's kill):
one line, exit 130 / 143, a partial summary marked interrupted, temporary folders removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_job_behaviour import _compress, _corpus

from pipelines.cli import main as tempo

REPO = Path(__file__).resolve().parents[1]


def slow_after_first_call(module: str, name: str) -> str:
    """A ``python -c`` program running the tempo CLI (its arguments) with ``module.name`` sleeping
    60 s from its second call on: the job is busy when a test signals it after the first."""
    return f"""
import sys, time
import {module} as target
real, calls = target.{name}, []
def slow(*a, **k):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(60)
    return real(*a, **k)
target.{name} = slow
from pipelines.cli import main
sys.exit(main())
"""


def _run_until(cmd: list[str], trigger: str, sig: int, env: dict) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if trigger in line:
                proc.send_signal(sig)
                break
        rest = proc.stderr.read()
    finally:
        proc.wait(timeout=120)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_job_with_one_line_and_a_partial_summary(tiny_models, tmp_path, sig):
    manifest = _corpus(tmp_path / "c", n_videos=4)
    cache = tmp_path / "cache.zarr"
    stale = tmp_path / "beam-temp-cache.zarr.deadletter.jsonl-0123abcd"
    stale.mkdir()  # left by an interrupted run of an older version
    env = dict(os.environ, PYTHONUNBUFFERED="1", TEMPO_PROGRESS_INTERVAL_S="0")
    cmd = [sys.executable, "-m", "pipelines.cli", *_compress(manifest, cache, tiny_models)]
    rc, err = _run_until(cmd, "blocks 1/", sig, env)
    assert rc == 128 + sig, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == f"tempo compress: interrupted by {signal.Signals(sig).name}; completed work is kept, re-run to resume"
    summary = json.loads(Path(str(cache) + ".summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(sig).name
    assert summary["counts_so_far"]["blocks_done"] >= 1
    assert not list(tmp_path.glob("beam-temp-*"))  # stale and new temporary folders gone
    if sig == signal.SIGTERM:  # resume completes the rest (the same machinery for both signals)
        assert tempo(_compress(manifest, cache, tiny_models)) == 0
        done = json.loads(Path(str(cache) + ".summary.json").read_text())
        assert done["counts"]["queries_completed"] + done["counts"]["queries_skipped_complete"] == 8


def test_sigterm_ends_tempo_index_the_same_way(tiny_models, tmp_path):
    """`tempo index` runs under the same JobRun (pipelines/units.run_pipeline): one line, 143,
    a partial summary with the progress so far, its leases released, and a resumable index."""
    manifest = _corpus(tmp_path / "c", n_videos=4)
    index = tmp_path / "index.zarr"
    args = ["index", "--manifest", str(manifest), "--index", str(index), "--svlm", tiny_models["svlm"],
            "--compressor", tiny_models["tempo"], "--unit-segments", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TEMPO_PROGRESS_INTERVAL_S="0")
    rc, err = _run_until([sys.executable, "-m", "pipelines.cli", *args], "units 1/", signal.SIGTERM, env)
    assert rc == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "tempo index: interrupted by SIGTERM; completed work is kept, re-run to resume"
    summary = json.loads(Path(str(index) + ".summary.json").read_text())
    assert summary["job"] == "index" and summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert summary["counts_so_far"]["units_done"] >= 1
    assert not list(Path(str(index) + ".leases").rglob("*.json"))  # released on the way out
    assert tempo(args) == 0
    done = json.loads(Path(str(index) + ".summary.json").read_text())["counts"]
    assert done["videos_completed"] + done.get("videos_skipped_complete", 0) == 4


def test_interrupt_swallowed_by_a_library_callback_still_stops_the_job(tmp_path, capsys):
    """The handler raises JobInterrupted wherever the main thread is; inside a C library's
    callback (PyAV's I/O) it is swallowed and the library reports its own error. The job must
    still stop as interrupted, dead-letter nothing as bad, and print no traceback for it."""
    from types import SimpleNamespace

    from pipelines.beam_support import DeadLetter
    from pipelines.job_support import JobInterrupted, JobRun, pending_interrupt
    from tempo_ops.errors import CorruptVideo

    base = tmp_path / "cache.zarr"
    run = JobRun.start("compress", str(base))
    seen_by_outer_hook = []
    outer_hook, sys.unraisablehook = sys.unraisablehook, seen_by_outer_hook.append
    outer_excepthook, sys.excepthook = sys.excepthook, lambda *exc: seen_by_outer_hook.append(exc[1])
    try:
        with pytest.raises(JobInterrupted) as info:
            with run.interruptible(partial=lambda: {"counts_so_far": {"blocks_done": 1}}):
                try:
                    signal.raise_signal(signal.SIGINT)  # the handler raises here...
                except JobInterrupted:
                    pass  # ...and the library swallows it, reporting it as unraisable
                assert pending_interrupt() == signal.SIGINT
                sys.unraisablehook(SimpleNamespace(exc_value=JobInterrupted(signal.SIGINT)))
                other = SimpleNamespace(exc_value=ValueError("a real unraisable error"))
                sys.unraisablehook(other)
                sys.excepthook(JobInterrupted, JobInterrupted(signal.SIGINT), None)  # PyAV prints its traceback so
                real_error = RuntimeError("a real error")
                sys.excepthook(RuntimeError, real_error, None)
                # the library's error for the item it was reading: the interrupt, not a bad item
                DeadLetter.from_exception(CorruptVideo("seek failed", item="v"), video_id="v", query_id=None, stage="decode")
                pytest.fail("a failure during an interrupt must not become a dead letter")
    finally:
        sys.unraisablehook, sys.excepthook = outer_hook, outer_excepthook
    assert info.value.signum == signal.SIGINT
    assert seen_by_outer_hook == [other, real_error]  # only JobInterrupted is silenced, and only during the job
    summary = json.loads(Path(str(base) + ".summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert pending_interrupt() is None  # cleared when the job's handlers are removed
    letter = DeadLetter.from_exception(CorruptVideo("seek failed", item="v"), video_id="v", query_id=None, stage="decode")
    assert letter.code == "corrupt_container"  # with no interrupt pending it is a dead letter again
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_inside_pyav_io_ends_compress_as_interrupted_not_corrupt(tiny_models, tmp_path):
    """End to end: SIGINT arriving while PyAV runs its Python I/O callback (a seek), where
    PyAV swallows the exception, still ends `tempo compress` with one line and exit 130; the
    video it was reading is not dead-lettered as a corrupt container."""
    manifest = _corpus(tmp_path / "c", n_videos=4)
    cache = tmp_path / "cache.zarr"
    program = """
import os, signal, sys, threading, time
import fsspec.implementations.local as local
real, calls = local.LocalFileOpener.seek, []
def seek(self, *a, **k):
    calls.append(1)
    if len(calls) == 3 and threading.current_thread() is threading.main_thread():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here, inside PyAV's callback
    return real(self, *a, **k)
local.LocalFileOpener.seek = seek
from pipelines.cli import main
sys.exit(main())
"""
    cmd = [sys.executable, "-c", program, *_compress(manifest, cache, tiny_models)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TEMPO_PROGRESS_INTERVAL_S="0")
    proc = subprocess.run(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, timeout=300)
    err = proc.stderr
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == "tempo compress: interrupted by SIGINT; completed work is kept, re-run to resume"
    letters = Path(str(cache) + ".deadletter.jsonl")
    assert not letters.exists() or "corrupt_container" not in letters.read_text()
    assert json.loads(Path(str(cache) + ".summary.json").read_text())["status"] == "interrupted"
    assert tempo(_compress(manifest, cache, tiny_models)) == 0  # the re-run completes every entry
    done = json.loads(Path(str(cache) + ".summary.json").read_text())["counts"]
    assert done["queries_completed"] + done["queries_skipped_complete"] == 8
