"""Work units shared by the compression job (``tempo compress``) and the index job (``tempo index``).

Both jobs read a manifest, plan every video into work units of whole output shards,
spread the units over workers, load each unit's input (decode the video, or read the
segment index), run the model, write one block per unit and target, and finalise a target
only when every unit of it landed. The pieces here are that common skeleton; each job adds
its own planning targets and writers.

A *target* is what a unit's block is written for: a (video, query) cache entry, or the
video's index record (``INDEX_TARGET``). Unit statuses are keyed by ``(video_id, target,
version)``: ``version`` is the cache entry version a unit's blocks go to (tempo_ops/store.py),
None for the index record.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines.beam_support import (
    DEAD_LETTER,
    DeadLetter,
    ProgressReporter,
    ReadManifest,
    SharedModel,
    counter_values,
    dead_letter_counts,
    is_local_runner,
    runner_name,
)
from pipelines.job_support import JobInterrupted, JobRun, pending_interrupt
from schemas import manifest as manifest_schema
from tempo_ops import video

GENERIC_QUERY_ID = "_generic"  # videos without queries get one query-agnostic entry
INDEX_TARGET = "_index"  # the unit-status target of a video's index record (never a cache query id)
SOURCE_VIDEO = "video"
SOURCE_INDEX = "index"
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- elements
@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to load the compressor (picklable, small)."""

    svlm: str
    compressor: str | None
    seed: int
    device: str | None
    dtype: str | None
    max_batch_tokens: int
    torch_threads: int | None
    numerics: str | None = None  # None: reference for bf16, exact otherwise


@dataclass(frozen=True)
class WorkUnit:
    """A run of whole output shards of one video, for all of its pending targets.

    ``source`` says where the unit's input comes from: ``"video"`` (decode ``uri`` with
    ``plan``) or ``"index"`` (read the segments' features from the segment index).
    ``queries``: (target id, query text) pairs; ``versions``: the cache entry version each
    target's blocks go to (same order; empty for the index record).
    """

    video_id: str
    uri: str
    plan: Any  # video.VideoPlan (None for index units)
    unit_index: int
    n_units: int
    seg_start: int
    seg_stop: int
    queries: tuple[tuple[str, str], ...]
    source: str = SOURCE_VIDEO
    versions: tuple[str | None, ...] = ()

    def version_of(self, target: str) -> str | None:
        return dict(zip((q for q, _ in self.queries), self.versions)).get(target)

    def status_key(self, target: str) -> tuple[str, str, str | None]:
        """The key of this unit's status for ``target``: ``(video_id, target, version)``."""
        return (self.video_id, target, self.version_of(target))


def unit_ranges(n_segments: int, unit_segments: int) -> list[tuple[int, int]]:
    """Split ``n_segments`` into consecutive [start, stop) ranges of ``unit_segments`` (last may be short)."""
    return [(s, min(s + unit_segments, n_segments)) for s in range(0, n_segments, unit_segments)]


def landed_units(ranges: list[tuple[int, int]], missing: list[tuple[int, int]]) -> set[int]:
    """Indices of unit ``ranges`` that overlap none of the ``missing`` segment ranges."""
    return {i for i, (a, b) in enumerate(ranges) if not any(ma < b and a < mb for ma, mb in missing)}


def video_meta(entry, plan) -> dict:
    """Per-video attributes stored in the cache and the index (schemas/CACHE_LAYOUT.md)."""
    meta = plan.to_dict()
    meta["uri"] = entry.uri
    meta["metadata"] = entry.metadata
    return meta


def load_compressor(spec: ModelSpec):
    """Load the compressor described by ``spec`` (called once per worker process)."""
    import torch

    from tempo_ops.svlm.compressor import Compressor

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    return Compressor.from_pretrained(
        spec.svlm,
        memory_tokens=spec.compressor,
        seed=spec.seed,
        device=spec.device,
        dtype=spec.dtype,
        max_batch_tokens=spec.max_batch_tokens,
        numerics=spec.numerics,
    )


