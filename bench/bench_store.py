"""Token cache benchmark: budget-proportional reads and write throughput (local disk under /tmp).

One (video, query) entry: 128 segments x 128 tokens x D=2048 float16 (64 MiB).
- Reads at budgets 1K/4K/8K with an ATA-like allocation (k_min=4 + floor(s_hat*124), rescaled
  to fit B): bytes read (counted by a byte-counting store wrapper) / bytes of the selected
  tokens, and time vs loading everything; our direct shard-index read and plain zarr slicing.
- Writes: the cache writer vs ``np.save`` of the same blocks (throughput ratio, target >= 0.5),
  and zarr's own sharded write of the same blocks for reference.
- Compression: what zstd / blosc-lz4+shuffle would save on float16 candidates (none by default).

Run: ``python -m bench.bench_store`` → ``bench/results/store.json``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bench.common import median_time, peak_rss_mb, write_result
from schemas import cache_layout as L
from tempo_ops.fs import CountingStore, open_store
from tempo_ops.store import CacheReader, CacheWriter

S, K, D = 128, 128, 2048
BUDGETS = (1024, 4096, 8192)
REPEAT = 5


def config() -> dict[str, Any]:
    return {
        "compressor": {
            "svlm_name": "bench",
            "svlm_weights_sha256": "0" * 64,
            "memory_tokens_source": "fresh:seed=0",
            "memory_tokens_sha256": "1" * 64,
            "prompt_sha256": "2" * 64,
            "num_memory_tokens": K,
            "hidden_size": D,
            "reference_geometry": True,
        },
        "sampling": {"target_fps": 2.0, "min_frames": 8, "max_frames": 1024, "max_edge": 512, "multiple": 16, "window": 8},
        "stored_dtype": "float16",
    }


def ata_like(scores: np.ndarray, budget: int, k_min: int = 4, k_max: int = K) -> np.ndarray:
    """k_i = k_min + floor(s_hat_i * (k_max - k_min)); if over budget, split B - S*k_min by s_hat."""
    s_hat = (scores - scores.min()) / max(float(scores.max() - scores.min()), 1e-8)
    k = k_min + np.floor(s_hat * (k_max - k_min)).astype(np.int64)
    if k.sum() > budget:
        extra = budget - len(scores) * k_min
        k = k_min + np.floor(s_hat / s_hat.sum() * extra).astype(np.int64)
    return np.clip(k, k_min, k_max)


def meta() -> dict[str, Any]:
    ts = [(8 * i + 4) / 2.0 for i in range(S)]
    return {"uri": "bench.mp4", "timestamps": ts, "timestamp_texts": [f"<{t:.1f} seconds>" for t in ts]}


def write_entry(writer: CacheWriter, query_id: str, cand: np.ndarray, rel: np.ndarray) -> None:
    writer.begin_entry("video", query_id, "what happens?", S)
    p = writer.segments_per_shard
    for s0 in range(0, S, p):
        writer.write_block("video", query_id, s0, cand[s0 : s0 + p], rel[s0 : s0 + p])
    writer.finalize_entry("video", query_id)


def main() -> None:
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((S, K, D), dtype=np.float32).astype(np.float16)
    rel = rng.beta(0.5, 0.5, S).astype(np.float32)
    total_bytes = cand.nbytes
    work = Path(tempfile.mkdtemp(prefix="bench_store_", dir="/tmp"))
    figures: dict[str, Any] = {"shape": [S, K, D], "entry_bytes": total_bytes, "repeat": REPEAT}
    try:
        url = str(work / "cache")
        writer = CacheWriter.open(url, config())
        writer.write_video("video", meta())
        figures["segments_per_shard"] = writer.segments_per_shard
        figures["token_chunk"] = writer.token_chunk

        # ---------------------------------------------------------------- writes
        counter = {"n": 0}

        def cache_write() -> None:
            counter["n"] += 1
            write_entry(writer, f"q{counter['n']}", cand, rel)

        def npy_write() -> None:
            counter["n"] += 1
            out = work / "npy" / f"q{counter['n']}"
            out.mkdir(parents=True)
            p = writer.segments_per_shard
            for s0 in range(0, S, p):
                np.save(out / f"candidates_{s0}.npy", cand[s0 : s0 + p])
            np.save(out / "relevance.npy", rel)

        def zarr_write() -> None:
            counter["n"] += 1
            arr = zarr.create_array(
                store=str(work / "zarr" / f"q{counter['n']}"),
                shape=(S, K, D),
                dtype="float16",
                shards=(writer.segments_per_shard, K, D),
                chunks=(1, writer.token_chunk, D),
                compressors=None,
            )
            p = writer.segments_per_shard
            for s0 in range(0, S, p):
                arr[s0 : s0 + p] = cand[s0 : s0 + p]

        # interleave the three so that disk/page-cache state affects all alike
        times: dict[str, list[float]] = {"cache": [], "npy": [], "zarr": []}
        for _ in range(REPEAT):
            for name, fn in (("cache", cache_write), ("npy", npy_write), ("zarr", zarr_write)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        figures["write"] = {
            "cache_median_s": med["cache"],
            "npy_median_s": med["npy"],
            "zarr_native_median_s": med["zarr"],
            "cache_MiB_per_s": total_bytes / med["cache"] / 2**20,
            "npy_MiB_per_s": total_bytes / med["npy"] / 2**20,
            "zarr_native_MiB_per_s": total_bytes / med["zarr"] / 2**20,
            "cache_vs_npy_throughput_ratio": med["npy"] / med["cache"],
            "cache_vs_zarr_native_throughput_ratio": med["zarr"] / med["cache"],
            "target_ratio": 0.5,
        }

        # ---------------------------------------------------------------- reads
        base = open_store(url, read_only=True)
        counting = CountingStore(base)
        reader = CacheReader(url, store=counting)
        qid = "q1"
        meta_reads = {}

        def fresh_entry() -> Any:
            counting.reset()
            e = reader.entry("video", qid)
            meta_reads["bytes"] = counting.get_bytes
            counting.reset()
            return e

        reads: dict[str, Any] = {}
        full_t = median_time(lambda: fresh_entry().read_all(), repeat=REPEAT)
        fresh_entry().read_all()
        reads["full"] = {"median_s": full_t["median_s"], "bytes_read": counting.get_bytes, "requests": counting.get_requests}
        e0 = fresh_entry()
        scores = e0.relevance()
        for budget in BUDGETS:
            k = ata_like(scores, budget)
            ranges = [(0, int(x)) for x in k]
            selected = int(k.sum()) * D * 2
            row: dict[str, Any] = {"tokens_selected": int(k.sum()), "bytes_selected": selected}
            for method in ("direct", "zarr"):
                t = median_time(lambda m=method, r=ranges: fresh_entry().read_token_ranges(r, method=m), repeat=REPEAT)
                e = fresh_entry()
                got = e.read_token_ranges(ranges, method=method)
                assert all(np.array_equal(g, cand[i, : k[i]]) for i, g in enumerate(got)), "wrong tokens read"
                row[method] = {
                    "median_s": t["median_s"],
                    "bytes_read": counting.get_bytes,
                    "requests": counting.get_requests,
                    "bytes_read_over_selected": counting.get_bytes / selected,
                    "time_vs_full": t["median_s"] / reads["full"]["median_s"],
                    "bytes_vs_full": counting.get_bytes / total_bytes,
                }
            reads[f"B{budget}"] = row
        reads["entry_metadata_bytes"] = meta_reads["bytes"]
        reads["shard_index_bytes_per_shard"] = L.shard_index_nbytes(writer.segments_per_shard, K, writer.token_chunk)
        reads["target_bytes_over_selected"] = 1.25
        figures["read"] = reads

        # ---------------------------------------------------------------- compression
        import numcodecs

        sample = np.ascontiguousarray(cand[: writer.segments_per_shard]).tobytes()
        comp = {}
        for name, codec in (
            ("zstd3", numcodecs.Zstd(level=3)),
            ("blosc_lz4_shuffle", numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE, typesize=2)),
        ):
            t0 = time.perf_counter()
            enc = codec.encode(sample)
            dt = time.perf_counter() - t0
            comp[name] = {"ratio": len(sample) / len(enc), "encode_MiB_per_s": len(sample) / dt / 2**20}
        comp["data"] = "standard-normal float16 (hidden-state-like noise)"
        figures["compression_if_enabled"] = comp
        figures["peak_rss_mb"] = peak_rss_mb()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result("store", figures, "python -m bench.bench_store")


if __name__ == "__main__":
    main()
