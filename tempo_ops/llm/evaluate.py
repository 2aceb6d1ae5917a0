"""Evaluation of the LLM stage over cached tokens: work items, cost batches, one batch → prediction rows.

Beam-free; ``pipelines/evaluate.py`` composes it. An ``EvalItem`` is one (video, query,
budget, policy) with its allocation already decided (from relevance only); a worker fetches
its packed tokens (from the cache or from a shard sample), builds the LLM input with
``TempoLLM.build_inputs``, answers a batch with ``TempoLLM.generate`` and scores each answer
(``tempo_ops.llm.answers``). Prediction rows are plain dicts (``PREDICTION_FIELDS``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.shard_sample import sample_key, shard_set_name
from tempo_ops.chunking import consecutive_chunks
from tempo_ops.llm.answers import score_answer
from tempo_ops.query_text import get_template, render_query

PREDICTION_FIELDS: tuple[str, ...] = (
    "key", "video_id", "query_id", "budget", "policy", "prompt_template", "rule",
    "n_segments", "frames", "tokens_allocated", "tokens_used", "tokens_per_frame", "segments_kept", "truncated",
    "raw_answer", "parsed_answer", "answer", "correct", "no_answer", "metadata",
)
"""Fields of one ``predictions.jsonl`` row (documented in README "Evaluate")."""
TEXT_TOKEN_ESTIMATE = 96
"""Prompt text positions assumed per sample when estimating a batch's cost (system + template)."""
TIMESTAMP_TOKEN_ESTIMATE = 8
"""Positions of one ``<t seconds>`` text assumed when estimating cost."""


def prediction_key(video_id: str, query_id: str, budget: int, policy: str) -> str:
    """The unique id of one prediction: ``{sample_key}@{budget}-{policy}`` (sanitised, dot-free)."""
    return f"{sample_key(video_id, query_id)}@{shard_set_name(budget, policy)}"


@dataclass(frozen=True)
class EvalItem:
    """One prediction to make: a (video, query) entry at one (budget, policy).

    ``allocation``: ``(S,)`` tokens per segment; ``context``: the rendered query
    (``render_query``); ``metadata``: the manifest's video metadata (for ``--group-by``);
    ``frames_per_segment``: the cache's window (for tokens/frame); ``cost``: estimated
    sequence length (batching).
    """

    video_id: str
    query_id: str
    budget: int
    policy: str
    allocation: tuple[int, ...]
    context: str
    prompt_template: str
    options: tuple[str, ...] | None
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    frames_per_segment: int = 8
    cost: int = 0

    @property
    def key(self) -> str:
        return prediction_key(self.video_id, self.query_id, self.budget, self.policy)

    @property
    def max_new_tokens(self) -> int:
        return get_template(self.prompt_template).max_new_tokens


def estimate_cost(allocation: Sequence[int], context: str) -> int:
    """Estimated LLM sequence length of a sample: kept tokens + timestamps + prompt text."""
    k = np.asarray(allocation, dtype=np.int64)
    return int(k.sum()) + TIMESTAMP_TOKEN_ESTIMATE * int(np.count_nonzero(k)) + TEXT_TOKEN_ESTIMATE + len(context) // 3


def resolve_context(
    question: str,
    options: Sequence[str] | None,
    *,
    template: str | None,
    recorded_template: str | None,
    recorded_text: str | None,
) -> tuple[str, str]:
    """``(template name, context)`` the LLM answers for one query.

    The template is ``template`` when given, else the one the cache entry recorded
    (``recorded_template``), else ``plain``. The context is the text the compressor read
    (``recorded_text``) when it was rendered under that same template, else
    ``render_query(question, options, template)``: the LLM answers what the compressor read.
    """
    name = get_template(template or recorded_template).name
    if recorded_text is not None and recorded_template == name:
        return name, recorded_text
    return name, render_query(question, options, name)


def resolve_sample_context(meta: dict[str, Any], template: str | None = None) -> tuple[str, str]:
    """``(template name, context)`` of a decoded shard sample's ``meta`` (``resolve_context`` with
    the template and query text the sample recorded). ``tempo eval --shards`` and ``tempo train``
    both call it, so evaluation and training read the same text."""
    return resolve_context(
        meta["question"], meta.get("options"), template=template,
        recorded_template=meta.get("prompt_template"), recorded_text=meta.get("query_text"),
    )


