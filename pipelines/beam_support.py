"""Beam plumbing shared by the jobs: runner choice, dead-letter records, metrics, run summaries.

Local runner choice (measured; see README "Runners"): Beam's default runner and
``DirectRunner`` first try to *download* the Prism runner binary, which must never happen
offline, so when no ``--runner`` is given we pick the portable ``FnApiRunner`` by its full
name. With one local worker it runs in-process (``in_memory``: no extra torch import, the
model is shared through ``apache_beam.utils.shared``). With ``--local_workers N > 1``:
``--local_mode threads`` runs N worker threads in this process (``multi_threading``: one
model in memory, shared by all; decoding and torch release the GIL), ``--local_mode
processes`` runs N SDK-harness subprocesses (``multi_processing``), each paying the torch
import and model load once (for pure-Python work that holds the GIL).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipelines.job_support import JobInterrupted, pending_interrupt
from tempo_ops.errors import ConfigError, TempoError
from tempo_ops.fs import storage_error

LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
# Runners that run on this machine; everything else is a remote cluster.
_LOCAL_RUNNER_NAMES = {"FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", LOCAL_RUNNER}
_PRISM_FIRST = {"DirectRunner", "SwitchingDirectRunner", "PrismRunner"}

logger = logging.getLogger(__name__)


LOCAL_MODES = {"threads": "multi_threading", "processes": "multi_processing"}


def add_runner_arguments(parser, *, default_mode: str = "threads", loads_model: bool = True) -> None:
    """Options of ours that shape the local run (Beam's own options pass through untouched)."""
    threads_help = "worker threads in this process (sharing one model)" if loads_model else "worker threads in this process"
    procs_help = "worker subprocesses (each loads the model once)" if loads_model else "worker subprocesses"
    parser.add_argument(
        "--local_workers",
        type=int,
        default=1,
        help="workers for the local FnApiRunner (1 = in-process). Ignored on clusters.",
    )
    parser.add_argument(
        "--local_mode",
        choices=sorted(LOCAL_MODES),
        default=default_mode,
        help=f"with --local_workers > 1: threads = {threads_help}, processes = {procs_help} "
        "(default %(default)s). Ignored on clusters.",
    )


def pipeline_options_from_args(
    extra_args: list[str], *, job_name: str, local_workers: int = 1, local_mode: str = "threads"
) -> PipelineOptions:
    """Build PipelineOptions from pass-through Beam arguments, defaulting to an offline local runner.

    ``extra_args`` are Beam's own flags (``--runner=DataflowRunner --project=...``). Without
    ``--runner`` the job runs locally on ``FnApiRunner`` with ``local_workers`` workers, as
    threads or subprocesses (``local_mode``, see :data:`LOCAL_MODES`).
    """
    if local_workers < 1:
        raise ConfigError(f"--local_workers must be >= 1, got {local_workers}")
    if local_mode not in LOCAL_MODES:
        raise ConfigError(f"--local_mode must be one of {', '.join(sorted(LOCAL_MODES))}, got {local_mode!r}")
    options = PipelineOptions(list(extra_args))
    std = options.view_as(StandardOptions)
    if std.runner is None:
        std.runner = LOCAL_RUNNER
        direct = options.view_as(DirectOptions)
        direct.direct_num_workers = local_workers
        direct.direct_running_mode = "in_memory" if local_workers == 1 else LOCAL_MODES[local_mode]
    elif runner_name(options) in _PRISM_FIRST:
        logger.warning(
            "--runner=%s tries to download the Prism runner first; offline, prefer omitting --runner "
            "(FnApiRunner) or --runner=%s",
            std.runner,
            LOCAL_RUNNER,
        )
    gcp = options.view_as(beam.options.pipeline_options.GoogleCloudOptions)
    gcp.job_name = gcp.job_name or job_name
    # Workers import our package, not the driver's __main__.
    options.view_as(beam.options.pipeline_options.SetupOptions).save_main_session = False
    return options


def runner_name(options: PipelineOptions) -> str:
    """The runner's short class name (``DataflowRunner``, ``FnApiRunner``...)."""
    return str(options.view_as(StandardOptions).runner or LOCAL_RUNNER).rsplit(".", 1)[-1]


def is_local_runner(options: PipelineOptions) -> bool:
    return runner_name(options) in _LOCAL_RUNNER_NAMES


class SharedModel:
    """Weak-referenceable holder of a model for ``apache_beam.utils.shared.Shared`` (one per worker process)."""

    def __init__(self, model) -> None:
        self.model = model


# --------------------------------------------------------------------------- inputs
class ReadManifest(beam.PTransform):
    """The manifest's entries (``schemas.manifest.VideoEntry``), read through fsspec like every other input.

    Streams the file (``--storage-option`` and fsspec configuration apply, unlike Beam's own
    GCS client), stops after ``limit`` entries, then spreads the entries over workers
    (``Reshuffle``) so per-video work does not stay on the one worker that read the file.
    Validate first (``schemas.manifest.validate_manifest``): an invalid line fails the job.
    """

    def __init__(self, url: str, limit: int | None = None) -> None:
        super().__init__()
        self.url = url
        self.limit = limit

    def expand(self, pbegin):
        from schemas import manifest as manifest_schema

        limit = self.limit
        return (
            pbegin
            | "ManifestUrl" >> beam.Create([self.url])
            | "Entries" >> beam.FlatMap(lambda url: manifest_schema.iter_manifest(url, limit=limit))
            | "SpreadEntries" >> beam.Reshuffle()
        )


# --------------------------------------------------------------------------- dead letters
DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class DeadLetter:
    """One failed item: a video (query_id None) or a (video, query) pair."""

    video_id: str
    query_id: str | None
    stage: str
    code: str
    message: str
    attempt: int = 1
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException, *, video_id: str, query_id: str | None, stage: str, **details: Any):
        """Typed errors keep their code; anything else is an internal error with its type named.

        Fatal storage errors (full disk, read-only or forbidden output: ``tempo_ops.fs.storage_error``)
        are raised instead: no later item could succeed, so the job stops at once. So is the
        interrupt of a job that received SIGINT/SIGTERM (``pending_interrupt``): the failure may
        be the signal itself, swallowed by a library's callback, and the item is not known bad.
        """
        signum = pending_interrupt()
        if signum is not None:
            raise JobInterrupted(signum) from exc
        fatal = storage_error(exc)
        if fatal is not None:
            raise fatal from (None if fatal is exc else exc)
        if isinstance(exc, TempoError):
            return cls(video_id, query_id, stage, exc.code, str(exc), details=details)
        return cls(video_id, query_id, stage, f"internal_{type(exc).__name__}", f"{video_id}: {exc!r}", details=details)

    def to_json(self) -> str:
        return json.dumps(
            {
                "video_id": self.video_id,
                "query_id": self.query_id,
                "stage": self.stage,
                "code": self.code,
                "message": self.message,
                "attempt": self.attempt,
                "details": self.details,
            },
            sort_keys=True,
        )