def dead(exc: BaseException, *, video_id: str, query_id: str | None, stage: str, **details):
    """A dead-letter tagged output for ``exc`` (the index target is reported as the video: query_id None)."""
    qid = None if query_id == INDEX_TARGET else query_id
    return beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.from_exception(exc, video_id=video_id, query_id=qid, stage=stage, **details))


def unit_failed(unit: WorkUnit, targets):
    """Markers telling the finaliser that a unit of these targets will not land (error already recorded)."""
    for t in targets:
        yield beam.pvalue.TaggedOutput("unit_status", (unit.status_key(t), ("failed", unit.unit_index, unit.n_units)))


def unit_landed(video_id: str, targets, unit_index: int, n_units: int, versions=None):
    """Markers for a unit that landed in an earlier run (skipped at planning); ``versions``: each
    target's entry version (None: the index record)."""
    for t, v in zip(targets, versions if versions is not None else [None] * len(targets)):
        yield beam.pvalue.TaggedOutput("unit_status", ((video_id, t, v), ("ok", unit_index, n_units)))


def units_held(statuses: list) -> bool:
    """Whether another run holds (computes) some of a target's units (status ``"held"``)."""
    return any(s == "held" for s, _, _ in statuses)


def statuses_problem(video_id: str, target: str, statuses: list) -> DeadLetter | bool | None:
    """What finalising should do with a target's unit statuses ``[(status, unit, n_units)]``.

    True: a unit failed (its dead letter is recorded where it failed); a DeadLetter: units
    never reported; None: try to finalise — every unit landed, or some are ``"held"`` by
    another run (then finalising raises EntryIncomplete unless that run already finished
    them: whichever run ends last finds them all landed).
    """
    n_units = statuses[0][2]
    if any(s == "failed" for s, _, _ in statuses):
        return True
    ok = {u for s, u, _ in statuses if s == "ok"}
    if not units_held(statuses) and len(ok) != n_units:
        missing = sorted(set(range(n_units)) - ok)
        qid = None if target == INDEX_TARGET else target
        return DeadLetter(video_id, qid, "finalize", "units_missing", f"{video_id}/{target}: units {missing} never landed")
    return None


def finalize_target(video_id: str, target: str, statuses: list, finalize: Callable[[], Any]) -> tuple[str, DeadLetter | None]:
    """Finalise a target from its unit statuses with ``finalize()`` (which writes its completion marker).

    Returns ``("done", None)``; ``("left", None)`` when units held by another run have not all
    landed yet (not a failure: whichever run ends last finalises); or ``("failed", letter)``,
    ``letter`` None when the failure was recorded where it happened.
    """
    from tempo_ops.errors import EntryIncomplete

    problem = statuses_problem(video_id, target, statuses)
    if problem is not None:
        return "failed", problem if isinstance(problem, DeadLetter) else None
    qid = None if target == INDEX_TARGET else target
    try:
        finalize()
    except EntryIncomplete as exc:
        if units_held(statuses):
            return "left", None
        return "failed", DeadLetter.from_exception(exc, video_id=video_id, query_id=qid, stage="finalize")
    except Exception as exc:  # noqa: BLE001 - one target's failure is isolated
        return "failed", DeadLetter.from_exception(exc, video_id=video_id, query_id=qid, stage="finalize")
    return "done", None


class ModelStageFn(beam.DoFn):
    """Base of the model stages: one compressor per worker process (``apache_beam.utils.shared``),
    and a failed unit → one dead letter per target plus its failed statuses."""

    def __init__(self, namespace: str, spec: ModelSpec, shared_handle: Any) -> None:
        self.spec = spec
        self.shared_handle = shared_handle
        self.model = None
        self.model_ms = Metrics.distribution(namespace, "model_ms")

    def setup(self) -> None:
        self.model = self.shared_handle.acquire(lambda: SharedModel(load_compressor(self.spec))).model

    @staticmethod
    def failed(unit: WorkUnit, exc: BaseException) -> Iterator:
        targets = [t for t, _ in unit.queries]
        for t in targets:
            yield dead(exc, video_id=unit.video_id, query_id=t, stage="model", unit=unit.unit_index)
        yield from unit_failed(unit, targets)


