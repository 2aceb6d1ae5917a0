"""The index job: corpus manifest → segment index (``tempo index``), optionally + generic cache entries.

It decodes every video and runs the SVLM's vision encoder once, storing per segment what the
compressor's language model needs to answer any later query without the video
(``SegmentFeatures``: prefix ids, rope-position inputs, merged visual tokens, DeepStack
features; layout ``schemas/INDEX_LAYOUT.md``). ``tempo compress --from-index`` then runs only
the language model per new query.

Graph (the compression job's skeleton, ``pipelines/units.py``)::

    ReadManifest (fsspec, streamed, stops after --limit entries)
      → PlanIndexVideo (probe, sample, segment; skip complete videos; begin the index record
                        [and the cache's _generic entry]; fan out units not landed yet)
      → Reshuffle → LoadUnit (take the unit's lease; decode) → EncodeUnit (vision encoder [+ LM for _generic])
      → WriteIndexUnit (one writer per unit group) [+ WriteBlock into the cache]
      → GroupByKey(video, target) → FinalizeIndexVideo [FinalizeEntry]: markers only when every unit landed
    every step's failures → dead letters → ``<index>.deadletter.jsonl``; summary ``<index>.summary.json``
    (each run's own copies under ``<index>.runs/``; pipelines/job_support.py)

As for ``tempo compress``: a unit another live run holds (lease beside the index) is left
to it; SIGINT/SIGTERM stop the job with one line (exit 130/143) and a partial summary; fatal
storage errors stop it with one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipelines import units
from pipelines.beam_support import (
    DEAD_LETTER,
    ProgressReporter,
    SharedModel,
    WriteDeadLetters,
    pipeline_options_from_args,
    runner_name,
)
from pipelines.compress import (
    FinalizeEntryFn,
    WriteBlockFn,
    add_job_arguments,
    add_model_arguments,
    add_storage_form_argument,
    begin_cache_entries,
    cache_config,
    cache_entry_statuses,
    check_cache_sampling,
    check_device,
    check_limit,
    choose_storage_form,
    convert_threads_from_args,
    corrupt_letter,
    model_spec_from_args,
    open_existing_cache,
)
from pipelines.job_support import EXIT_ITEMS_FAILED, EXIT_OK, JobRun, check_output_location, use_storage_options
from pipelines.probe_cmd import sampling_config_from_args
from pipelines.units import GENERIC_QUERY_ID, INDEX_TARGET, LoadUnitFn, ModelSpec, WorkUnit
from schemas import index_layout
from tempo_ops import video
from tempo_ops.errors import ConfigError
from tempo_ops.fs import file_identity
from tempo_ops.query_text import DEFAULT_TEMPLATE

METRICS_NAMESPACE = "tempo.index"


def index_config_for(compressor, sampling: video.SamplingConfig, stored_dtype: str) -> dict:
    """The index configuration of ``compressor`` (its SVLM part) + sampling + dtypes."""
    compute = str(compressor.dtype).removeprefix("torch.")
    return index_layout.index_config(compressor.fingerprint(), sampling.to_dict(), compute_dtype=compute, stored_dtype=stored_dtype)


def deepstack_layers(compressor) -> int:
    """L: the SVLM's DeepStack layers (features stored per segment)."""
    return len(getattr(compressor.model.config.vision_config, "deepstack_visual_indexes", None) or [])


@dataclass(frozen=True)
class IndexTarget:
    """How workers open the index (picklable)."""

    url: str
    config: dict
    deepstack_layers: int
    segments_per_unit: int

    def open(self):
        from tempo_ops.index_store import IndexWriter

        return IndexWriter.open(self.url, self.config, deepstack_layers=self.deepstack_layers, segments_per_unit=self.segments_per_unit)


