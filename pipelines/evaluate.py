"""The evaluation job: LLM answers at any budget and policy, from the cache or from shards (``tempo eval``).

From the cache (``--cache C --manifest M``), for every complete entry whose manifest query
has an answer, one prediction per (budget, policy)::

    driver: plan (complete entries, relevance only, allocate every (budget, policy), skip
            predictions already written; order by token cost and cut into batches)
    Create(batches) → Reshuffle (fuse break: spread batches over workers)
      → EvalBatch (one LLM per worker process via apache_beam.utils.shared: read + pack each
                   sample's kept tokens, build its input, answer the batch greedily, score,
                   write the batch's rows as one part file)
    failures (plan, pack, model) → dead letters → ``DIR/deadletter.jsonl``
    driver: merge parts → ``DIR/predictions.jsonl``; ``DIR/summary.json``; PNG plots

From shards (``--shards DIR/8192-ata/index.json``): one element per shard; a worker reads the
shard's samples (tokens are in the sample), batches them by cost and answers as above.

Re-runs skip predictions already written (``--force`` redoes them). On a remote runner the job
is submitted and the workers write the parts; running the same command locally afterwards finds
nothing left to do and merges, summarises and plots. Exit status 0 when every planned
prediction was made, 1 when some were dead-lettered, 2 on a configuration or fatal storage
error, 130/143 on SIGINT/SIGTERM (a partial summary marked ``interrupted`` is written; written
parts are kept and the next run resumes). Runs, summaries and history follow
``pipelines/job_support.py`` with the files inside ``--out``: ``DIR/summary.json``,
``DIR/deadletter.jsonl`` (latest) and ``DIR/runs/{run_id}.*`` (history). ``--out`` may not be,
contain or lie inside an input (``--cache``, ``--manifest``, ``--shards``, ``--llm``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipelines.beam_support import (
    DEAD_LETTER,
    DeadLetter,
    ProgressReporter,
    SharedModel,
    WriteDeadLetters,
    add_runner_arguments,
    counter_values,
    dead_letter_counts,
    is_local_runner,
    pipeline_options_from_args,
    runner_name,
)
from pipelines.build_shards import parse_budgets, parse_list, parse_policies
from pipelines.job_support import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    JobRun,
    add_storage_option_argument,
    check_output_location,
    use_storage_options,
)
from schemas import manifest as manifest_schema
from tempo_ops.allocation import allocate_with_report
from tempo_ops.errors import ConfigError
from tempo_ops.llm.evaluate import (
    EvalItem,
    evaluate_batch,
    make_item,
    plan_batches,
    resolve_context,
    resolve_sample_context,
)
from tempo_ops.llm.predictions import PredictionStore
from tempo_ops.llm.report import format_table, render_plots, summarize
from tempo_ops.packing import PACK_MODES
from tempo_ops.query_text import TEMPLATES

METRICS_NAMESPACE = "tempo.eval"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class LLMSpec:
    """Everything a worker needs to load the LLM stage (picklable, small)."""

    path: str
    device: str | None
    dtype: str | None
    numerics: str | None
    max_length: int
    torch_threads: int | None


def load_llm(spec: LLMSpec) -> Any:
    """Load the LLM stage described by ``spec`` (once per worker process)."""
    import torch

    from tempo_ops.llm import TempoLLM

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    return TempoLLM.from_pretrained(
        spec.path, device=spec.device, dtype=spec.dtype, numerics=spec.numerics, max_length=spec.max_length
    )


# --------------------------------------------------------------------------- planning (driver)
@dataclass
class Plan:
    items: list[EvalItem] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def plan_from_cache(
    reader: Any,
    manifest_url: str,
    budgets: Sequence[int],
    policies: Sequence[str],
    *,
    template: str | None,
    done: set[str],
    k_min: int = 4,
    k_max: int | None = None,
) -> Plan:
    """Every (complete entry with an answered query) × budget × policy not in ``done``.

    Reads each entry's metadata and relevance only; allocation happens here (milliseconds).
    The context is ``resolve_context``'s: the entry's recorded query text unless ``template``
    asks for another template than the entry was compressed with (counted in
    ``counts["context_differs_from_cache_query"]``).
    """
    questions: dict[tuple[str, str], tuple[Any, dict[str, Any], str | None]] = {}
    for video in manifest_schema.iter_manifest(manifest_url):
        for q in video.queries:
            questions[(video.video_id, q.query_id)] = (q, video.metadata, getattr(video, "prompt_template", None))
    window = int((getattr(reader, "config", None) or {}).get("sampling", {}).get("window", 8))
    plan = Plan(counts={"entries": 0, "not_in_manifest": 0, "unanswered": 0, "planned": 0, "skipped_done": 0,
                        "context_differs_from_cache_query": 0})
    for u in reader.unreadable_entries() if hasattr(reader, "unreadable_entries") else []:
        plan.counts["unreadable"] = plan.counts.get("unreadable", 0) + 1  # listed but unreadable: reported
        plan.dead.append(DeadLetter(u["key"], None, "plan", "cache_corrupt", f"{u['key']}: {u['reason']}"))
    for video_id, query_id in sorted(reader.entries(complete_only=True)):
        plan.counts["entries"] += 1
        found = questions.get((video_id, query_id))
        if found is None:
            plan.counts["not_in_manifest"] += 1
            continue
        q, metadata, line_template = found
        if q.answer is None:
            plan.counts["unanswered"] += 1
            continue
        try:
            entry = reader.entry(video_id, query_id)
            entry.check_question(q.text, q.options)  # the tokens must answer this question: else a dead letter
            scores = np.asarray(entry.relevance(), dtype=np.float32)
            K = int(entry.K)
            name, context = resolve_context(
                q.text, q.options, template=template or line_template,
                recorded_template=getattr(entry, "prompt_template", None), recorded_text=entry.query_text,
            )
            items = []
            for b in budgets:
                for p in policies:
                    res = allocate_with_report(scores, b, policy=p, k_min=k_min, k_max=min(k_max or K, K))
                    items.append(
                        make_item(
                            video_id, query_id, b, p, res.k, question=q.text, options=q.options, answer=q.answer,
                            prompt_template=name, metadata=metadata, frames_per_segment=window, context=context,
                        )
                    )
        except Exception as exc:  # noqa: BLE001 - any failure of one entry is its dead letter
            plan.dead.append(DeadLetter.from_exception(exc, video_id=video_id, query_id=query_id, stage="plan"))
            continue
        if context != entry.query_text:
            plan.counts["context_differs_from_cache_query"] += 1
        for item in items:
            if item.key in done:
                plan.counts["skipped_done"] += 1
            else:
                plan.items.append(item)
                plan.counts["planned"] += 1
    return plan


def item_from_sample(sample: dict[str, Any], *, template: str | None, frames_per_segment: int) -> EvalItem:
    """The ``EvalItem`` of one decoded shard sample (``schemas.shard_sample.decode_sample``).

    The context is ``resolve_context``'s, from the sample's recorded ``prompt_template`` and
    ``query_text`` (what the compressor read), exactly as for the cache source.
    """
    meta = sample["meta"]
    name, context = resolve_sample_context(meta, template)
    return make_item(
        meta["video_id"], meta["query_id"], int(meta["budget"]), str(meta["policy"]),
        np.asarray(sample["alloc"], dtype=np.int64), question=meta["question"], options=meta.get("options"),
        answer=meta["answer"], prompt_template=name, metadata=meta.get("metadata") or {},
        frames_per_segment=frames_per_segment, context=context,
    )


# --------------------------------------------------------------------------- Beam stages (adapters only)
def _dead(item: EvalItem, exc: BaseException, stage: str):
    return beam.pvalue.TaggedOutput(
        DEAD_LETTER,
        DeadLetter.from_exception(exc, video_id=item.video_id, query_id=item.query_id, stage=stage,
                                  budget=item.budget, policy=item.policy),
    )


class _EvalFn(beam.DoFn):
    """Shared part of both evaluation DoFns: the worker's LLM, metrics and output parts."""

    def __init__(self, spec: LLMSpec, shared_handle: shared.Shared, out: str) -> None:
        self.spec = spec
        self.shared_handle = shared_handle
        self.out = out
        self.llm = None
        self.prepare_ms = Metrics.distribution(METRICS_NAMESPACE, "prepare_ms")
        self.llm_ms = Metrics.distribution(METRICS_NAMESPACE, "llm_ms")
        self.written = Metrics.counter(METRICS_NAMESPACE, "predictions_written")
        self.failed = Metrics.counter(METRICS_NAMESPACE, "predictions_failed")

    def setup(self) -> None:
        # Made here, not in __init__: a pickled reporter would count into a copy of the tally.
        self.progress = ProgressReporter("eval", unit="predictions")
        self.llm = self.shared_handle.acquire(lambda: SharedModel(load_llm(self.spec))).model
        self.store = PredictionStore(self.out)

    def _run(self, items: Sequence[EvalItem], fetch) -> Iterator:
        outcome = evaluate_batch(self.llm, items, fetch)
        self.prepare_ms.update(int(outcome.prepare_s * 1000))
        self.llm_ms.update(int(outcome.llm_s * 1000))
        for item, exc, stage in outcome.failures:
            self.failed.inc()
            yield _dead(item, exc, stage)
        try:
            self.store.write_part(outcome.rows)
        except Exception as exc:  # noqa: BLE001 - the batch is redone by the next run
            for row_item in [i for i in items if i.key in {r["key"] for r in outcome.rows}]:
                yield _dead(row_item, exc, "write")
            return
        self.written.inc(len(outcome.rows))
        self.progress.add(
            done=len(outcome.rows), failed=len(outcome.failures), segments=sum(r["n_segments"] for r in outcome.rows)
        )
        yield len(outcome.rows)