class LoadUnitFn(beam.DoFn):
    """WorkUnit → (WorkUnit, payload): decoded ``[Segment]`` (the CPU stage), or ``[SegmentFeatures]``
    read from the segment index for index units (no video read, no decode).

    With ``lease_base`` (the job's output URL) it first takes the unit's lease
    (tempo_ops/leases.py): a unit another live run holds is left to it (status ``"held"``).
    """

    def __init__(
        self,
        namespace: str,
        sampling: video.SamplingConfig,
        convert_threads: int | None = None,
        index_url: str | None = None,
        *,
        lease_base: str | None = None,
        run_id: str = "",
        label: str = "compress",
    ) -> None:
        self.sampling = sampling
        self.convert_threads = convert_threads
        self.index_url = index_url
        self.lease_base = lease_base
        self.run_id = run_id
        self.label = label
        self.index = None
        self.decode_ms = Metrics.distribution(namespace, "decode_ms")
        self.decoded = Metrics.counter(namespace, "segments_decoded")
        self.index_ms = Metrics.distribution(namespace, "index_read_ms")
        self.read = Metrics.counter(namespace, "segments_read_from_index")
        self.held = Metrics.counter(namespace, "units_held_elsewhere")
        self._told: set[str] = set()

    def setup(self) -> None:
        if self.index_url is not None:
            from tempo_ops.index_store import IndexReader

            self.index = IndexReader(self.index_url)

    def _held_by(self, unit: WorkUnit):
        """The live lease of another run computing ``unit``, or None once this run holds it."""
        if self.lease_base is None:
            return None
        from tempo_ops import leases

        holder = leases.acquire(self.lease_base, unit.video_id, unit.unit_index, self.run_id)
        if holder is not None and holder.run_id not in self._told:
            self._told.add(holder.run_id)
            print(
                f"[{self.label}] another run ({holder.run_id}, pid {holder.pid} on {holder.host}) is computing part of "
                f"this output; its work units are left to it",
                file=sys.stderr,
                flush=True,
            )
        return holder

    def process(self, unit: WorkUnit) -> Iterator:
        targets = [q for q, _ in unit.queries]
        try:
            holder = self._held_by(unit)
        except Exception as exc:  # noqa: BLE001 - a lease that cannot be taken fails the unit like a read would
            yield dead(exc, video_id=unit.video_id, query_id=None, stage="lease", unit=unit.unit_index)
            yield from unit_failed(unit, targets)
            return
        if holder is not None:
            self.held.inc()
            for t in targets:
                yield beam.pvalue.TaggedOutput("unit_status", (unit.status_key(t), ("held", unit.unit_index, unit.n_units)))
            return
        t0 = time.perf_counter()
        from_index = unit.source == SOURCE_INDEX
        try:
            if from_index:
                payload = self.index.video(unit.video_id).features(unit.seg_start, unit.seg_stop)
            else:
                payload = list(
                    video.iter_segments(
                        unit.uri,
                        self.sampling,
                        plan=unit.plan,
                        segments=range(unit.seg_start, unit.seg_stop),
                        convert_threads=self.convert_threads,
                    )
                )
        except Exception as exc:  # noqa: BLE001
            yield dead(exc, video_id=unit.video_id, query_id=None, stage="index_read" if from_index else "decode", unit=unit.unit_index)
            yield from unit_failed(unit, targets)
            return
        signum = pending_interrupt()
        if signum is not None:  # a signal swallowed in PyAV's I/O callbacks may have cut the decode short
            raise JobInterrupted(signum)
        ms = int((time.perf_counter() - t0) * 1000)
        (self.index_ms if from_index else self.decode_ms).update(ms)
        (self.read if from_index else self.decoded).inc(len(payload))
        yield unit, payload