# --------------------------------------------------------------------------- DoFns (adapters only)
class PlanIndexVideoFn(beam.DoFn):
    """VideoEntry → WorkUnits not landed yet for its pending targets (index record [+ _generic entry])."""

    def __init__(self, index: IndexTarget, sampling: video.SamplingConfig, force: bool, cache_url: str | None, cache_cfg: dict | None):
        self.index = index
        self.sampling = sampling
        self.force = force
        self.cache_url = cache_url
        self.cache_cfg = cache_cfg
        self.index_writer = self.cache_writer = None
        self.videos = Metrics.counter(METRICS_NAMESPACE, "videos_planned")
        self.videos_failed = Metrics.counter(METRICS_NAMESPACE, "videos_failed")
        self.skipped = Metrics.counter(METRICS_NAMESPACE, "videos_skipped_complete")
        self.segments = Metrics.counter(METRICS_NAMESPACE, "segments_planned")
        self.units = Metrics.counter(METRICS_NAMESPACE, "units_planned")
        self.units_landed = Metrics.counter(METRICS_NAMESPACE, "units_skipped_landed")
        self.stale = Metrics.counter(METRICS_NAMESPACE, "queries_stale_recomputed")
        self.corrupt = Metrics.counter(METRICS_NAMESPACE, "queries_corrupt_dead_lettered")
        self.progress = None

    def setup(self) -> None:
        self.index_writer = self.index.open()
        self.progress = ProgressReporter("index", unit="segments")
        if self.cache_url is not None:
            from tempo_ops.store import CacheWriter

            self.cache_writer = CacheWriter.open(self.cache_url, self.cache_cfg)

    def process(self, entry) -> Iterator:
        vid = entry.video_id
        index_pending = self.force or not self.index_writer.is_complete(vid)
        # The _generic entry's status (stale, corrupt) needs the video's segment count and identity: probe.
        cache_pending = self.cache_writer is not None
        if not (index_pending or cache_pending):
            self.skipped.inc()
            return
        stage = "probe"
        try:
            plan = video.plan_video(entry.uri, self.sampling)
            identity = file_identity(entry.uri)  # recorded in the index: entries computed from it carry it
            stage = "write"
            meta = units.video_meta(entry, plan)
            ranges = units.unit_ranges(plan.n_segments, self.index_writer.segments_per_unit)
            landed = set(range(len(ranges)))
            targets, versions = [], []
            if cache_pending:
                stage = "verify"
                generic = [(GENERIC_QUERY_ID, "", DEFAULT_TEMPLATE)]
                pending, corrupt, _ = cache_entry_statuses(self.cache_writer, vid, generic, plan.n_segments, identity, force=self.force)
                for qid, reason in corrupt:
                    self.corrupt.inc()
                    yield corrupt_letter(vid, qid, reason)
                self.stale.inc(sum(s == "stale" for *_, s in pending))
                cache_pending = bool(pending)
                stage = "write"
            if index_pending:
                self.index_writer.begin_video(vid, {**meta, index_layout.META_VIDEO_IDENTITY: identity}, plan.n_segments, force=self.force)
                done = self.index_writer.landed_units(vid)
                landed &= {u for u, r in enumerate(ranges) if done.get(u) == r}
                targets.append(INDEX_TARGET)
                versions.append(None)
            if cache_pending:
                self.cache_writer.write_video(vid, meta)
                cache_landed, cache_versions = begin_cache_entries(
                    self.cache_writer, vid, plan.n_segments, pending, ranges, force=self.force, identity=identity
                )
                landed &= cache_landed
                targets.append(GENERIC_QUERY_ID)
                versions.extend(cache_versions)
            if not targets:
                self.skipped.inc()
                return
        except Exception as exc:  # noqa: BLE001 - any failure of one video is isolated
            self.videos_failed.inc()
            yield units.dead(exc, video_id=vid, query_id=None, stage=stage, uri=entry.uri)
            return
        self.videos.inc()
        self.segments.inc(plan.n_segments)
        self.units.inc(len(ranges) - len(landed))
        self.units_landed.inc(len(landed))
        todo = sum(b - a for i, (a, b) in enumerate(ranges) if i not in landed)
        self.progress.add(quiet=True, total=todo, videos_planned_done=1, units_total=len(ranges) - len(landed))
        for i, (a, b) in enumerate(ranges):
            if i in landed:
                yield from units.unit_landed(vid, targets, i, len(ranges), versions)
            else:
                yield WorkUnit(vid, entry.uri, plan, i, len(ranges), a, b, tuple((t, "") for t in targets), versions=tuple(versions))