class EvalBatchFn(_EvalFn):
    """A batch of ``EvalItem``s from the cache → a part file of prediction rows (+ dead letters)."""

    def __init__(self, spec: LLMSpec, shared_handle: shared.Shared, out: str, cache_url: str, pack_mode: str) -> None:
        super().__init__(spec, shared_handle, out)
        self.cache_url = cache_url
        self.pack_mode = pack_mode

    def setup(self) -> None:
        from tempo_ops.store import CacheReader

        super().setup()
        self.reader = CacheReader(self.cache_url)

    def _fetch(self, item: EvalItem):
        from tempo_ops.packing import pack

        entry = self.reader.entry(item.video_id, item.query_id)
        packed = pack(entry, np.asarray(item.allocation, np.int64), list(entry.timestamp_texts), mode=self.pack_mode)
        return packed.tokens, packed.timestamp_texts

    def process(self, batch: list[EvalItem]) -> Iterator:
        yield from self._run(batch, self._fetch)


class EvalShardFn(_EvalFn):
    """One shard's samples → batches by cost → part files of prediction rows (+ dead letters)."""

    def __init__(self, spec, shared_handle, out, *, template, frames_per_segment, done, max_batch_tokens, max_batch_size):
        super().__init__(spec, shared_handle, out)
        self.template = template
        self.frames_per_segment = frames_per_segment
        self.done = frozenset(done)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size

    def process(self, shard_url: str) -> Iterator:
        from tempo_ops.shards import shard_dataset

        try:
            samples = list(shard_dataset(shard_url, nodesplitter=_all, workersplitter=_all))
        except Exception as exc:  # noqa: BLE001 - an unreadable shard is one dead letter
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER, DeadLetter.from_exception(exc, video_id=shard_url, query_id=None, stage="read_shard")
            )
            return
        items, tokens = [], {}
        for s in samples:
            item = item_from_sample(s, template=self.template, frames_per_segment=self.frames_per_segment)
            if item.key not in self.done:
                items.append(item)
                tokens[item.key] = (s["tokens"], s["timestamp_texts"])
        for batch in plan_batches(items, max_batch_tokens=self.max_batch_tokens, max_batch_size=self.max_batch_size):
            yield from self._run([items[i] for i in batch], lambda it: tokens[it.key])


