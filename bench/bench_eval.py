"""LLM-stage evaluation benchmark: batched vs the reference-style batch-of-one loop (tiny model, CPU).

A token cache of N_ENTRIES (video, query) entries, S segments x K=128 candidates x D=64 (the
tiny SVLM width) and the tiny Tempo checkpoint's LLM stage (Qwen3, hidden 96, 2 layers). For
each entry at budget B with ``ata``: read the relevance, allocate, read + pack the kept tokens,
build the LLM input, answer greedily (max_new_tokens 16: the videomme template; random
weights never stop early, so every answer is 16 tokens in both modes) and score; both modes
run ``tempo_ops.llm.evaluate.evaluate_batch``, the job's own code path:

- ``batch1``: one sample per call (the reference runs batch 1, no padding);
- ``batched``: BATCH samples per call, left padded.

Figures: samples/s of each (median of REPEAT runs, measured alternately in one process),
the speed-up, and the time split between read/allocate/pack/build and the LLM.
Target: >= 3x at batch 8 on CPU.

Run: ``python -m bench.bench_eval`` → ``bench/results/eval.json``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import peak_rss_mb, write_result

N_ENTRIES = 16
S, K, D = 16, 128, 64
BUDGET = 1024
BATCH = 8
REPEAT = 3
TEMPLATE = "videomme"


def _config() -> dict[str, Any]:
    from bench.bench_store import config

    doc = config()  # the store benchmark's cache config, at the tiny SVLM's width
    doc["compressor"].update(num_memory_tokens=K, hidden_size=D)
    return doc


def build_cache(root: Path) -> str:
    from tempo_ops.store import CacheWriter
    from tempo_ops.video import format_timestamp

    url = str(root / "cache.zarr")
    writer = CacheWriter.open(url, _config())
    rng = np.random.default_rng(0)
    for i in range(N_ENTRIES):
        v = f"video{i:02d}"
        ts = [(8 * s + 4) / 2.0 for s in range(S)]
        writer.write_video(v, {"uri": f"{v}.mp4", "timestamps": ts, "timestamp_texts": [format_timestamp(t) for t in ts]})
        writer.begin_entry(v, "q1", "bench", S)
        cand = rng.standard_normal((S, K, D)).astype(np.float16)
        rel = rng.random(S).astype(np.float32)
        P = writer.segments_per_shard
        for s0 in range(0, S, P):
            writer.write_block(v, "q1", s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
        writer.finalize_entry(v, "q1")
    return url


def run_mode(llm, reader, batch_size: int) -> dict[str, float]:
    """One pass over all entries: (allocate + evaluate_batch) per batch; seconds by phase."""
    from tempo_ops.allocation import allocate
    from tempo_ops.llm.evaluate import evaluate_batch, make_item
    from tempo_ops.packing import pack

    def fetch(item):
        entry = reader.entry(item.video_id, item.query_id)
        packed = pack(entry, np.asarray(item.allocation), list(entry.timestamp_texts))
        return packed.tokens, packed.timestamp_texts

    t0 = time.perf_counter()
    plan_s = prepare_s = llm_s = 0.0
    n = 0
    ids = [f"video{i:02d}" for i in range(N_ENTRIES)]
    for start in range(0, len(ids), batch_size):
        tp = time.perf_counter()
        items = []
        for v in ids[start : start + batch_size]:
            k = allocate(reader.entry(v, "q1").relevance(), BUDGET, policy="ata", k_max=K)
            items.append(make_item(v, "q1", BUDGET, "ata", k, question="What happens?", options=["a", "b", "c", "d"],
                                   answer="A", prompt_template=TEMPLATE))
        plan_s += time.perf_counter() - tp
        out = evaluate_batch(llm, items, fetch)
        assert not out.failures, out.failures
        prepare_s += out.prepare_s
        llm_s += out.llm_s
        n += len(out.rows)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "samples": n, "read_allocate_s": plan_s, "pack_build_s": prepare_s, "llm_s": llm_s}


def main() -> None:
    import torch

    from tempo_ops.llm import TempoLLM
    from tempo_ops.store import CacheReader
    from tempo_ops.svlm.tiny import make_tiny_models

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp)
        models = make_tiny_models(root / "models", seed=0)
        llm = TempoLLM.from_pretrained(models["tempo"], device="cpu")
        reader = CacheReader(build_cache(root))
        run_mode(llm, reader, BATCH)  # warm-up (allocator, kernels, tokenizer memo)
        runs: dict[str, list[dict[str, float]]] = {"batch1": [], "batched": []}
        for _ in range(REPEAT):  # alternate so both modes see the same machine load
            runs["batch1"].append(run_mode(llm, reader, 1))
            runs["batched"].append(run_mode(llm, reader, BATCH))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    figures: dict[str, Any] = {
        "setup": {"entries": N_ENTRIES, "segments": S, "candidates_per_segment": K, "dim": D, "budget": BUDGET,
                  "policy": "ata", "max_new_tokens": 16, "batch": BATCH, "repeat": REPEAT,
                  "torch_threads": torch.get_num_threads(), "llm": "tiny Qwen3 (hidden 96, 2 layers), float32"},
    }
    for mode in runs:
        wall = med(mode, "wall_s")
        figures[mode] = {
            "samples_per_s": round(N_ENTRIES / wall, 3),
            "wall_s_median": round(wall, 4),
            "read_allocate_s": round(med(mode, "read_allocate_s"), 4),
            "pack_build_s": round(med(mode, "pack_build_s"), 4),
            "llm_s": round(med(mode, "llm_s"), 4),
            "llm_share": round(med(mode, "llm_s") / wall, 3),
            "runs_wall_s": [round(r["wall_s"], 4) for r in runs[mode]],
        }
    figures["speedup_batched_vs_batch1"] = round(figures["batched"]["samples_per_s"] / figures["batch1"]["samples_per_s"], 2)
    figures["target_speedup"] = 3.0
    figures["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_result("eval", figures, "python -m bench.bench_eval")
    print(
        f"batch-1 {figures['batch1']['samples_per_s']} samples/s, batch {BATCH} {figures['batched']['samples_per_s']} "
        f"samples/s: {figures['speedup_batched_vs_batch1']}x (LLM share {figures['batched']['llm_share']})"
    )


if __name__ == "__main__":
    main()