def merge_dead_letters(key_and_letters: tuple[Any, Iterable[DeadLetter]]) -> DeadLetter:
    """Several failures of one item (e.g. two work units of one video) become one record.

    The first failure by (stage order, code) is kept; ``details.failures`` counts them.
    """
    _key, letters = key_and_letters
    letters = sorted(letters, key=lambda d: (d.stage, d.code, d.message))
    first = letters[0]
    details = dict(first.details)
    details["failures"] = len(letters)
    return DeadLetter(first.video_id, first.query_id, first.stage, first.code, first.message, first.attempt, details)


def dead_letters_jsonl(letters: Iterable[DeadLetter]) -> bytes:
    """Dead letters as JSON Lines, sorted by item (stable across runs and runners)."""
    lines = sorted(d.to_json() for d in letters)
    return "".join(line + "\n" for line in lines).encode()


def write_dead_letter_file(
    base: str, run_id: str, letters: Iterable[DeadLetter], storage_options: dict | None = None, *, inside: bool = False
) -> int:
    """Write this run's dead letters (history + latest copy, see pipelines/job_support.py); returns how many."""
    from pipelines.job_support import write_sidecar

    letters = list(letters)
    write_sidecar(base, "deadletter.jsonl", dead_letters_jsonl(letters), run_id, storage_options, inside=inside)
    return len(letters)


class WriteDeadLetters(beam.PTransform):
    """Merge dead letters per item and write them, by one writer, beside ``base`` (whole files).

    The file is written even when there are none (an empty file: this run had no failures).
    Written through fsspec like every other output, so it works on every store (Beam's
    ``WriteToText`` batch-copies through its own GCS client, which the emulator refuses, and
    leaves ``beam-temp-*`` folders behind when interrupted).
    """

    def __init__(
        self, base: str, run_id: str | None = None, storage_options: dict | None = None, *, inside: bool = False
    ) -> None:
        """``base`` + ``run_id``: history + latest files beside ``base`` (inside it with ``inside``);
        without ``run_id``, ``base`` is the one file to write (no history)."""
        super().__init__()
        self.base = base
        self.run_id = run_id
        self.storage_options = storage_options
        self.inside = inside

    def expand(self, letters):
        base, run_id, opts, inside = self.base, self.run_id, self.storage_options, self.inside

        def write(ls: list[DeadLetter]) -> int:
            if run_id is None:
                from tempo_ops.fs import write_bytes_atomic

                write_bytes_atomic(base, dead_letters_jsonl(ls), opts)
                return len(ls)
            return write_dead_letter_file(base, run_id, ls, opts, inside=inside)

        return (
            letters
            | "KeyByItem" >> beam.Map(lambda d: ((d.video_id, d.query_id), d))
            | "GroupByItem" >> beam.GroupByKey()
            | "MergePerItem" >> beam.Map(merge_dead_letters)
            | "AllInOne" >> beam.combiners.ToList()
            | "Write" >> beam.Map(write)
        )


