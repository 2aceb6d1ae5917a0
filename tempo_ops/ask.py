"""One new question about one indexed video, end to end (``tempo ask``; Beam-free).

1. ``ensure_entry``: the (video, question) cache entry — reused when the cache already holds
   it, else compressed from the segment index (``Compressor.compress_from_features``: only
   the SVLM's language model, no video read) and written into the cache for reuse.
2. ``answer_entry``: allocation (``tempo_ops.allocation``), packing (``tempo_ops.packing``),
   the LLM stage's one input construction (``TempoLLM.build_inputs``), greedy generation and
   answer parsing (``tempo_ops.llm.answers``); the top segments by allocated tokens.

The question's entry is keyed by ``ask_query_id(context)``: the same rendered question asks
the same entry, so a repeated question costs no SVLM pass at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from tempo_ops.allocation import allocate_with_report
from tempo_ops.packing import pack
from tempo_ops.query_text import get_template

ASK_QUERY_PREFIX = "ask-"


def ask_query_id(context: str) -> str:
    """The cache query id of a rendered question: ``"ask-" + sha256(context)[:16]`` (stable, key-safe)."""
    return ASK_QUERY_PREFIX + hashlib.sha256(context.encode("utf-8")).hexdigest()[:16]


def ensure_entry(
    compressor: Any, indexed: Any, writer: Any, video_id: str, query_id: str, context: str, prompt_template: str | None = None
) -> bool:
    """Make the cache hold the complete (video_id, query_id) entry for ``context`` (the question
    rendered under ``prompt_template``; None: plain).

    ``indexed``: the video's ``IndexVideo``; ``writer``: a ``CacheWriter`` whose config matches
    ``compressor`` and the index's sampling. The entry goes through the cache's versioned writer
    (checksums, identity: the video identity the index recorded). Returns True when it was
    compressed now, False when the cache already held it complete, from the same inputs and
    intact (quick check); a corrupt or stale entry is recomputed.
    """
    from schemas.index_layout import split_identity
    from tempo_ops.errors import EntryNotFound

    template = get_template(prompt_template).name
    meta, identity = split_identity(indexed.meta)
    status, _ = writer.entry_status(
        video_id, query_id, context, indexed.n_segments, prompt_template=template, video_identity=identity
    )
    if status == "complete":
        return False

    def begin() -> None:
        writer.begin_entry(
            video_id, query_id, context, indexed.n_segments, prompt_template=template, video_identity=identity,
            force=status == "corrupt",
        )

    try:
        begin()
    except EntryNotFound:  # the cache has no record of this video yet
        writer.write_video(video_id, meta)
        begin()
    result = compressor.compress_from_features(indexed.features(), [context])
    writer.write_block(video_id, query_id, 0, result.candidates[0], result.relevance[0])
    writer.finalize_entry(video_id, query_id)
    return True


def top_segments(allocation: np.ndarray, relevance: np.ndarray, timestamps: Sequence[float], n: int) -> list[dict[str, Any]]:
    """The ``n`` segments with the most allocated tokens (ties: higher relevance, then earlier).

    Each: ``{"segment", "timestamp_s", "tokens", "relevance"}``; segments at 0 tokens are left out.
    """
    order = sorted(range(len(allocation)), key=lambda i: (-int(allocation[i]), -float(relevance[i]), i))
    return [
        {"segment": i, "timestamp_s": float(timestamps[i]), "tokens": int(allocation[i]), "relevance": float(relevance[i])}
        for i in order[:n]
        if allocation[i] > 0
    ]


def answer_entry(
    llm: Any,
    entry: Any,
    *,
    context: str,
    options: Sequence[str] | None,
    template: str | None,
    budget: int,
    policy: str = "ata",
    top: int = 5,
) -> dict[str, Any]:
    """Allocate, pack, answer and parse for one cache entry (``tempo_ops.store.EntryReader``).

    Returns ``{"answer" (raw text), "parsed" (option letter / normalised text / None), "rule",
    "allocation" [S], "tokens_allocated", "tokens_used", "segments_kept", "truncated",
    "over_budget", "allocation_notes", "top_segments" [...]}``.
    """
    import torch

    from tempo_ops.llm.answers import score_answer

    relevance = entry.relevance()
    alloc = allocate_with_report(relevance, budget, policy=policy)
    packed = pack(entry, alloc.k, entry.timestamp_texts)
    with torch.inference_mode():
        inputs = llm.build_inputs(packed.tokens, packed.allocation, packed.timestamp_texts, context)
        (generation,) = llm.generate([inputs], max_new_tokens=get_template(template).max_new_tokens)
    scored = score_answer(generation.text, "", options, template)
    return {
        "answer": generation.text,
        "parsed": scored.parsed,
        "rule": scored.rule,
        "allocation": [int(x) for x in alloc.k],
        "tokens_allocated": int(alloc.k.sum()),
        "tokens_used": int(inputs.visual_tokens),
        "segments_kept": int(inputs.segments_kept),
        "truncated": int(inputs.truncated),
        "over_budget": bool(alloc.report.over_budget),
        "allocation_notes": list(alloc.report.notes),
        "top_segments": top_segments(alloc.k, relevance, entry.timestamps, top),
    }
