"""The shards job: token cache → WebDataset training shards (``tempo shards``).

For every complete (video, query) entry of the cache whose manifest query is annotated (has
an ``answer``), one sample per (budget, policy); one shard set per (budget, policy) under
``{out}/{budget}-{policy}/`` (format: ``schemas/shard_sample.py``).

Graph::

    driver: plan (list complete entries, read their relevance only, allocate every
            (budget, policy), assign samples to shards deterministically; skip shard sets
            whose index.json already holds the same plan)
    Create(shard tasks) → Reshuffle (fuse break: spread shards over workers)
      → WriteShard  (one writer per shard: pack each sample from the cache, write the tar,
                     then its completion record; complete shards of the same plan are skipped)
      → GroupByKey(shard set) → WriteIndex (index.json last, only when every shard landed)
    failures (planning, packing, writing) → dead letters → ``{out}.deadletter.jsonl``

A run summary goes to ``{out}.summary.json`` (each run's own copies under ``{out}.runs/``,
see ``pipelines/job_support.py``). A shard set with no sample (no complete entry has an
answer in the manifest) is written as an empty ``index.json`` ("0 samples"), not an error.
``--out`` must not be, contain or lie inside the cache or the manifest. Exit status 0 when
every planned sample was written, 1 when some were dead-lettered (the rest is written), 2
on a configuration or fatal storage error, 130/143 when interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.beam_support import (
    DEAD_LETTER,
    DeadLetter,
    ProgressReporter,
    WriteDeadLetters,
    add_runner_arguments,
    dead_letter_counts,
    pipeline_options_from_args,
    write_dead_letter_file,
)
from pipelines.job_support import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    JobRun,
    add_storage_option_argument,
    check_output_location,
    use_storage_options,
)
from schemas import manifest as manifest_schema
from schemas.shard_sample import sample_key, shard_set_name
from tempo_ops.allocation import POLICIES, allocate_with_report, allocation_stats
from tempo_ops.errors import ConfigError
from tempo_ops.packing import PACK_MODES
from tempo_ops.shards import (
    PlannedSample,
    ShardRecord,
    ShardSetPlan,
    ShardTask,
    build_sample,
    cleanup_partials,
    estimate_sample_bytes,
    make_index,
    plan_shard_set,
    read_completion,
    read_index,
    shard_done,
    shard_set_complete,
    write_index,
    write_shard,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tempo shards`` (unknown ones go to Beam)."""
    parser.add_argument("--cache", required=True, help="token cache URL (local path or fsspec URL)")
    parser.add_argument("--manifest", required=True, help="corpus manifest (JSON Lines) with question answers")
    parser.add_argument("--budgets", default="4096,8192", help="comma-separated token budgets, e.g. 4096,8192")
    parser.add_argument("--policies", default="ata", help=f"comma-separated policies from {','.join(POLICIES)}")
    parser.add_argument("--out", required=True, help="output directory URL; one {budget}-{policy}/ shard set per pair")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MB (10^6 bytes)")
    parser.add_argument("--pack-mode", choices=PACK_MODES, default="head", help="keep the first (head) or last k_i tokens")
    parser.add_argument(
        "--k-min",
        type=int,
        default=4,
        help="floor of tokens per segment for ata, proportional and topk (lowered to budget/segments when the "
        "budget cannot give every segment that many); uniform and its ignore it",
    )
    parser.add_argument("--k-max", type=int, default=None, help="maximum tokens per segment (default: the cache's K)")
    parser.add_argument("--force", action="store_true", help="rewrite complete shards and shard sets")
    add_storage_option_argument(parser)
    add_runner_arguments(parser, default_mode="processes", loads_model=False)  # tar writing is pure Python (GIL-bound)