class EncodeUnitFn(units.ModelStageFn):
    """(WorkUnit, [Segment]) → (WorkUnit, [SegmentFeatures on CPU]) [+ the _generic block] — the model stage."""

    def __init__(self, spec: ModelSpec, shared_handle: shared.Shared) -> None:
        super().__init__(METRICS_NAMESPACE, spec, shared_handle)
        self.encoded = Metrics.counter(METRICS_NAMESPACE, "segments_encoded")

    def process(self, element) -> Iterator:
        unit, segments = element
        targets = [t for t, _ in unit.queries]
        t0 = time.perf_counter()
        try:
            features = self.model.encode_segments(segments)
            generic = self.model.compress_from_features(features, [""]) if GENERIC_QUERY_ID in targets else None
            features = [_to_cpu(f) for f in features]
        except Exception as exc:  # noqa: BLE001
            yield from self.failed(unit, exc)
            return
        self.model_ms.update(int((time.perf_counter() - t0) * 1000))
        self.encoded.inc(len(features))
        if INDEX_TARGET in targets:
            yield unit, features
        if generic is not None:
            yield beam.pvalue.TaggedOutput("blocks", (unit, GENERIC_QUERY_ID, generic.candidates[0], generic.relevance[0]))


def _to_cpu(f):
    from dataclasses import replace

    return replace(f, visual=f.visual.cpu(), deepstack=f.deepstack.cpu())


class WriteIndexUnitFn(beam.DoFn):
    """One unit's features → its index unit group; emits the unit's status for finalisation
    and releases the unit's lease (taken in LoadUnit under ``run_id``)."""

    def __init__(self, index: IndexTarget, run_id: str = "") -> None:
        self.index = index
        self.run_id = run_id
        self.writer = None
        self.progress = None
        self.bytes_written = Metrics.counter(METRICS_NAMESPACE, "bytes_written")

    def setup(self) -> None:
        self.writer = self.index.open()
        self.progress = ProgressReporter("index")

    def process(self, element) -> Iterator:
        unit, features = element
        key = unit.status_key(INDEX_TARGET)
        try:
            nbytes = self.writer.write_unit(unit.video_id, unit.unit_index, unit.seg_start, features)
        except Exception as exc:  # noqa: BLE001
            yield units.dead(exc, video_id=unit.video_id, query_id=INDEX_TARGET, stage="write", unit=unit.unit_index)
            yield key, ("failed", unit.unit_index, unit.n_units)
            return
        self.bytes_written.inc(nbytes)
        self.progress.add(done=len(features), units_done=1)
        if self.run_id:
            from tempo_ops import leases

            leases.release(self.index.url, unit.video_id, unit.unit_index, self.run_id)
        yield key, ("ok", unit.unit_index, unit.n_units)


class FinalizeIndexVideoFn(beam.DoFn):
    """(video, _index) with all its unit statuses → the video's completion marker when every unit landed."""

    def __init__(self, index: IndexTarget) -> None:
        self.index = index
        self.writer = None
        self.done = Metrics.counter(METRICS_NAMESPACE, "videos_completed")
        self.failed = Metrics.counter(METRICS_NAMESPACE, "videos_failed_units")
        self.left = Metrics.counter(METRICS_NAMESPACE, "videos_left_to_other_run")

    def setup(self) -> None:
        self.writer = self.index.open()

    def process(self, element) -> Iterator:
        (video_id, target, _version), statuses = element
        statuses = list(statuses)
        outcome, letter = units.finalize_target(video_id, target, statuses, lambda: self.writer.finalize_video(video_id, statuses[0][2]))
        {"done": self.done, "left": self.left, "failed": self.failed}[outcome].inc()
        if letter is not None:
            yield letter