def dead_letter_counts(path: str) -> dict[str, int]:
    """Failed items by error code in a dead-letter JSON Lines file (empty when there is none)."""
    import fsspec

    counts: dict[str, int] = {}
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    code = json.loads(line)["code"]
                    counts[code] = counts.get(code, 0) + 1
    except FileNotFoundError:
        pass
    return counts


def write_json(url: str, doc: dict[str, Any]) -> None:
    """Write a JSON document whole (temporary file + rename locally, one PUT remotely).

    Run summaries go through ``pipelines.job_support.JobRun.write_summary`` (history + latest).
    """
    from tempo_ops.fs import write_bytes_atomic

    write_bytes_atomic(url, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- metrics / progress
def counter_values(result, namespace: str) -> dict[str, float]:
    """Committed (or attempted, where the runner commits none) counter and distribution sums by name."""
    values: dict[str, float] = {}
    try:
        metrics = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace))
    except Exception:  # noqa: BLE001 - some runners expose no metrics; the summary says so
        return values
    for kind in ("counters", "distributions"):
        for m in metrics.get(kind, []):
            value = m.committed if m.committed is not None else m.attempted
            if kind == "distributions":
                value = value.sum if value is not None else 0
            values[m.key.metric.name] = values.get(m.key.metric.name, 0) + (value or 0)
    return values


class ProgressReporter:
    """Rate-limited progress lines on stderr (at most one per ``interval_s`` per process).

    ``add(done=..., total=...)`` counts work in one named ``unit``; other keyword counts are
    shown as they are. A line reads ``[compress] 12/40 segments (30%), 2.5 segments/s, ETA
    11s, 5s elapsed | entries 2/4`` (the total grows while planning is still going on; the
    ETA assumes the current rate). Reporters of one label share one tally per process, so a
    planning step and a writing step of a local run report one total.
    Local runs show them live; on clusters they land in the worker logs.
    """

    _tallies: dict[str, dict[str, int]] = {}
    _units: dict[str, str] = {}
    _lock = threading.Lock()

    def __init__(self, label: str, unit: str = "segments", interval_s: float | None = None) -> None:
        self.label = label
        self.unit = unit
        # TEMPO_PROGRESS_INTERVAL_S=0 prints every update (tests, debugging).
        self.interval_s = float(os.environ.get("TEMPO_PROGRESS_INTERVAL_S", "5")) if interval_s is None else interval_s
        with self._lock:
            self.counts = self._tallies.setdefault(label, {})
            self._units.setdefault(label, unit)
        self.started = time.monotonic()
        self._last = 0.0

    @classmethod
    def snapshot(cls, label: str) -> dict[str, int]:
        """This process's counts for ``label`` (partial summaries of interrupted runs), ``done``/``total``
        named by their unit (``segments_done``)."""
        with cls._lock:
            unit = cls._units.get(label, "items")
            return {(f"{unit}_{k}" if k in ("done", "total") else k): v for k, v in cls._tallies.get(label, {}).items()}

    @classmethod
    def reset(cls, label: str) -> None:
        with cls._lock:
            cls._tallies.pop(label, None)

    def add(self, *, quiet: bool = False, **increments: int) -> None:
        with self._lock:
            for name, inc in increments.items():
                self.counts[name] = self.counts.get(name, 0) + inc
            counts = dict(self.counts)
        now = time.monotonic()
        if not quiet and now - self._last >= self.interval_s:
            self._last = now
            print(f"[{self.label}] {format_progress(counts, self.unit, now - self.started)}", file=sys.stderr, flush=True)


def format_progress(counts: dict[str, int], unit: str, elapsed: float) -> str:
    """One progress line from counts ``done``/``total`` (in ``unit``) and ``<name>_done``/``<name>_total`` pairs."""
    done, total = counts.get("done", 0), counts.get("total", 0)
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{done}/{total} {unit}" + (f" ({100 * done / total:.0f}%)" if total else "")]
    parts.append(f"{rate:.1f} {unit}/s")
    if rate > 0 and total >= done:
        parts.append(f"ETA {(total - done) / rate:.0f}s")
    parts.append(f"{elapsed:.0f}s elapsed")
    extra = sorted({k.rsplit("_", 1)[0] for k in counts if k.endswith(("_done", "_total"))})
    plain = sorted(k for k in counts if k not in ("done", "total") and not k.endswith(("_done", "_total")))
    more = [f"{name} {counts[name]}" for name in plain] + [
        f"{name} {counts.get(name + '_done', 0)}/{counts[name + '_total']}" if name + "_total" in counts
        else f"{name} {counts.get(name + '_done', 0)}"
        for name in extra
    ]
    return ", ".join(parts) + (" | " + ", ".join(more) if more else "")
