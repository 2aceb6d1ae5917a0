"""The compression job: corpus manifest → complete Zarr token cache (``tempo compress``).

Graph (each step adapts a pure function of ``tempo_ops``)::

    ReadManifest       (fsspec, streamed, stops after --limit entries; Reshuffle to spread them)
      → PlanVideo        (probe, sample, segment; skip complete (video, query) pairs; write video
                          metadata; create entries; fan out work units of whole cache shards)
      → Reshuffle        (fuse break: units of one long video spread over workers)
      → LoadUnit         (take the unit's lease; CPU stage: fetch + decode + resize the unit's
                          segments, or read their features from the segment index)
      → CompressUnit     (model stage: every query of every segment through the shared prefix)
      → WriteBlock       (one writer per cache shard: unit boundaries are shard boundaries)
      → GroupByKey(video, query, version) → FinalizeEntry (verify, then switch the entry to the
                          version, only when every unit landed)
    every step's failures → dead letters → merged per item → one writer → ``<cache>.deadletter.jsonl``
    (and ``<cache>.runs/<run_id>.deadletter.jsonl``; summaries likewise, see pipelines/job_support.py)

Fatal storage errors (``disk_full``, ``cache_not_writable``) stop the job at once with one
line (exit 2); SIGINT/SIGTERM stop it with one line (exit 130/143) and a partial summary.
Complete entries are never touched by either.

Model loading: a DoFn ``setup`` that takes the compressor from ``apache_beam.utils.shared``
(one model per worker process, shared by its threads). We do not use ``RunInference``:
its ``BatchElements`` batches by element count, while our element is a work unit whose
segments × queries the compressor already batches by token cost through the shared-prefix
path; a ModelHandler would only wrap the same call.

Re-runs: complete (video, query) pairs computed from the same inputs (query text, prompt
template, video identity, configuration) are skipped at planning after a quick integrity check
(metadata, shard indexes, relevance); incomplete ones resume; stale ones (inputs changed) are
recomputed ("stale, recomputed" in the summary); corrupt ones are dead-lettered
(``cache_corrupt``) unless ``--repair`` is given, which checks every chunk's crc32c and
recomputes what is corrupt. ``--force`` recomputes everything. Every recomputation writes a new
version beside the complete one and switches over when it is complete (readers never see a gap).
The same planning (``cache_entry_statuses``, ``begin_cache_entries``) serves ``--from-index``
runs and ``tempo index --cache``.

``--from-index I``: plan from the segment index's video records instead of probing, and load
each unit's ``SegmentFeatures`` from the index instead of decoding (``LoadUnit``); the model
stage then runs only the language model (``Compressor.compress_from_features``). Videos the
index lacks are dead-lettered (``video_not_indexed``), or planned and decoded from the video
with ``--fallback-video``. The skeleton (units, loading, dead letters, summary) is shared with
``tempo index`` in ``pipelines/units.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipelines import units
from pipelines.beam_support import (
    DEAD_LETTER,
    ProgressReporter,
    SharedModel,
    WriteDeadLetters,
    add_runner_arguments,
    is_local_runner,
    pipeline_options_from_args,
    runner_name,
)
from pipelines.job_support import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    JobRun,
    add_storage_option_argument,
    check_output_location,
    use_storage_options,
)
from pipelines.probe_cmd import add_sampling_arguments, sampling_config_from_args
from pipelines.units import (
    GENERIC_QUERY_ID,
    SOURCE_INDEX,
    SOURCE_VIDEO,
    LoadUnitFn,
    ModelSpec,
    ModelStageFn,
    WorkUnit,
    dead,
    finalize_target,
    landed_units,
    print_failures,
    read_entries,
    run_pipeline,
    unit_landed,
    unit_ranges,
    validate_manifest_or_raise,
    video_meta,
)
from schemas import cache_layout as L
from schemas import index_layout
from schemas import manifest as manifest_schema
from tempo_ops import video
from tempo_ops.errors import (
    CacheCorrupt,
    ConfigError,
    FingerprintMismatch,
    IndexMismatch,
    TempoError,
    VideoNotIndexed,
)
from tempo_ops.fs import file_identity
from tempo_ops.numerics import NUMERICS_MODES
from tempo_ops.query_text import DEFAULT_TEMPLATE, TEMPLATES, render_query

METRICS_NAMESPACE = "tempo.compress"
logger = logging.getLogger(__name__)

__all__ = ["GENERIC_QUERY_ID", "ModelSpec", "WorkUnit", "landed_units", "unit_ranges", "video_meta"]  # re-exported


def entry_queries(entry, prompt_template: str | None = None) -> list[tuple[str, str, str]]:
    """(query_id, rendered text, template name) of a manifest entry's queries.

    The template is ``prompt_template`` (the job's override) if given, else the line's
    ``prompt_template``, else ``plain``; the text is ``render_query(text, options, template)``.
    A video without queries gets the generic entry: text ``""`` (the compressor reads
    "Describe this content.") under ``plain``, whatever the template.
    """
    if not entry.queries:
        return [(GENERIC_QUERY_ID, "", DEFAULT_TEMPLATE)]
    template = prompt_template or entry.prompt_template or DEFAULT_TEMPLATE
    return [(q.query_id, render_query(q.text, q.options, template), template) for q in entry.queries]


STORAGE_FORM_CHOICES = ("auto", "bfloat16", "float16", "int8")


def cache_config(compressor_fingerprint: dict, sampling: video.SamplingConfig, stored_dtype: str = "float16") -> dict:
    """The configuration a cache is fingerprinted with (docs/ARCHITECTURE.md); ``stored_dtype``: the storage form."""
    return {"compressor": compressor_fingerprint, "sampling": sampling.to_dict(), "stored_dtype": stored_dtype}


def default_storage_form(model_dtype: Any) -> str:
    """bfloat16 storage (lossless) when the compressor runs in bfloat16, else float16."""
    return "bfloat16" if "bfloat16" in str(model_dtype) else "float16"


def choose_storage_form(existing, requested: str, model_dtype: Any) -> str:
    """The storage form a run writes: an existing cache's own (``existing``: its CacheReader or
    None), else ``requested`` ("auto": ``default_storage_form(model_dtype)``)."""
    if existing is not None:
        return existing.storage_form
    return default_storage_form(model_dtype) if requested == "auto" else requested


def cache_entry_statuses(
    writer, video_id: str, queries, n_segments: int, identity: dict | None, *, force: bool, repair: bool = False
) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]], int]:
    """Sort ``queries`` (query_id, text, template) by what this run must do with their cache entries.

    Returns ``(pending, corrupt, n_complete)``: ``pending`` (query_id, text, template, status)
    to compute (status "absent", "incomplete", "stale", or "corrupt" when repairing/forcing;
    complete ones too with ``force``); ``corrupt`` (query_id, reason) to dead-letter;
    ``n_complete`` skipped. ``repair`` checks every chunk's crc32c, else a quick check
    (``CacheWriter.entry_status``).
    """
    pending, corrupt, n_complete = [], [], 0
    for qid, text, template in queries:
        status, reason = writer.entry_status(
            video_id, qid, text, n_segments, prompt_template=template, video_identity=identity,
            check="full" if repair else "quick",
        )
        if status == "corrupt" and not (repair or force):
            corrupt.append((qid, reason or "corrupt"))
        elif status == "complete" and not force:
            n_complete += 1
        else:
            pending.append((qid, text, template, status))
    return pending, corrupt, n_complete


def corrupt_letter(video_id: str, query_id: str, reason: str):
    """The dead letter of a corrupt complete entry a run leaves alone (no ``--repair``)."""
    exc = CacheCorrupt(f"{reason}; recompute with `tempo compress --repair`", item=f"{video_id}/{query_id}")
    return dead(exc, video_id=video_id, query_id=query_id, stage="verify")


def begin_cache_entries(
    writer, video_id: str, n_segments: int, pending, ranges, *, force: bool, identity: dict | None = None
) -> tuple[set[int], tuple[str, ...]]:
    """Begin (or resume) the cache entries of ``pending`` (query_id, text, template, status; see
    ``cache_entry_statuses``) computed from the video ``identity``.

    Returns the unit indices of ``ranges`` that already landed for every one of them, and the
    entry version each one's blocks go to (same order). Corrupt entries and ``force`` get a
    fresh version; an unfinished version with the same inputs is resumed.
    """
    landed = set(range(len(ranges)))
    versions = []
    for qid, text, template, status in pending:
        writer.begin_entry(
            video_id, qid, text, n_segments, prompt_template=template, video_identity=identity,
            force=force or status == "corrupt", resume=True,
        )
        versions.append(writer.pending_version(video_id, qid))
        landed &= landed_units(ranges, writer.missing_segments(video_id, qid, version=versions[-1]))
    return landed, tuple(versions)


def plan_entry(
    entry, sampling: video.SamplingConfig, index=None, fallback_video: bool = False
) -> tuple[Any, dict, int, str, dict | None]:
    """``(plan or None, video record, n_segments, source, video identity)`` of a manifest entry.

    Without ``index``: probe the video; its identity is ``file_identity(uri)``. With an
    ``IndexReader``: the index's video record and the identity it recorded when indexing (no
    video read); a video the index lacks raises VideoNotIndexed, or is probed with ``fallback_video``.
    """
    if index is not None:
        try:
            indexed = index.video(entry.video_id)
        except VideoNotIndexed:
            if not fallback_video:
                raise
        else:
            meta, identity = index_layout.split_identity(indexed.meta)
            return None, dict(meta, uri=entry.uri, metadata=entry.metadata), indexed.n_segments, SOURCE_INDEX, identity
    plan = video.plan_video(entry.uri, sampling)
    return plan, video_meta(entry, plan), plan.n_segments, SOURCE_VIDEO, file_identity(entry.uri)


# --------------------------------------------------------------------------- DoFns (adapters only)
class _CacheDoFn(beam.DoFn):
    def __init__(self, cache_url: str, config: dict) -> None:
        self.cache_url = cache_url
        self.config = config
        self.writer = None

    def setup(self) -> None:
        from tempo_ops.store import CacheWriter

        self.writer = CacheWriter.open(self.cache_url, self.config)


class PlanVideoFn(_CacheDoFn):
    """VideoEntry → WorkUnits of its pending queries (dead letter if the video is unusable)."""

    def __init__(
        self,
        cache_url: str,
        config: dict,
        sampling: video.SamplingConfig,
        unit_segments: int,
        force: bool,
        index_url: str | None = None,
        fallback_video: bool = False,
        prompt_template: str | None = None,
        repair: bool = False,
    ):
        super().__init__(cache_url, config)
        self.sampling = sampling
        self.unit_segments = unit_segments
        self.force = force
        self.prompt_template = prompt_template
        self.index_url = index_url
        self.fallback_video = fallback_video
        self.repair = repair
        self.index = None
        self.stale = Metrics.counter(METRICS_NAMESPACE, "queries_stale_recomputed")
        self.repaired = Metrics.counter(METRICS_NAMESPACE, "queries_corrupt_repaired")
        self.corrupt = Metrics.counter(METRICS_NAMESPACE, "queries_corrupt_dead_lettered")
        self.videos = Metrics.counter(METRICS_NAMESPACE, "videos_planned")
        self.videos_failed = Metrics.counter(METRICS_NAMESPACE, "videos_failed")
        self.from_index = Metrics.counter(METRICS_NAMESPACE, "videos_from_index")
        self.skipped = Metrics.counter(METRICS_NAMESPACE, "queries_skipped_complete")
        self.planned = Metrics.counter(METRICS_NAMESPACE, "queries_planned")
        # A video that fails before its units exist fails all of its pending queries.
        self.queries_failed = Metrics.counter(METRICS_NAMESPACE, "queries_failed")
        self.segments = Metrics.counter(METRICS_NAMESPACE, "segments_planned")
        self.units = Metrics.counter(METRICS_NAMESPACE, "units_planned")
        self.units_landed = Metrics.counter(METRICS_NAMESPACE, "units_skipped_landed")
        self.progress = None

    def setup(self) -> None:
        super().setup()
        self.progress = ProgressReporter("compress", unit="segments")
        if self.index_url is not None:
            from tempo_ops.index_store import IndexReader

            self.index = IndexReader(self.index_url)

    def _complete_without_index(self, entry, queries) -> bool:
        """For a video the index lacks: every query's entry carries its completion marker for this
        text and template (the video's identity cannot be checked without it) and, with
        ``--repair``, passes a full checksum verification."""
        from tempo_ops.errors import CacheCorrupt, EntryNotFound

        for q, t, tpl in queries:
            if not self.writer.is_complete(entry.video_id, q, query_text=t, prompt_template=tpl):
                return False
            if self.repair:
                try:
                    if self.writer.reader().entry(entry.video_id, q).verify(full=True):
                        return False
                except (CacheCorrupt, EntryNotFound):
                    return False
        return True

    def process(self, entry) -> Iterator:
        try:
            queries = entry_queries(entry, self.prompt_template)
        except TempoError as exc:  # e.g. more options than letters
            self.videos_failed.inc()
            yield dead(exc, video_id=entry.video_id, query_id=None, stage="plan", uri=entry.uri)
            return
        stage = "probe" if self.index is None else "index"
        # Which entries are complete needs the video's segment count and identity (probe or index
        # record): until then every query is pending, so a video that cannot be planned fails all of them.
        pending = [(q, t, tpl, "absent") for q, t, tpl in queries]
        counted = False
        try:
            try:
                plan, meta, n_segments, source, identity = plan_entry(entry, self.sampling, self.index, self.fallback_video)
            except VideoNotIndexed:
                if self.force or not self._complete_without_index(entry, queries):
                    raise
                self.skipped.inc(len(queries))  # nothing to compute: the index need not hold the video
                return
            stage = "verify"
            pending, corrupt, n_complete = cache_entry_statuses(
                self.writer, entry.video_id, queries, n_segments, identity, force=self.force, repair=self.repair
            )
            for qid, reason in corrupt:
                self.corrupt.inc()
                yield corrupt_letter(entry.video_id, qid, reason)
            self.skipped.inc(n_complete)
            self.stale.inc(sum(s == "stale" for *_, s in pending))
            self.repaired.inc(sum(s == "corrupt" for *_, s in pending))
            if not pending:
                return
            self.planned.inc(len(pending))  # each ends completed, failed or left to another run
            counted = True
            stage = "write"  # from here on a failure is the cache's, not the video's
            self.writer.write_video(entry.video_id, meta)
            ranges = unit_ranges(n_segments, self.unit_segments)
            landed, versions = begin_cache_entries(
                self.writer, entry.video_id, n_segments, pending, ranges, force=self.force, identity=identity
            )
        except Exception as exc:  # noqa: BLE001 - any failure of one video is isolated
            self.videos_failed.inc()
            if not counted:
                self.planned.inc(len(pending))
            self.queries_failed.inc(len(pending))
            yield dead(exc, video_id=entry.video_id, query_id=None, stage=stage, uri=entry.uri)
            return
        self.videos.inc()
        self.from_index.inc(int(source == SOURCE_INDEX))
        self.segments.inc(n_segments)
        todo = sum(b - a for i, (a, b) in enumerate(ranges) if i not in landed)
        self.progress.add(
            quiet=True, total=todo, videos_planned_done=1, entries_total=len(pending),
            blocks_total=(len(ranges) - len(landed)) * len(pending),
        )
        # A unit is skipped only when it landed for every pending query; otherwise it is
        # recomputed for all of them, so its batch (and so its bytes) equal an uninterrupted run's.
        self.units.inc(len(ranges) - len(landed))
        self.units_landed.inc(len(landed))
        unit_queries = tuple((qid, text) for qid, text, _, _ in pending)
        for i, (a, b) in enumerate(ranges):
            if i in landed:
                yield from unit_landed(entry.video_id, [q for q, _ in unit_queries], i, len(ranges), versions)
            else:
                yield WorkUnit(entry.video_id, entry.uri, plan, i, len(ranges), a, b, unit_queries, source, versions)


class CompressUnitFn(ModelStageFn):
    """(WorkUnit, [Segment] or [SegmentFeatures]) → one block per query — the model stage."""

    def __init__(self, spec: ModelSpec, shared_handle: shared.Shared) -> None:
        super().__init__(METRICS_NAMESPACE, spec, shared_handle)
        self.compressed = Metrics.counter(METRICS_NAMESPACE, "segments_compressed")

    def process(self, element) -> Iterator:
        unit, payload = element  # [Segment] decoded, or [SegmentFeatures] from the index
        t0 = time.perf_counter()
        texts = [text for _, text in unit.queries]
        try:
            if unit.source == SOURCE_INDEX:
                result = self.model.compress_from_features(payload, texts)
            else:
                result = self.model.compress(payload, texts)
        except Exception as exc:  # noqa: BLE001
            yield from self.failed(unit, exc)
            return
        self.model_ms.update(int((time.perf_counter() - t0) * 1000))
        self.compressed.inc(len(payload) * len(unit.queries))
        for qi, (qid, _) in enumerate(unit.queries):
            yield unit, qid, result.candidates[qi], result.relevance[qi]


class WriteBlockFn(_CacheDoFn):
    """One query's block of a unit → the cache; emits the unit's status for finalisation."""

    def __init__(self, cache_url: str, config: dict, run_id: str = "") -> None:
        """``run_id``: release the unit's lease (taken in LoadUnit) when its last block lands ("": none)."""
        super().__init__(cache_url, config)
        self.run_id = run_id
        self.bytes_written = Metrics.counter(METRICS_NAMESPACE, "bytes_written")
        self.progress = None

    def setup(self) -> None:
        super().setup()
        self.progress = ProgressReporter("compress")

    def process(self, element) -> Iterator:
        unit, qid, candidates, relevance = element
        key = unit.status_key(qid)
        try:
            self.writer.write_block(unit.video_id, qid, unit.seg_start, candidates, relevance, version=unit.version_of(qid))
        except Exception as exc:  # noqa: BLE001
            yield dead(exc, video_id=unit.video_id, query_id=qid, stage="write", unit=unit.unit_index)
            yield key, ("failed", unit.unit_index, unit.n_units)
            return
        self.bytes_written.inc(int(candidates.shape[0]) * self.writer.segment_nbytes)
        # Progress in video segments: a unit's segments count once, when its last query's block lands.
        last = qid == unit.queries[-1][0]
        self.progress.add(done=int(candidates.shape[0]) if last else 0, blocks_done=1)
        if last and self.run_id:
            from tempo_ops import leases

            leases.release(self.cache_url, unit.video_id, unit.unit_index, self.run_id)
        yield key, ("ok", unit.unit_index, unit.n_units)


class FinalizeEntryFn(_CacheDoFn):
    """(video, query, entry version) with all its unit statuses → the version verified and made
    current (one put) when every unit landed."""

    def __init__(self, cache_url: str, config: dict) -> None:
        super().__init__(cache_url, config)
        self.done = Metrics.counter(METRICS_NAMESPACE, "queries_completed")
        self.failed = Metrics.counter(METRICS_NAMESPACE, "queries_failed")
        self.left = Metrics.counter(METRICS_NAMESPACE, "queries_left_to_other_run")

    def process(self, element) -> Iterator:
        (video_id, query_id, version), statuses = element
        outcome, letter = finalize_target(
            video_id, query_id, list(statuses), lambda: self.writer.finalize_entry(video_id, query_id, version=version)
        )
        {"done": self.done, "left": self.left, "failed": self.failed}[outcome].inc()
        if letter is not None:
            yield letter
        if outcome == "done":
            ProgressReporter("compress").add(quiet=True, entries_done=1)


# --------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class CompressJob:
    manifest: str
    cache: str
    sampling: video.SamplingConfig
    model: ModelSpec
    config: dict
    unit_segments: int
    force: bool = False
    repair: bool = False  # --repair: verify every chunk checksum, recompute corrupt entries
    limit: int | None = None  # --limit: only the first N entries are read
    convert_threads: int | None = None  # per worker process; None: video.default_convert_threads()
    run_id: str = "run"  # leases are taken under it
    index: str | None = None  # --from-index: read SegmentFeatures from this segment index
    fallback_video: bool = False  # with index: videos it lacks are decoded instead of dead-lettered
    prompt_template: str | None = None  # overrides the manifest's per-line template
    # Handle through which workers share one model per process; the driver of a local
    # in-process run pre-fills it with the model it loaded for the fingerprint.
    model_handle: shared.Shared = field(default_factory=shared.Shared, compare=False)

    @property
    def dead_letter_path(self) -> str:
        """The latest run's dead letters (each run's own copy: ``{cache}.runs/{run_id}.deadletter.jsonl``)."""
        return self.cache.rstrip("/") + ".deadletter.jsonl"

    @property
    def summary_path(self) -> str:
        return self.cache.rstrip("/") + ".summary.json"


def build_pipeline(pipeline: beam.Pipeline, job: CompressJob) -> None:
    """Add the compression job's transforms to ``pipeline``."""
    entries = read_entries(pipeline, job.manifest, job.limit)
    planned = entries | "PlanVideo" >> beam.ParDo(
        PlanVideoFn(
            job.cache, job.config, job.sampling, job.unit_segments, job.force, job.index, job.fallback_video,
            job.prompt_template, job.repair,
        )
    ).with_outputs(DEAD_LETTER, "unit_status", main="units")
    loaded = (
        planned.units
        | "SpreadUnits" >> beam.Reshuffle()
        | "LoadUnit"
        >> beam.ParDo(
            LoadUnitFn(METRICS_NAMESPACE, job.sampling, job.convert_threads, job.index, lease_base=job.cache, run_id=job.run_id)
        ).with_outputs(DEAD_LETTER, "unit_status", main="inputs")
    )
    compressed = loaded.inputs | "CompressUnit" >> beam.ParDo(
        CompressUnitFn(job.model, job.model_handle)
    ).with_outputs(DEAD_LETTER, "unit_status", main="blocks")
    written = compressed.blocks | "WriteBlock" >> beam.ParDo(WriteBlockFn(job.cache, job.config, job.run_id)).with_outputs(
        DEAD_LETTER, main="status"
    )
    finalize_failures = (
        (planned.unit_status, written.status, loaded.unit_status, compressed.unit_status)
        | "AllUnitStatus" >> beam.Flatten()
        | "GroupUnitsPerEntry" >> beam.GroupByKey()
        | "FinalizeEntry" >> beam.ParDo(FinalizeEntryFn(job.cache, job.config))
    )
    (
        (planned[DEAD_LETTER], loaded[DEAD_LETTER], compressed[DEAD_LETTER], written[DEAD_LETTER], finalize_failures)
        | "AllDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> WriteDeadLetters(job.cache, job.run_id)
    )


# --------------------------------------------------------------------------- command line
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Compressor options shared by ``tempo compress``, ``tempo index`` and ``tempo ask``."""
    parser.add_argument("--svlm", required=True, help="base Qwen3-VL directory or URL")
    parser.add_argument(
        "--compressor",
        default=None,
        help="memory tokens: a Tempo-6B checkpoint or a tempo compressor checkpoint (default: fresh seeded init)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a fresh memory-token init")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per model forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument(
        "--numerics",
        choices=NUMERICS_MODES,
        default=None,
        help="reference: the released model's bf16 roundings (fp16 weight load, bf16 rope and position "
        "embeddings); exact: transformers as is (default: reference with bfloat16, exact otherwise)",
    )


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Work-unit, decoding and runner options shared by ``tempo compress`` and ``tempo index``."""
    add_sampling_arguments(parser)
    parser.add_argument("--unit-segments", type=int, default=None, help="segments per work unit (multiple of the cache shard)")
    parser.add_argument(
        "--convert-threads",
        type=int,
        default=None,
        help="threads per worker converting and resizing decoded frames, 0: inline (default: usable CPUs "
        "up to 4, divided among --local_workers)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="process only the first N videos of the manifest (only those lines are read and validated)",
    )
    parser.add_argument("--force", action="store_true", help="recompute work that is already complete")
    add_storage_option_argument(parser)
    add_runner_arguments(parser, default_mode="threads")  # threads share one model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="corpus manifest (JSON Lines; local path or fsspec URL)")
    parser.add_argument("--cache", required=True, help="Zarr cache URL (local path, memory://, gs://...)")
    add_model_arguments(parser)
    parser.add_argument(
        "--from-index",
        default=None,
        metavar="INDEX",
        help="compress from a segment index built by `tempo index` (no video read, no vision encoder; "
        "the sampling options are the index's)",
    )
    parser.add_argument(
        "--fallback-video",
        action="store_true",
        help="with --from-index: compress videos the index lacks from the video instead of dead-lettering them",
    )
    parser.add_argument(
        "--prompt-template",
        choices=tuple(TEMPLATES),
        default=None,
        help="benchmark prompt template the queries are rendered with, overriding the manifest's "
        "prompt_template (default: the manifest's, else plain)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, probe and print the plan net of complete entries; loads no model (reads only the "
        "SVLM's config.json) and checks the cache's sampling configuration, not the model fingerprint",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="verify every chunk checksum of complete entries and recompute the corrupt ones (see `tempo verify`)",
    )
    add_storage_form_argument(parser)
    add_job_arguments(parser)


def add_storage_form_argument(parser: argparse.ArgumentParser) -> None:
    """``--storage-form`` of a new cache (``tempo compress``, ``tempo index --cache``)."""
    parser.add_argument(
        "--storage-form",
        choices=STORAGE_FORM_CHOICES,
        default="auto",
        help="how a NEW cache stores candidates (auto: bfloat16 when the model runs in bfloat16, else float16); "
        "an existing cache keeps its own",
    )


def convert_threads_from_args(args: argparse.Namespace) -> int | None:
    """``--convert-threads`` checked; by default shared among local workers."""
    convert_threads = args.convert_threads
    if convert_threads is not None and convert_threads < 0:
        raise ConfigError(f"--convert-threads must be 0 (inline) or more, got {convert_threads}")
    if convert_threads is None and args.local_workers > 1:  # local workers share this machine's CPUs
        convert_threads = video.default_convert_threads() // args.local_workers  # 0: inline
    return convert_threads


def check_limit(args: argparse.Namespace) -> None:
    """ConfigError for a negative ``--limit`` (before the manifest is read)."""
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    threads = max(1, (os.cpu_count() or 1) // max(1, args.local_workers))
    return ModelSpec(
        args.svlm, args.compressor, args.seed, args.device, args.dtype, args.max_batch_tokens, threads, numerics=args.numerics
    )


def index_sampling(index_url: str, fingerprint: dict | None = None) -> video.SamplingConfig:
    """The sampling of a segment index, after checking its sampling rule and, given the compressor's
    ``fingerprint``, that it was built with this compressor's SVLM.

    Raises IndexMismatch naming the differing fields (memory tokens may differ: the index
    holds nothing that depends on them). Without ``fingerprint`` no model is needed (the
    checks made before the model loads).
    """
    from schemas import index_layout
    from tempo_ops.index_store import IndexReader

    reader = IndexReader(index_url)
    if fingerprint is not None:
        stored, ours = reader.config["svlm"], index_layout.svlm_section(fingerprint)
        if stored != ours:
            fields = index_layout.config_differences(stored, ours)
            raise IndexMismatch(
                f"index was built with another SVLM / prompt / geometry; differing fields: {', '.join(fields)}", item=index_url
            )
    sampling = dict(reader.config["sampling"])
    rule = sampling.pop("sampling_rule", None)
    if rule != video.SAMPLING_RULE:  # the index's frames were chosen by another version of the rules
        raise IndexMismatch(f"index was sampled with rule {rule!r}; this code samples with {video.SAMPLING_RULE!r}", item=index_url)
    return video.SamplingConfig(**sampling)


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    """Run the job; exit status 0 (all done), 1 (some items dead-lettered), 2 (typed error), 130/143 (signal)."""
    # Everything cheap first: arguments, locations, device, manifest, the cache's own config.
    use_storage_options(args, [args.manifest, args.cache, args.svlm, args.compressor, args.from_index])
    sampling = sampling_config_from_args(args)
    convert_threads = convert_threads_from_args(args)
    check_limit(args)
    if args.fallback_video and not args.from_index:
        raise ConfigError("--fallback-video needs --from-index")
    inputs = {"--manifest": args.manifest, **({"--from-index": args.from_index} if args.from_index else {})}
    check_output_location(args.cache, inputs, what="--cache")
    validate_manifest_or_raise(args.manifest, args.limit)
    if args.dry_run:
        return dry_run(args, sampling)
    if args.from_index:
        sampling = index_sampling(args.from_index)  # the SVLM part is checked once the model is loaded
    existing = open_existing_cache(args.cache)
    if existing is not None:
        check_cache_sampling(existing, sampling, args.storage_form)
    check_device(args.device)

    from tempo_ops.store import CacheWriter

    spec = model_spec_from_args(args)
    print(f"[compress] loading compressor from {args.svlm} for the cache fingerprint", file=sys.stderr, flush=True)
    t_load = time.monotonic()
    model_handle = shared.Shared()
    # Kept referenced until the run ends, so an in-process local worker reuses it instead of loading again.
    driver_model = model_handle.acquire(lambda: SharedModel(units.load_compressor(spec)))
    if args.from_index:
        sampling = index_sampling(args.from_index, driver_model.model.fingerprint())
    form = choose_storage_form(existing, args.storage_form, getattr(driver_model.model, "dtype", None))
    config = cache_config(driver_model.model.fingerprint(), sampling, form)
    print(f"[compress] compressor loaded in {time.monotonic() - t_load:.1f}s", file=sys.stderr, flush=True)
    writer = CacheWriter.open(args.cache, config)  # creates the cache or refuses a mismatching one
    unit_segments = args.unit_segments or writer.segments_per_shard
    if unit_segments % writer.segments_per_shard:
        raise ConfigError(
            f"--unit-segments {unit_segments} must be a multiple of the cache shard ({writer.segments_per_shard} segments)"
        )
    run = JobRun.start("compress", args.cache)
    job = CompressJob(
        args.manifest,
        args.cache,
        sampling,
        spec,
        config,
        unit_segments,
        force=args.force,
        repair=args.repair,
        limit=args.limit,
        convert_threads=convert_threads,
        run_id=run.run_id,
        index=args.from_index,
        fallback_video=args.fallback_video,
        prompt_template=args.prompt_template,
        model_handle=model_handle,
    )
    options = pipeline_options_from_args(
        extra_args, job_name="tempo-compress", local_workers=args.local_workers, local_mode=args.local_mode
    )
    if not (is_local_runner(options) and (args.local_workers == 1 or args.local_mode == "threads")):
        del driver_model  # workers are other processes: free the driver's copy
    print(
        f"[compress] run {run.run_id}: manifest {args.manifest} valid"
        + (f" (first {args.limit} entries)" if args.limit is not None else "")
        + (f", from index {args.from_index}" if args.from_index else "")
        + f", starting runner {runner_name(options)}",
        file=sys.stderr,
        flush=True,
    )
    result = run_pipeline("compress", options, lambda p: build_pipeline(p, job), run, lease_base=args.cache)
    if result is None:
        return EXIT_OK
    summary = write_summary(job, result, run=run, runner=runner_name(options), fingerprint=writer.fingerprint)
    print_summary(summary)
    return EXIT_OK if summary["failures"]["items"] == 0 else EXIT_ITEMS_FAILED


def check_device(device: str | None) -> None:
    """DeviceUnavailable (``device_unavailable``) for a torch device this machine lacks, before any work."""
    if device is None:
        return
    import torch

    from tempo_ops.errors import DeviceUnavailable

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceUnavailable(f"not a torch device: {exc}", item=f"--device {device}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable("no CUDA GPU is available here (or torch was built without CUDA); use --device cpu",
                                    item=f"--device {device}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"only {torch.cuda.device_count()} CUDA device(s) here", item=f"--device {device}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable("no MPS device is available here", item=f"--device {device}")


def open_existing_cache(url: str):
    """The CacheReader of the cache at ``url``, or None when there is none yet (nothing is created)."""
    from tempo_ops.fs import url_to_fs
    from tempo_ops.store import CacheReader

    try:
        fs, path = url_to_fs(url)
        if not fs.exists(f"{path.rstrip('/')}/zarr.json"):
            return None
    except (FileNotFoundError, NotADirectoryError):
        return None
    return CacheReader(url)


def check_cache_sampling(reader, sampling: video.SamplingConfig, storage_form: str = "auto") -> None:
    """FingerprintMismatch when the cache was written with other sampling; ConfigError when it stores
    another form than ``storage_form`` asks for ("auto": whatever it stores). Checked before any model loads."""
    from schemas.cache_layout import config_differences

    stored = reader.config
    if storage_form not in ("auto", reader.storage_form):
        raise ConfigError(f"--storage-form {storage_form}: the cache at {reader.url} stores {reader.storage_form}", item=reader.url)
    given = {"sampling": sampling.to_dict(), "stored_dtype": stored.get("stored_dtype")}
    fields = config_differences(
        {"sampling": stored.get("sampling"), "stored_dtype": stored.get("stored_dtype")}, given
    )
    if fields:
        raise FingerprintMismatch(
            f"cache was written with a different configuration; differing fields: {', '.join(fields)}",
            item=reader.url,
            fields=fields,
        )


def compress_counts(counts: dict[str, int]) -> dict[str, int]:
    """``queries_pending``: what this run planned but neither completed, failed nor left to another run
    (0 unless a runner lost work)."""
    done = sum(counts.get(k, 0) for k in ("queries_completed", "queries_failed", "queries_left_to_other_run"))
    return {**counts, "queries_pending": max(0, counts.get("queries_planned", 0) - done)}


def write_summary(job: CompressJob, result, *, run: JobRun, runner: str, fingerprint: str) -> dict:
    """Gather metrics + dead letters into the run summary and write it next to the cache (history + latest).

    Counts: ``videos_*`` are videos, ``segments_*`` video segments (each once, whatever its
    number of queries), ``queries_*`` (video, query) entries (compress_counts).
    """
    return units.write_summary(
        METRICS_NAMESPACE,
        result,
        run=run,
        runner=runner,
        outputs={"manifest": job.manifest, "cache": job.cache, "index": job.index},
        config=job.config,
        fingerprint=fingerprint,
        counts=compress_counts,
    )


def print_summary(summary: dict) -> None:
    c, t = summary["counts"], summary["timing"]
    segments = c.get("segments_decoded", 0) + c.get("segments_read_from_index", 0)
    print(
        f"[compress] done in {t['wall_s']:.1f}s: videos {c.get('videos_planned', 0)} ok / {c.get('videos_failed', 0)} failed, "
        f"queries {c.get('queries_completed', 0)} completed / {c.get('queries_failed', 0)} failed / "
        f"{c.get('queries_skipped_complete', 0)} already complete, {c.get('queries_stale_recomputed', 0)} stale, recomputed, "
        f"{c.get('queries_corrupt_repaired', 0)} corrupt, repaired, video segments {segments} "
        f"({c.get('segments_read_from_index', 0)} from the index; {t['segments_per_s']} segments/s; decode {t['decode_s']}s, "
        f"index {t['index_read_s']}s, model {t['model_s']}s)",
        file=sys.stderr,
    )
    if c.get("units_held_elsewhere"):
        print(
            f"[compress] {c['units_held_elsewhere']} work unit(s) were being computed by another run; "
            f"{c.get('queries_left_to_other_run', 0)} (video, query) entries are left for it to complete",
            file=sys.stderr,
        )
    print_failures("compress", summary)


def dry_run(args: argparse.Namespace, sampling: video.SamplingConfig) -> int:
    """Probe every input and print the plan net of complete entries (work units, segments, estimated bytes).

    Loads no model: reads the SVLM's config.json for the token width. When a cache exists,
    its sampling configuration is checked (FingerprintMismatch, as the real run would) and
    its complete (video, query) entries are left out of the plan (unless ``--force``); the
    model part of the fingerprint is computed, and checked, only by the real run.
    """
    from tempo_ops.svlm.checkpoints import read_hidden_size

    hidden = read_hidden_size(args.svlm)
    existing = open_existing_cache(args.cache)
    complete: set = set()
    if existing is not None:
        check_cache_sampling(existing, sampling, args.storage_form)
        if not args.force:
            complete = set(existing.entries(complete_only=True))
    k = int(existing.config["compressor"]["num_memory_tokens"]) if existing is not None else 128
    form = choose_storage_form(existing, args.storage_form, args.dtype)
    segment_bytes = L.segment_nbytes(form, k, hidden)
    unit_segments = args.unit_segments or (existing.segments_per_shard if existing is not None else 32)
    totals = {"videos": 0, "failed": 0, "segments": 0, "units": 0, "entries": 0, "skipped_complete": 0, "bytes": 0}
    print(f"{'video_id':<24} {'segments':>8} {'units':>5} {'queries':>7} {'est. bytes':>12}  note")
    for entry in manifest_schema.iter_manifest(args.manifest, limit=args.limit):
        try:
            queries = entry_queries(entry, args.prompt_template)
        except TempoError as exc:
            totals["failed"] += 1
            print(f"{entry.video_id:<24} {'-':>8} {'-':>5} {'-':>7} {'-':>12}  error [{exc.code}] {exc.reason}")
            continue
        pending = [q for q, _, _ in queries if (entry.video_id, q) not in complete]
        totals["skipped_complete"] += len(queries) - len(pending)
        if not pending:
            continue
        n_queries = len(pending)
        try:
            plan = video.plan_video(entry.uri, sampling)
        except TempoError as exc:
            totals["failed"] += 1
            print(f"{entry.video_id:<24} {'-':>8} {'-':>5} {n_queries:>7} {'-':>12}  error [{exc.code}] {exc.reason}")
            continue
        units = len(unit_ranges(plan.n_segments, unit_segments))
        est = n_queries * plan.n_segments * segment_bytes
        totals["videos"] += 1
        totals["segments"] += plan.n_segments
        totals["units"] += units
        totals["entries"] += n_queries
        totals["bytes"] += est
        print(f"{entry.video_id:<24} {plan.n_segments:>8} {units:>5} {n_queries:>7} {est:>12}")
    print(
        f"plan: {totals['videos']} videos ({totals['failed']} unusable), {totals['entries']} (video, query) entries "
        f"to compute ({totals['skipped_complete']} already complete), {totals['segments']} segments in "
        f"{totals['units']} work units, ~{totals['bytes'] / 2**20:.1f} MiB of cache"
        + ("; the model fingerprint is checked by the real run" if existing is not None else "")
    )
    print(json.dumps({"dry_run": totals}), file=sys.stderr)
    return 0
