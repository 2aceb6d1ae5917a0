"""Benchmark: allocation policies and shard building.

1. ``allocate`` median time per policy for S = 128, 1024, 16384 segments (random float32
   scores, budget 8192, k_min 4, k_max 128; target: ``ata`` at S = 1024 under 100 µs).
2. Shard building throughput (pack from an in-memory entry + encode + deterministic tar +
   SHA-256 + completion record, ``tempo_ops.shards``) versus writing the same member bytes
   into a tar with the standard library ``tarfile`` alone — side by side, medians.

Run: ``python -m bench.bench_allocation`` → ``bench/results/allocation.json``.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import median_time, peak_rss_mb, write_result
from schemas.shard_sample import sample_key
from tempo_ops.allocation import POLICIES, allocate
from tempo_ops.packing import format_timestamp
from tempo_ops.shards import PlannedSample, build_sample, write_shard

SIZES = (128, 1024, 16384)
BUDGET = 8192


class _MemoryEntry:
    """An in-memory cache entry (``EntryReader`` interface) of ``S`` segments × ``K`` × ``D``."""

    def __init__(self, video_id: str, S: int, K: int, D: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.video_id, self.query_id = video_id, "q"
        self.n_segments, self.K, self.D = S, K, D
        self.data = rng.standard_normal((S, K, D), dtype=np.float32).astype(np.float16)
        self.rel = rng.random(S).astype(np.float32)
        self.timestamps = [(8 * i + 4) / 2.0 for i in range(S)]
        self.timestamp_texts = [format_timestamp(t) for t in self.timestamps]

    def read_token_ranges(self, ranges):
        return [self.data[i, a:b] for i, (a, b) in enumerate(ranges)]


def bench_allocate() -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    for S in SIZES:
        scores = rng.random(S).astype(np.float32)
        repeat = {128: 3000, 1024: 2000, 16384: 200}[S]
        for policy in POLICIES:
            t = median_time(lambda scores=scores, policy=policy: allocate(scores, BUDGET, policy=policy), repeat=repeat, warmup=20)
            out[f"{policy}_S{S}_median_us"] = t["median_s"] * 1e6
    out["ata_S1024_under_100us"] = out["ata_S1024_median_us"] < 100.0
    return out


def bench_shards(n_samples: int = 12, S: int = 64, K: int = 128, D: int = 2048, budget: int = 4096) -> dict:
    entries = {}
    planned = []
    for i in range(n_samples):
        e = _MemoryEntry(f"video{i:04d}", S, K, D, seed=i)
        k = allocate(e.rel, budget, k_max=K)
        p = PlannedSample(sample_key(e.video_id, e.query_id), e.video_id, "q", "question?", None, "a", tuple(int(x) for x in k), 0)
        entries[p.key] = e
        planned.append(p)
    planned.sort(key=lambda p: p.key)
    # Pre-encoded member bytes for the stdlib baseline: the same bytes, no packing/encoding.
    encoded = [build_sample(entries[p.key], p, budget=budget, policy="ata") for p in planned]
    payload = sum(len(b) for _, m in encoded for b in m.values())
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:

        def ours() -> None:
            samples = (build_sample(entries[p.key], p, budget=budget, policy="ata") for p in planned)
            write_shard(str(tmp / "ours"), 0, samples, planned_keys=[p.key for p in planned])

        def stdlib() -> None:
            import io

            with tarfile.open(tmp / "stdlib.tar", "w") as tar:
                for key, members in encoded:
                    for name in sorted(members):
                        info = tarfile.TarInfo(f"{key}.{name}")
                        info.size = len(members[name])
                        tar.addfile(info, io.BytesIO(members[name]))

        def ours_write_only() -> None:
            write_shard(str(tmp / "ours_w"), 0, iter(encoded), planned_keys=[p.key for p in planned])

        times: dict[str, list[float]] = {"ours": [], "ours_write_only": [], "stdlib": []}
        for _ in range(5):  # interleaved, side by side
            for name, fn in (("ours", ours), ("ours_write_only", ours_write_only), ("stdlib", stdlib)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        shard_bytes = (tmp / "ours" / "shard-000000.tar").stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "shard_samples": n_samples,
        "shard_payload_mb": payload / 1e6,
        "shard_bytes_mb": shard_bytes / 1e6,
        "ours_median_s": med["ours"],
        "stdlib_tarfile_median_s": med["stdlib"],
        "ours_mb_per_s": shard_bytes / 1e6 / med["ours"],
        "stdlib_tarfile_mb_per_s": payload / 1e6 / med["stdlib"],
        "ours_over_stdlib_throughput_ratio": (shard_bytes / med["ours"]) / (payload / med["stdlib"]),
        "ours_write_only_median_s": med["ours_write_only"],
        "ours_write_only_mb_per_s": shard_bytes / 1e6 / med["ours_write_only"],
        "ours_write_only_over_stdlib_throughput_ratio": (shard_bytes / med["ours_write_only"]) / (payload / med["stdlib"]),
        "note": "ours = pack from memory + encode npy/json + deterministic tar + sha256 + completion record; "
        "ours_write_only = the same deterministic tar + sha256 + record from already-encoded bytes; "
        "stdlib = tarfile.addfile of the already-encoded member bytes (no hash, no record)",
    }


def main() -> None:
    figures = {"budget": BUDGET, **bench_allocate(), **bench_shards()}
    figures["peak_rss_mb"] = peak_rss_mb()
    write_result("allocation", figures, "python -m bench.bench_allocation")
    for k, v in figures.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
