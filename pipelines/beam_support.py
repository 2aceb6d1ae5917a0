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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from tempo_ops.errors import ConfigError, TempoError

LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
# Runners that run on this machine; everything else is a remote cluster.
_LOCAL_RUNNER_NAMES = {"FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", LOCAL_RUNNER}
_PRISM_FIRST = {"DirectRunner", "SwitchingDirectRunner", "PrismRunner"}

logger = logging.getLogger(__name__)


LOCAL_MODES = {"threads": "multi_threading", "processes": "multi_processing"}


def add_runner_arguments(parser, *, default_mode: str = "threads") -> None:
    """Options of ours that shape the local run (Beam's own options pass through untouched)."""
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
        help="with --local_workers > 1: worker threads in this process (one shared model) or worker "
        "subprocesses (default %(default)s). Ignored on clusters.",
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
        """Typed errors keep their code; anything else is an internal error with its type named."""
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


class WriteDeadLetters(beam.PTransform):
    """Merge dead letters per item and write them as one JSON Lines file ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def expand(self, letters):
        return (
            letters
            | "KeyByItem" >> beam.Map(lambda d: ((d.video_id, d.query_id), d))
            | "GroupByItem" >> beam.GroupByKey()
            | "MergePerItem" >> beam.Map(merge_dead_letters)
            | "ToJson" >> beam.Map(DeadLetter.to_json)
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="", num_shards=1)
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
    """Write a run summary (or any JSON document) to a local path or fsspec URL."""
    import fsspec

    with fsspec.open(url, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


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
    """Rate-limited progress lines on stderr (one per ``interval_s`` per process).

    Local runs show them live; on clusters they land in the worker logs.
    """

    def __init__(self, label: str, interval_s: float | None = None) -> None:
        self.label = label
        # TEMPO_PROGRESS_INTERVAL_S=0 prints every update (tests, debugging).
        self.interval_s = float(os.environ.get("TEMPO_PROGRESS_INTERVAL_S", "5")) if interval_s is None else interval_s
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()
        self._last = 0.0

    def add(self, **increments: int) -> None:
        for name, inc in increments.items():
            self.counts[name] = self.counts.get(name, 0) + inc
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            elapsed = now - self.started
            parts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            rate = self.counts.get("segments", 0) / elapsed if elapsed > 0 else 0.0
            print(f"[{self.label}] {parts} ({rate:.1f} segments/s, {elapsed:.0f}s)", file=sys.stderr, flush=True)
