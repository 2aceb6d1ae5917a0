"""Shard sets of random candidate tokens for training tests (no SVLM needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.shard_sample import SampleMeta, encode_sample, sample_key
from tempo_ops.shards import PlannedSample, make_index, plan_shard_set, write_index, write_shard

OPTIONS = ["A. red", "B. green", "C. blue", "D. yellow"]


def write_random_shard_set(
    out_dir: str | Path, *, n_samples: int, per_shard: int, dim: int = 64, seed: int = 0, segments: int = 2, k: int = 4
) -> str:
    """A shard set ``out_dir/16-ata`` of ``n_samples`` samples, ``per_shard`` per shard; returns its index.json path.

    Sample i has ``segments`` segments of ``k`` random tokens; its answer letter is decided by
    which quarter of the token dimensions has the largest mean (learnable from the tokens).
    """
    rng = np.random.default_rng(seed)
    set_url = str(Path(out_dir) / "16-ata")
    planned, members = [], {}
    for i in range(n_samples):
        video_id, query_id = f"vid{i:03d}", "q"
        key = sample_key(video_id, query_id)
        tokens = rng.normal(size=(segments * k, dim)).astype(np.float16)
        answer = "ABCD"[int(np.argmax(tokens.astype(np.float32).reshape(segments * k, 4, -1).mean(axis=(0, 2))))]
        alloc = np.full(segments, k, dtype=np.int64)
        meta = SampleMeta(
            key=key, video_id=video_id, query_id=query_id, question="Which colour is shown?", options=OPTIONS,
            answer=answer, budget=16, policy="ata", pack_mode="head", n_segments=segments, n_tokens=segments * k, dim=dim,
        )
        times = [8.0 * s + 4.0 for s in range(segments)]
        members[key] = encode_sample(
            meta, tokens, alloc, np.arange(segments + 1) * k, [f"<{t:.1f} seconds>" for t in times], times
        )
        planned.append(PlannedSample(key, video_id, query_id, meta.question, OPTIONS, answer, tuple(alloc.tolist()), 1))
    plan = plan_shard_set("16-ata", 16, "ata", planned, per_shard)
    records = [write_shard(set_url, t.n, ((key, members[key]) for key in t.keys), planned_keys=t.keys) for t in plan.tasks]
    write_index(set_url, make_index(plan, records, pack_mode="head", cache_fingerprint=None))
    return set_url + "/index.json"