def _all(urls):
    return urls


# --------------------------------------------------------------------------- entry point
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("source (one of)")
    src.add_argument("--cache", help="token cache URL (with --manifest)")
    src.add_argument("--shards", help="a shard set's index.json (or its directory), from tempo shards")
    parser.add_argument("--manifest", help="corpus manifest with answers (with --cache)")
    parser.add_argument("--llm", required=True, help="Tempo checkpoint (directory or fsspec URL) holding the LLM stage")
    parser.add_argument("--out", required=True, help="output directory (predictions.jsonl, summary.json, plots)")
    parser.add_argument("--budgets", default="4096,8192", help="comma-separated token budgets (cache source)")
    parser.add_argument("--policies", default="ata", help="comma-separated allocation policies (cache source)")
    parser.add_argument(
        "--prompt-template", default=None, choices=sorted(TEMPLATES),
        help="query template (default: the one each cache entry or shard sample records, else plain)",
    )
    parser.add_argument("--group-by", default="", help="comma-separated manifest metadata fields to break accuracy down by")
    parser.add_argument("--force", action="store_true", help="redo predictions already written")
    parser.add_argument("--pack-mode", choices=PACK_MODES, default="head", help="keep the first (head) or last k_i tokens")
    parser.add_argument("--k-min", type=int, default=4, help="minimum tokens per segment (policy floor)")
    parser.add_argument("--k-max", type=int, default=None, help="maximum tokens per segment (default: the cache's K)")
    parser.add_argument("--batch-size", type=int, default=8, help="most samples per LLM batch")
    parser.add_argument("--max-batch-tokens", type=int, default=65536, help="most (estimated) sequence positions per batch")
    parser.add_argument("--max-length", type=int, default=32768, help="LLM sequence limit (the visual tail is cut beyond it - 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--numerics", default=None, choices=["reference", "exact"], help="default: reference for bf16")
    add_storage_option_argument(parser)
    add_runner_arguments(parser, default_mode="threads")  # threads share one model


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    """Run the job; returns the exit status (see module docstring)."""
    if bool(args.cache) == bool(args.shards):
        raise ConfigError("give exactly one source: --cache (with --manifest) or --shards", item="eval")
    if args.cache and not args.manifest:
        raise ConfigError("--cache needs --manifest (the answers)", item="eval")
    if args.batch_size < 1 or args.max_batch_tokens < 1:
        raise ConfigError("--batch-size and --max-batch-tokens must be >= 1", item="eval")
    if args.k_min < 0 or (args.k_max is not None and args.k_max < max(1, args.k_min)):
        raise ConfigError(f"need 0 <= --k-min <= --k-max, got {args.k_min}, {args.k_max}", item="k-min")
    group_by = parse_list(args.group_by, what="group-by") if args.group_by.strip() else []
    use_storage_options(args, [args.cache, args.manifest, args.shards, args.llm, args.out])
    inputs = {"--cache": args.cache, "--manifest": args.manifest, "--shards": args.shards, "--llm": args.llm}
    check_output_location(args.out, {k: v for k, v in inputs.items() if v}, what="--out")
    job = JobRun.start("eval", args.out, inside=True)
    ProgressReporter.reset("eval")
    with job.interruptible(partial=lambda: {"out": args.out, "counts_so_far": ProgressReporter.snapshot("eval")}):
        return _run(args, extra_args, job, group_by)