def parse_list(text: str, *, what: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (order kept, duplicates dropped); ConfigError when empty."""
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not items:
        raise ConfigError(f"--{what} is empty", item=what)
    return items


def parse_budgets(text: str) -> list[int]:
    """``"4096,8192"`` → ``[4096, 8192]``; ConfigError for non-integers and budgets below 1.

    A budget smaller than a video's number of segments is allowed; what each policy does
    then is in ``tempo_ops/allocation.py`` (and reported per sample: ``over_budget``).
    """
    out = []
    for item in parse_list(text, what="budgets"):
        try:
            value = int(item)
        except ValueError as exc:
            raise ConfigError(f"budget {item!r} is not an integer", item="budgets") from exc
        if value < 1:
            raise ConfigError(f"budget {value} is below 1 token", item="budgets")
        out.append(value)
    return out


def parse_policies(text: str) -> list[str]:
    """Policy names, checked against ``tempo_ops.allocation.POLICIES``."""
    items = parse_list(text, what="policies")
    unknown = [p for p in items if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; expected some of {list(POLICIES)}", item="policies")
    return items


def set_url(out: str, budget: int, policy: str) -> str:
    """URL of the shard set directory for (budget, policy)."""
    return f"{out.rstrip('/')}/{shard_set_name(budget, policy)}"


# --------------------------------------------------------------------------- planning (driver)
def plan_job(
    reader: Any,
    manifest_url: str,
    budgets: Sequence[int],
    policies: Sequence[str],
    shard_size_bytes: int,
    *,
    k_min: int = 4,
    k_max: int | None = None,
) -> tuple[list[ShardSetPlan], list[DeadLetter], dict[str, int]]:
    """Plan every shard set from the cache's complete entries and the manifest's annotations.

    Reads only each entry's metadata and relevance; each sample also carries its video's
    manifest metadata. Returns (plans in (budget, policy) order, dead letters of entries that
    could not be planned, counts).
    """
    from pipelines.compress import GENERIC_QUERY_ID

    questions = {}
    metadata = {}
    for video in manifest_schema.iter_manifest(manifest_url):
        metadata[video.video_id] = video.metadata
        for q in video.queries:
            if q.answer is not None:  # only annotated questions become samples
                questions[(video.video_id, q.query_id)] = q
            else:
                questions[(video.video_id, q.query_id)] = None
    frames_per_segment = int((getattr(reader, "config", None) or {}).get("sampling", {}).get("window", 8))
    samples: dict[tuple[int, str], list[PlannedSample]] = {(b, p): [] for b in budgets for p in policies}
    stats: dict[tuple[int, str], list[dict[str, Any]]] = {(b, p): [] for b in budgets for p in policies}
    dead: list[DeadLetter] = []
    counts = {"entries": 0, "not_in_manifest": 0, "query_agnostic": 0, "unannotated": 0, "planned_entries": 0}
    video_frames: dict[str, int | None] = {}
    for video_id, query_id in sorted(reader.entries(complete_only=True)):
        counts["entries"] += 1
        if query_id == GENERIC_QUERY_ID and video_id in metadata:
            counts["query_agnostic"] += 1  # a video without questions: nothing to train on
            continue
        if (video_id, query_id) not in questions:
            counts["not_in_manifest"] += 1
            continue
        q = questions[(video_id, query_id)]
        if q is None:
            counts["unannotated"] += 1
            continue
        try:
            if video_id not in video_frames:
                video_frames[video_id] = _sampled_frames(reader, video_id)
            entry = reader.entry(video_id, query_id)
            scores = np.asarray(entry.relevance(), dtype=np.float32)
            S, K, D = int(entry.n_segments), int(entry.K), int(entry.D)
            key = sample_key(video_id, query_id)
            planned = []
            for b in budgets:
                for p in policies:
                    res = allocate_with_report(scores, b, policy=p, k_min=k_min, k_max=min(k_max or K, K))
                    ps = PlannedSample(
                        key, video_id, query_id, q.text, q.options, q.answer,
                        tuple(int(x) for x in res.k), estimate_sample_bytes(res.report.total, D, S),
                        metadata=dict(metadata.get(video_id) or {}),
                    )
                    st = allocation_stats(res.k, frames_per_segment, b, frames=video_frames[video_id])
                    planned.append(((b, p), ps, st))
        except Exception as exc:  # noqa: BLE001 - any failure of one entry is its dead letter
            dead.append(DeadLetter.from_exception(exc, video_id=video_id, query_id=query_id, stage="plan"))
            continue
        counts["planned_entries"] += 1
        for bp, ps, st in planned:
            samples[bp].append(ps)
            stats[bp].append(st)
    plans = []
    for b in budgets:
        for p in policies:
            st = stats[(b, p)]
            summary = {
                "samples": len(st),
                "mean_tokens": float(np.mean([s["tokens"] for s in st])) if st else 0.0,
                "mean_tokens_per_frame": float(np.mean([s["tokens_per_frame"] for s in st])) if st else 0.0,
                "mean_budget_share": float(np.mean([s["budget_share"] for s in st])) if st and b else 0.0,
                "over_budget_samples": sum(1 for s in st if s["over_budget"]),
                "frames_per_segment": frames_per_segment,
            }
            plans.append(plan_shard_set(shard_set_name(b, p), b, p, samples[(b, p)], shard_size_bytes, stats=summary))
    return plans, dead, counts


def _sampled_frames(reader: Any, video_id: str) -> int | None:
    """The video's real number of sampled frames (from its cache record), None when not recorded."""
    try:
        meta = reader.video_meta(video_id)
    except Exception:  # noqa: BLE001 - readers without video records fall back to S * window
        return None
    frames = meta.get("frame_indices") if isinstance(meta, dict) else None
    return len(frames) if isinstance(frames, list) and frames else None


# --------------------------------------------------------------------------- Beam stages
class WriteShardFn(beam.DoFn):
    """Packs and writes one whole shard (the only writer of that shard); emits (set, record)."""

    def __init__(self, cache_url: str, out: str, pack_mode: str, fingerprint: Any, force: bool) -> None:
        self.cache_url = cache_url
        self.out = out
        self.pack_mode = pack_mode
        self.fingerprint = fingerprint
        self.force = force
        self._reader = None
        self._progress = None

    def setup(self) -> None:
        from tempo_ops.store import CacheReader

        self._reader = CacheReader(self.cache_url)
        self._progress = ProgressReporter("shards", unit="samples")

    def process(self, task: ShardTask) -> Iterator[Any]:
        url = set_url(self.out, task.budget, task.policy)
        if not self.force and shard_done(url, task.n, task.keys):
            yield (task.set_name, read_completion(url, task.n))
            return
        failures: list[DeadLetter] = []

        def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            for s in task.samples:
                try:
                    entry = self._reader.entry(s.video_id, s.query_id)
                    item = build_sample(
                        entry, s, budget=task.budget, policy=task.policy, pack_mode=self.pack_mode,
                        cache_fingerprint=self.fingerprint,
                    )
                except Exception as exc:  # noqa: BLE001 - one bad entry must not sink its shard
                    failures.append(
                        DeadLetter.from_exception(exc, video_id=s.video_id, query_id=s.query_id, stage="pack", set=task.set_name)
                    )
                    continue
                yield item

        try:
            record = write_shard(url, task.n, samples(), planned_keys=task.keys)
        except Exception as exc:  # noqa: BLE001 - the shard is left incomplete; its samples are dead letters
            for s in task.samples:
                yield beam.pvalue.TaggedOutput(
                    DEAD_LETTER,
                    DeadLetter.from_exception(exc, video_id=s.video_id, query_id=s.query_id, stage="write_shard", set=task.set_name),
                )
            return
        for letter in failures:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, letter)
        self._progress.add(done=len(task.samples), shards_done=1)
        yield (task.set_name, record)