def make_item(
    video_id: str,
    query_id: str,
    budget: int,
    policy: str,
    allocation: Sequence[int],
    *,
    question: str,
    options: Sequence[str] | None,
    answer: str,
    prompt_template: str | None,
    metadata: dict[str, Any] | None = None,
    frames_per_segment: int = 8,
    context: str | None = None,
) -> EvalItem:
    """An ``EvalItem``; ``context`` defaults to ``render_query(question, options, prompt_template)``."""
    template = get_template(prompt_template).name
    ctx = render_query(question, options, template) if context is None else context
    alloc = tuple(int(x) for x in allocation)
    return EvalItem(
        video_id, query_id, int(budget), policy, alloc, ctx, template,
        tuple(options) if options else None, str(answer), dict(metadata or {}), int(frames_per_segment),
        estimate_cost(alloc, ctx),
    )


def plan_batches(items: Sequence[EvalItem], *, max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices of ``items`` cut into batches by token cost.

    Items are ordered by (max_new_tokens, cost) so a batch holds similar lengths (little
    padding) and one generation limit; consecutive items are chunked with
    ``consecutive_chunks`` under ``max_batch_tokens`` and at most ``max_batch_size`` per batch.
    """
    order = sorted(range(len(items)), key=lambda i: (items[i].max_new_tokens, items[i].cost, items[i].key))
    batches: list[list[int]] = []
    start = 0
    while start < len(order):  # one run of equal max_new_tokens at a time
        limit = items[order[start]].max_new_tokens
        stop = start
        while stop < len(order) and items[order[stop]].max_new_tokens == limit:
            stop += 1
        run = order[start:stop]
        for chunk in consecutive_chunks([items[i].cost for i in run], max_batch_tokens):
            for j in range(0, len(chunk), max(1, max_batch_size)):
                batches.append([run[c] for c in chunk[j : j + max(1, max_batch_size)]])
        start = stop
    return batches


@dataclass
class BatchOutcome:
    """What one batch produced: prediction ``rows``, ``failures`` as (item, exception, stage), and
    seconds spent fetching + building inputs (``prepare_s``) and generating (``llm_s``)."""

    rows: list[dict[str, Any]]
    failures: list[tuple[EvalItem, BaseException, str]]
    prepare_s: float = 0.0
    llm_s: float = 0.0


Fetch = Callable[[EvalItem], tuple[Any, Sequence[str]]]
"""``fetch(item) -> (tokens (T, D_svlm), timestamp_texts [S])`` for ``item.allocation``."""


def prediction_row(item: EvalItem, inputs: Any, generation: Any) -> dict[str, Any]:
    """One prediction row (``PREDICTION_FIELDS``) from an item, its ``LLMInputs`` and its ``Generation``."""
    scored = score_answer(generation.text, item.answer, item.options, item.prompt_template)
    frames = len(item.allocation) * item.frames_per_segment
    return {
        "key": item.key,
        "video_id": item.video_id,
        "query_id": item.query_id,
        "budget": item.budget,
        "policy": item.policy,
        "prompt_template": item.prompt_template,
        "rule": scored.rule,
        "n_segments": len(item.allocation),
        "frames": frames,
        "tokens_allocated": int(sum(item.allocation)),
        "tokens_used": int(inputs.visual_tokens),
        "tokens_per_frame": inputs.visual_tokens / frames if frames else 0.0,
        "segments_kept": int(inputs.segments_kept),
        "truncated": int(inputs.truncated),
        "raw_answer": generation.text,
        "parsed_answer": scored.parsed,
        "answer": item.answer,
        "correct": bool(scored.correct),
        "no_answer": scored.parsed is None,
        "metadata": item.metadata,
    }


def evaluate_batch(llm: Any, items: Sequence[EvalItem], fetch: Fetch) -> BatchOutcome:
    """Answer and score one batch (all items share ``max_new_tokens``).

    An item whose tokens cannot be fetched or whose input cannot be built fails alone
    (stage ``"pack"``); a failure of generation fails the whole batch (stage ``"model"``).
    """
    import torch

    outcome = BatchOutcome([], [])
    t0 = time.perf_counter()
    ready: list[tuple[EvalItem, Any]] = []
    with torch.inference_mode():
        for item in items:
            try:
                tokens, times = fetch(item)
                ready.append((item, llm.build_inputs(tokens, np.asarray(item.allocation, np.int64), times, item.context)))
            except Exception as exc:  # noqa: BLE001 - one bad entry must not sink its batch
                outcome.failures.append((item, exc, "pack"))
    t1 = time.perf_counter()
    outcome.prepare_s = t1 - t0
    if not ready:
        return outcome
    try:
        generations = llm.generate([x for _, x in ready], max_new_tokens=max(i.max_new_tokens for i, _ in ready))
    except Exception as exc:  # noqa: BLE001 - reported per item as dead letters
        outcome.failures += [(item, exc, "model") for item, _ in ready]
        return outcome
    outcome.llm_s = time.perf_counter() - t1
    outcome.rows = [prediction_row(item, x, g) for (item, x), g in zip(ready, generations)]
    return outcome