def _run(args: argparse.Namespace, extra_args: list[str], job: JobRun, group_by: list[str]) -> int:
    from tempo_ops.shards import read_index, shard_urls

    threads = max(1, (os.cpu_count() or 1) // max(1, args.local_workers))
    spec = LLMSpec(args.llm, args.device, args.dtype, args.numerics, args.max_length, threads)
    print(f"[eval] loading the LLM stage from {args.llm}", file=sys.stderr)
    handle = shared.Shared()
    driver_llm = handle.acquire(lambda: SharedModel(load_llm(spec)))
    store = PredictionStore(args.out)
    if args.cache:
        from tempo_ops.store import CacheReader

        reader = CacheReader(args.cache)
        template = args.prompt_template
        source = {"cache": args.cache, "cache_fingerprint": reader.fingerprint}
    else:
        index = read_index(args.shards)
        template = args.prompt_template
        source = {"shards": args.shards, "plan_sha256": index.get("plan_sha256"), "cache_fingerprint": index.get("cache_fingerprint")}
    llm_identity = {k: v for k, v in driver_llm.model.fingerprint().items() if k != "name"}
    # What predictions depend on: weights and numerics, the cached data (not where it lives), packing.
    config = {
        "llm": llm_identity,
        "source": {k: v for k, v in source.items() if k not in ("cache", "shards")},
        "prompt_template": template,
        "pack_mode": args.pack_mode,
        "k_min": args.k_min,
        "k_max": args.k_max,
    }
    store.check_config(config, force=args.force)
    done = set(store.rows())

    options = pipeline_options_from_args(extra_args, job_name="tempo-eval", local_workers=args.local_workers, local_mode=args.local_mode)
    if not (is_local_runner(options) and (args.local_workers == 1 or args.local_mode == "threads")):
        del driver_llm  # workers are other processes
    dead_path = job.dead_letter_url
    counts: dict[str, int]
    pipeline = beam.Pipeline(options=options)
    if args.cache:
        plan = plan_from_cache(
            reader, args.manifest, parse_budgets(args.budgets), parse_policies(args.policies),
            template=template, done=done, k_min=args.k_min, k_max=args.k_max,
        )
        counts = dict(plan.counts)
        batches = [[plan.items[i] for i in b] for b in
                   plan_batches(plan.items, max_batch_tokens=args.max_batch_tokens, max_batch_size=args.batch_size)]
        counts["batches"] = len(batches)
        ProgressReporter("eval", unit="predictions").add(quiet=True, total=len(plan.items))
        letters = [pipeline | "PlanDeadLetters" >> beam.Create(plan.dead)]
        if batches:
            results = (
                pipeline
                | "Batches" >> beam.Create(batches)
                | "Spread" >> beam.Reshuffle()
                | "EvalBatch" >> beam.ParDo(EvalBatchFn(spec, handle, args.out, args.cache, args.pack_mode)).with_outputs(
                    DEAD_LETTER, main="written"
                )
            )
            letters.append(results[DEAD_LETTER])
    else:
        urls = shard_urls(args.shards)
        frames = int((index.get("stats") or {}).get("frames_per_segment", 8))
        counts = {"shards": len(urls), "skipped_done": len(done)}
        letters = [pipeline | "NoPlanDeadLetters" >> beam.Create([])]
        if urls:
            results = (
                pipeline
                | "Shards" >> beam.Create(urls)
                | "Spread" >> beam.Reshuffle()
                | "EvalShard" >> beam.ParDo(
                    EvalShardFn(spec, handle, args.out, template=template, frames_per_segment=frames, done=done,
                                max_batch_tokens=args.max_batch_tokens, max_batch_size=args.batch_size)
                ).with_outputs(DEAD_LETTER, main="written")
            )
            letters.append(results[DEAD_LETTER])
    _ = letters | "AllDeadLetters" >> beam.Flatten() | "WriteDeadLetters" >> WriteDeadLetters(
        args.out, job.run_id, inside=True
    )
    print(f"[eval] run {job.run_id}: {counts}, runner {runner_name(options)}", file=sys.stderr)
    result = pipeline.run()
    if not is_local_runner(options):
        print(
            f"[eval] submitted to {runner_name(options)}; run the same command locally afterwards to merge and summarise",
            file=sys.stderr,
        )
        return 0
    result.wait_until_finish()
    rows = store.merge()
    metrics = counter_values(result, METRICS_NAMESPACE)
    failures = dead_letter_counts(job.own_dead_letter_url)
    report = summarize(rows, group_by)
    plots = [store.write_file(name, png) for name, png in render_plots(report).items()] if rows else []
    wall = job.elapsed()
    written = int(metrics.get("predictions_written", 0))
    summary = {
        "runner": runner_name(options),
        "config": config,
        "source": source,
        "llm": args.llm,
        "counts": {**counts, "written": written, "failed": int(metrics.get("predictions_failed", 0))},
        "failures": {"items": sum(failures.values()), "by_code": failures},
        "dead_letter_file": dead_path,
        "predictions_file": store.path("predictions.jsonl"),
        "plots": plots,
        "timing": {
            "wall_s": round(wall, 3),
            "prepare_s": round(metrics.get("prepare_ms", 0) / 1000, 3),
            "llm_s": round(metrics.get("llm_ms", 0) / 1000, 3),
            "predictions_per_s": round(written / wall, 3) if wall > 0 else None,
        },
        "group_by": group_by,
        "results": report,
    }
    status = "complete" if summary["failures"]["items"] == 0 else "items_failed"
    summary = job.write_summary(summary, status=status)
    print_report(summary)
    return EXIT_OK if status == "complete" else EXIT_ITEMS_FAILED


def print_report(summary: dict[str, Any]) -> None:
    """The accuracy table, group breakdowns, no-answer count and the output paths."""
    res, c, t = summary["results"], summary["counts"], summary["timing"]
    print(format_table(res) if res["predictions"] else "(no predictions)")
    for field_name, g in res["by_group"].items():
        print(f"\nby {field_name}:")
        for value, grid in g["groups"].items():
            cells = ", ".join(
                f"{b}/{p} {100 * cell['accuracy']:.1f}% (n={cell['n']})" for b, pp in grid.items() for p, cell in pp.items()
            )
            print(f"  {value}: {cells}")
    print(
        f"\n{res['predictions']} predictions ({c.get('written', 0)} new this run, {c.get('skipped_done', 0)} already written), "
        f"{res['no_answer']} without a parseable answer (counted wrong), {summary['failures']['items']} failed items; "
        f"{t['wall_s']:.1f}s (read/pack {t['prepare_s']}s, LLM {t['llm_s']}s)"
    )
    differs = c.get("context_differs_from_cache_query", 0)
    if differs:
        print(
            f"note: for {differs} entries the compressor read another query text than the LLM's context "
            "(entries compressed under another prompt template; rendered anew for the LLM)"
        )
    print(f"predictions: {summary['predictions_file']}")
    print(f"summary:     {summary['predictions_file'].rsplit('/', 1)[0]}/{SUMMARY} (history: {summary['history']})")
    for p in summary["plots"]:
        print(f"plot:        {p}")
    if summary["failures"]["items"]:
        print(f"dead letters: {summary['dead_letter_file']} {json.dumps(summary['failures']['by_code'])}")