class WriteIndexFn(beam.DoFn):
    """Writes a shard set's index.json once all its shards have completion records."""

    def __init__(self, out: str, plans: dict[str, ShardSetPlan], pack_mode: str, fingerprint: Any) -> None:
        self.out = out
        self.plans = plans
        self.pack_mode = pack_mode
        self.fingerprint = fingerprint

    def process(self, element: tuple[str, Any]) -> Iterator[str]:
        name, records = element
        plan = self.plans[name]
        # Keyed by shard name: a retried bundle may report the same shard twice.
        records = list({r.name: r for r in records if isinstance(r, ShardRecord)}.values())
        if len(records) != len(plan.tasks):
            logger.warning("shard set %s: %d of %d shards written; index.json not written", name, len(records), len(plan.tasks))
            return
        doc = make_index(plan, records, pack_mode=self.pack_mode, cache_fingerprint=self.fingerprint)
        yield write_index(set_url(self.out, plan.budget, plan.policy), doc)


def _write_empty_set(out: str, plan: ShardSetPlan, pack_mode: str, fingerprint: Any) -> None:
    write_index(set_url(out, plan.budget, plan.policy), make_index(plan, [], pack_mode=pack_mode, cache_fingerprint=fingerprint))


# --------------------------------------------------------------------------- entry point
def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    """Run the job; returns the exit status (see module docstring)."""
    from tempo_ops.store import CacheReader

    use_storage_options(args, [args.cache, args.manifest, args.out])
    budgets = parse_budgets(args.budgets)
    policies = parse_policies(args.policies)
    if args.shard_size_mb <= 0:
        raise ConfigError(f"--shard-size-mb must be positive, got {args.shard_size_mb}", item="shard-size-mb")
    if args.k_min < 0 or (args.k_max is not None and args.k_max < max(1, args.k_min)):
        raise ConfigError(f"need 0 <= --k-min <= --k-max, got {args.k_min}, {args.k_max}", item="k-min")
    out = args.out.rstrip("/")
    check_output_location(out, {"--cache": args.cache, "--manifest": args.manifest}, what="--out")
    reader = CacheReader(args.cache)
    fingerprint = reader.fingerprint
    run_ = JobRun.start("shards", out)
    ProgressReporter.reset("shards")
    with run_.interruptible(partial=lambda: {"out": out, "counts_so_far": ProgressReporter.snapshot("shards")}):
        plans, dead, counts = plan_job(
            reader, args.manifest, budgets, policies, int(args.shard_size_mb * 1_000_000), k_min=args.k_min, k_max=args.k_max
        )
        todo = [p for p in plans if args.force or not shard_set_complete(set_url(out, p.budget, p.policy), p.plan_sha256)]
        skipped_sets = [p.set_name for p in plans if p not in todo]
        for p in todo:
            cleanup_partials(set_url(out, p.budget, p.policy))
            if not p.tasks:
                _write_empty_set(out, p, args.pack_mode, fingerprint)
        tasks = [t for p in todo for t in p.tasks]
        ProgressReporter("shards", unit="samples").add(quiet=True, total=sum(len(t.samples) for t in tasks), shards_total=len(tasks))
        if tasks or dead:
            options = pipeline_options_from_args(
                extra_args, job_name="tempo-shards", local_workers=args.local_workers, local_mode=args.local_mode
            )
            with beam.Pipeline(options=options) as pipeline:
                letters = [pipeline | "PlanDeadLetters" >> beam.Create(dead)]
                if tasks:
                    results = (
                        pipeline
                        | "ShardTasks" >> beam.Create(tasks)
                        | "Spread" >> beam.Reshuffle()
                        | "WriteShard"
                        >> beam.ParDo(WriteShardFn(args.cache, out, args.pack_mode, fingerprint, args.force)).with_outputs(
                            DEAD_LETTER, main="records"
                        )
                    )
                    _ = (
                        results.records
                        | "BySet" >> beam.GroupByKey()
                        | "WriteIndex" >> beam.ParDo(WriteIndexFn(out, {p.set_name: p for p in todo}, args.pack_mode, fingerprint))
                    )
                    letters.append(results[DEAD_LETTER])
                _ = letters | "AllDeadLetters" >> beam.Flatten() | "WriteDeadLetters" >> WriteDeadLetters(out, run_.run_id)
        else:
            write_dead_letter_file(out, run_.run_id, [])  # nothing ran: no failures this time
    return _report(out, plans, skipped_sets, counts, run_, [p.set_name for p in todo])