# --------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class IndexJob:
    manifest: str
    index: IndexTarget
    sampling: video.SamplingConfig
    model: ModelSpec
    force: bool = False
    limit: int | None = None  # --limit: only the first N entries are read
    convert_threads: int | None = None
    run_id: str = "run"  # leases are taken under it
    cache: str | None = None  # --cache: also write the _generic entries there
    cache_config: dict | None = None
    model_handle: shared.Shared = field(default_factory=shared.Shared, compare=False)

    @property
    def dead_letter_path(self) -> str:
        return self.index.url.rstrip("/") + ".deadletter.jsonl"

    @property
    def summary_path(self) -> str:
        return self.index.url.rstrip("/") + ".summary.json"


def build_pipeline(pipeline: beam.Pipeline, job: IndexJob) -> None:
    """Add the index job's transforms to ``pipeline``."""
    entries = units.read_entries(pipeline, job.manifest, job.limit)
    planned = entries | "PlanIndexVideo" >> beam.ParDo(
        PlanIndexVideoFn(job.index, job.sampling, job.force, job.cache, job.cache_config)
    ).with_outputs(DEAD_LETTER, "unit_status", main="units")
    loaded = (
        planned.units
        | "SpreadUnits" >> beam.Reshuffle()
        | "LoadUnit"
        >> beam.ParDo(
            LoadUnitFn(METRICS_NAMESPACE, job.sampling, job.convert_threads, lease_base=job.index.url, run_id=job.run_id, label="index")
        ).with_outputs(DEAD_LETTER, "unit_status", main="inputs")
    )
    encoded = loaded.inputs | "EncodeUnit" >> beam.ParDo(EncodeUnitFn(job.model, job.model_handle)).with_outputs(
        DEAD_LETTER, "unit_status", "blocks", main="features"
    )
    written = encoded.features | "WriteIndexUnit" >> beam.ParDo(WriteIndexUnitFn(job.index, job.run_id)).with_outputs(DEAD_LETTER, main="status")
    statuses = [planned.unit_status, loaded.unit_status, encoded.unit_status, written.status]
    letters = [planned[DEAD_LETTER], loaded[DEAD_LETTER], encoded[DEAD_LETTER], written[DEAD_LETTER]]
    if job.cache is not None:
        blocks = encoded.blocks | "WriteBlock" >> beam.ParDo(WriteBlockFn(job.cache, job.cache_config)).with_outputs(DEAD_LETTER, main="status")
        statuses.append(blocks.status)
        letters.append(blocks[DEAD_LETTER])
    index_status, cache_status = (
        statuses
        | "AllUnitStatus" >> beam.Flatten()
        | "GroupUnitsPerTarget" >> beam.GroupByKey()
        | "IndexOrCache" >> beam.Partition(lambda kv, _n: 0 if kv[0][1] == INDEX_TARGET else 1, 2)
    )
    letters.append(index_status | "FinalizeIndexVideo" >> beam.ParDo(FinalizeIndexVideoFn(job.index)))
    if job.cache is not None:
        letters.append(cache_status | "FinalizeEntry" >> beam.ParDo(FinalizeEntryFn(job.cache, job.cache_config)))
    letters | "AllDeadLetters" >> beam.Flatten() | "WriteDeadLetters" >> WriteDeadLetters(job.index.url, job.run_id)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="corpus manifest (JSON Lines; local path or fsspec URL)")
    parser.add_argument("--index", required=True, help="segment index URL (local path, memory://, gs://...)")
    add_model_arguments(parser)
    parser.add_argument(
        "--index-dtype",
        choices=index_layout.STORED_DTYPES,
        default=index_layout.DEFAULT_STORED_DTYPE,
        help="stored dtype of the visual features (default %(default)s: lossless for a bf16 model)",
    )
    parser.add_argument("--cache", default=None, help="also write every video's query-agnostic (_generic) entry into this token cache")
    add_storage_form_argument(parser)
    add_job_arguments(parser)


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    from tempo_ops.index_store import IndexWriter

    use_storage_options(args, [args.manifest, args.index, args.cache, args.svlm, args.compressor])
    sampling = sampling_config_from_args(args)
    convert_threads = convert_threads_from_args(args)
    check_limit(args)
    check_output_location(args.index, {"--manifest": args.manifest}, what="--index")
    if args.cache is not None:
        check_output_location(args.cache, {"--manifest": args.manifest, "--index": args.index}, what="--cache")
    units.validate_manifest_or_raise(args.manifest, args.limit)
    existing_cache = open_existing_cache(args.cache) if args.cache is not None else None
    if existing_cache is not None:
        check_cache_sampling(existing_cache, sampling, args.storage_form)
    check_device(args.device)
    spec = model_spec_from_args(args)
    print(f"[index] loading compressor from {args.svlm} for the index fingerprint", file=sys.stderr, flush=True)
    model_handle = shared.Shared()
    driver_model = model_handle.acquire(lambda: SharedModel(units.load_compressor(spec)))
    compressor = driver_model.model
    config = index_config_for(compressor, sampling, args.index_dtype)
    layers = deepstack_layers(compressor)
    writer = IndexWriter.open(
        args.index, config, deepstack_layers=layers, segments_per_unit=args.unit_segments or index_layout.DEFAULT_SEGMENTS_PER_UNIT
    )
    if args.unit_segments is not None and args.unit_segments != writer.segments_per_unit:
        raise ConfigError(f"--unit-segments {args.unit_segments} differs from the index's {writer.segments_per_unit}")
    cache_cfg = None
    if args.cache is not None:
        from tempo_ops.store import CacheWriter

        form = choose_storage_form(existing_cache, args.storage_form, getattr(compressor, "dtype", None))
        cache_cfg = cache_config(compressor.fingerprint(), sampling, form)
        cache_writer = CacheWriter.open(args.cache, cache_cfg)
        if writer.segments_per_unit % cache_writer.segments_per_shard:
            raise ConfigError(
                f"index units of {writer.segments_per_unit} segments must be whole cache shards of {cache_writer.segments_per_shard}"
            )
    run = JobRun.start("index", args.index)
    job = IndexJob(
        args.manifest,
        IndexTarget(args.index, config, layers, writer.segments_per_unit),
        sampling,
        spec,
        force=args.force,
        limit=args.limit,
        convert_threads=convert_threads,
        run_id=run.run_id,
        cache=args.cache,
        cache_config=cache_cfg,
        model_handle=model_handle,
    )
    options = pipeline_options_from_args(extra_args, job_name="tempo-index", local_workers=args.local_workers, local_mode=args.local_mode)
    print(
        f"[index] run {run.run_id}: manifest {args.manifest} valid"
        + (f" (first {args.limit} entries)" if args.limit is not None else "")
        + f", starting runner {runner_name(options)}",
        file=sys.stderr,
        flush=True,
    )
    result = units.run_pipeline("index", options, lambda p: build_pipeline(p, job), run, lease_base=args.index)
    if result is None:
        return EXIT_OK
    summary = units.write_summary(
        METRICS_NAMESPACE,
        result,
        run=run,
        runner=runner_name(options),
        outputs={"manifest": job.manifest, "index": args.index, "cache": args.cache},
        config=config,
        fingerprint=writer.fingerprint,
    )
    c, t = summary["counts"], summary["timing"]
    print(
        f"[index] done in {t['wall_s']:.1f}s: videos {c.get('videos_completed', 0)} indexed / {c.get('videos_failed', 0)} failed / "
        f"{c.get('videos_skipped_complete', 0)} already complete, segments {c.get('segments_encoded', 0)} "
        f"({t['segments_per_s']} seg/s; decode {t['decode_s']}s, model {t['model_s']}s), {c.get('bytes_written', 0)} bytes",
        file=sys.stderr,
    )
    if c.get("units_held_elsewhere"):
        print(
            f"[index] {c['units_held_elsewhere']} work unit(s) were being computed by another run; "
            f"{c.get('videos_left_to_other_run', 0)} video(s) are left for it to complete",
            file=sys.stderr,
        )
    units.print_failures("index", summary)
    del driver_model
    return EXIT_OK if summary["failures"]["items"] == 0 else EXIT_ITEMS_FAILED