# --------------------------------------------------------------------------- graph pieces
def read_entries(pipeline: beam.Pipeline, manifest: str, limit: int | None):
    """Manifest → parsed VideoEntry elements (reading stops after the first ``limit`` entries)."""
    return pipeline | "ReadManifest" >> ReadManifest(manifest, limit)


# --------------------------------------------------------------------------- driver
def validate_manifest_or_raise(url: str, limit: int | None = None) -> None:
    """Stream-validate the manifest, or only its first ``limit`` entries (reading stops there);
    raise ManifestError listing every problem. Nothing is kept in memory but id hashes."""
    problems = manifest_schema.validate_manifest(url, limit=limit)
    if problems:
        raise manifest_schema.manifest_error(url, problems)


def run_pipeline(label: str, options, build: Callable[[beam.Pipeline], None], run: JobRun, *, lease_base: str | None = None):
    """Build and run a job under ``run`` (SIGINT/SIGTERM → partial summary, fatal errors typed);
    return the finished result, or None when submitted to a cluster.

    The progress tally of ``label`` is reset first and is the partial summary's
    ``counts_so_far``; with ``lease_base`` this run's work-unit leases are released at the end
    (those of units that failed) and on interruption.
    """
    from tempo_ops import leases

    ProgressReporter.reset(label)
    release = (lambda: leases.release_run(lease_base, run.run_id)) if lease_base is not None else None
    with run.interruptible(partial=lambda: {"counts_so_far": ProgressReporter.snapshot(label), "output": run.base}, cleanup=release):
        pipeline = beam.Pipeline(options=options)
        build(pipeline)
        result = pipeline.run()
        if not is_local_runner(options):
            print(f"[{label}] submitted to {runner_name(options)}; the summary is written by local runs only", file=sys.stderr)
            return None
        result.wait_until_finish()
    if release is not None:
        release()
    return result


def write_summary(
    namespace: str,
    result,
    *,
    run: JobRun,
    runner: str,
    outputs: dict[str, Any],
    config: dict,
    fingerprint: str,
    counts: Callable[[dict[str, int]], dict[str, int]] | None = None,
) -> dict:
    """Gather metrics + this run's dead letters into the run summary and write it beside the
    job's output (``run.base``: history + latest, pipelines/job_support.py).

    ``outputs``: job-specific fields (``manifest``, ``cache``, ``index``...); ``counts``
    derives job-specific counts from the metric counts.
    """
    wall = run.elapsed()
    metrics = counter_values(result, namespace)
    failures = dead_letter_counts(run.own_dead_letter_url)
    segments = int(metrics.get("segments_decoded", 0) + metrics.get("segments_read_from_index", 0))
    counted = {k: int(v) for k, v in sorted(metrics.items()) if not k.endswith("_ms")}
    summary = {
        "runner": runner,
        **outputs,
        "dead_letter_file": run.dead_letter_url,
        "run_dead_letter_file": run.own_dead_letter_url,
        "summary_file": run.summary_url,
        "fingerprint": fingerprint,
        "config": config,
        "counts": counts(counted) if counts is not None else counted,
        "failures": {"items": sum(failures.values()), "by_code": failures},
        "timing": {
            "wall_s": round(wall, 3),
            "decode_s": round(metrics.get("decode_ms", 0) / 1000, 3),
            "index_read_s": round(metrics.get("index_read_ms", 0) / 1000, 3),
            "model_s": round(metrics.get("model_ms", 0) / 1000, 3),
            "segments_per_s": round(segments / wall, 3) if wall > 0 else None,
        },
    }
    return run.write_summary(summary, status="complete" if not failures else "items_failed")


def print_failures(label: str, summary: dict) -> None:
    f = summary["failures"]
    if f["items"]:
        print(f"[{label}] {f['items']} failed item(s) by code {f['by_code']}: see {summary['dead_letter_file']}", file=sys.stderr)
    print(f"[{label}] summary: {summary['summary_file']} (history: {summary['history']})", file=sys.stderr)