def _report(out: str, plans: list[ShardSetPlan], skipped: list[str], counts: dict, run: JobRun, ran: list[str]) -> int:
    dead_path = run.dead_letter_url
    wall = run.elapsed()
    sets = {}
    written_bytes = 0
    incomplete = []
    for p in plans:
        url = set_url(out, p.budget, p.policy)
        try:
            doc = read_index(url)
        except Exception:  # noqa: BLE001 - a missing index is reported, not raised
            incomplete.append(p.set_name)
            print(f"{p.set_name}: INCOMPLETE (no index.json; see {dead_path})")
            continue
        mb = doc["total_bytes"] / 1e6
        if p.set_name in ran:
            written_bytes += doc["total_bytes"]
        st = doc.get("stats", {})
        sets[p.set_name] = {
            "samples": doc["total_samples"],
            "shards": len(doc["shards"]),
            "mb": mb,
            "failed": len(doc.get("failed", [])),
            "mean_tokens_per_frame": st.get("mean_tokens_per_frame"),
            "mean_budget_share": st.get("mean_budget_share"),
            "over_budget_samples": st.get("over_budget_samples"),
            "skipped_complete": p.set_name in skipped,
        }
        over = st.get("over_budget_samples") or 0
        print(
            f"{p.set_name}: {doc['total_samples']} samples, {len(doc['shards'])} shards, {mb:.2f} MB, "
            f"{st.get('mean_tokens_per_frame', 0.0):.2f} tokens/frame used, "
            f"{100 * st.get('mean_budget_share', 0.0):.1f}% of budget used"
            + (f", {over} sample(s) over budget" if over else "")
            + (" (already complete, skipped)" if p.set_name in skipped else "")
        )
    if plans and not any(s["samples"] for s in sets.values()):
        print(
            f"no sample to write: of {counts['entries']} complete cache entries, {counts['not_in_manifest']} are not "
            f"in the manifest, {counts['unannotated']} have no answer, {counts['query_agnostic']} are query-agnostic"
        )
    by_code = dead_letter_counts(run.own_dead_letter_url)
    failures = sum(by_code.values())
    summary = {
        "out": out,
        "counts": counts,
        "sets": sets,
        "incomplete_sets": incomplete,
        "failures": failures,
        "failures_by_code": by_code,
        "dead_letters": dead_path,
        "wall_s": wall,
        "bytes_written": written_bytes,
        "mb_per_s": written_bytes / 1e6 / wall if wall > 0 else 0.0,
    }
    status = "complete" if failures == 0 and not incomplete else "items_failed"
    run.write_summary(summary, status=status)
    print(f"{len(plans)} shard sets, {failures} failed items, {wall:.1f} s; summary: {run.summary_url} (history: {run.history_url})")
    return EXIT_OK if status == "complete" else EXIT_ITEMS_FAILED

