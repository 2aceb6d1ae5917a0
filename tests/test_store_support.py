"""Shared helpers for the token-cache tests (no tests here), also run as a writer subprocess.

``python tests/test_store_support.py write URL VIDEO QUERIES [--units a,b] [--signal-after N] [--loop]``
writes deterministic data (see ``block_data``) and prints ``READY`` after N blocks when asked.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

K, D, P, C = 16, 32, 4, 4  # tokens, channels, segments per shard, token chunk (small: fast tests)
S = 10  # segments per video: 3 shards, the last one short


def make_config(**compressor_overrides: Any) -> dict[str, Any]:
    compressor = {
        "svlm_name": "tiny-qwen3-vl",
        "svlm_weights_sha256": "1" * 64,
        "memory_tokens_source": "fresh:seed=0",
        "memory_tokens_sha256": "2" * 64,
        "prompt_sha256": "3" * 64,
        "num_memory_tokens": K,
        "hidden_size": D,
        "reference_geometry": True,
    }
    compressor.update(compressor_overrides)
    return {
        "compressor": compressor,
        "sampling": {"target_fps": 2.0, "min_frames": 8, "max_frames": 1024, "max_edge": 512, "multiple": 16, "window": 8},
        "stored_dtype": "float16",
    }


def make_meta(n_segments: int = S, uri: str = "file:///videos/v.mp4") -> dict[str, Any]:
    real_fps = 2.0
    ts = [(8 * i + 4) / real_fps for i in range(n_segments)]
    return {
        "uri": uri,
        "probe": {"duration_s": n_segments * 4.0, "fps": 30.0, "width": 64, "height": 48, "codec": "h264"},
        "frame_indices": list(range(0, n_segments * 8 * 15, 15)),
        "real_fps": real_fps,
        "bounds": [[8 * i, 8 * i + 8] for i in range(n_segments)],
        "timestamps": ts,
        "timestamp_texts": [f"<{t:.1f} seconds>" for t in ts],
        "sampling": {"target_fps": 2.0, "window": 8},
    }


def block_data(video_id: str, query_id: str, n_segments: int = S) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic candidates ``(S, K, D)`` float32 and relevance ``(S,)`` float32 for an entry."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(f"{video_id}\x00{query_id}")) % (2**32)
    rng = np.random.default_rng(seed)
    cand = (rng.standard_normal((n_segments, K, D)) * 10).astype(np.float32)
    rel = rng.random(n_segments).astype(np.float32)
    return cand, rel


def entry_version(url: str, video_id: str, query_id: str, which: str = "version") -> str | None:
    """The entry's current ("version") or being-written ("pending_version") version subgroup name (local caches)."""
    import json
    from pathlib import Path

    from schemas import cache_layout as L

    doc = json.loads((Path(url) / L.metadata_key(L.entry_path(video_id, query_id))).read_text())
    return doc["attributes"].get(which)


def open_writer(url: str, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    from tempo_ops.store import CacheWriter

    return CacheWriter.open(
        url, make_config(), storage_options=storage_options, segments_per_shard=P, token_chunk=C, **kwargs
    )


def write_entry(writer: Any, video_id: str, query_id: str, n_segments: int = S, units: list[int] | None = None) -> None:
    """write_video + begin_entry + all (or the given) units + finalize (when all units given)."""
    cand, rel = block_data(video_id, query_id, n_segments)
    writer.write_video(video_id, make_meta(n_segments))
    writer.begin_entry(video_id, query_id, f"question {query_id}?", n_segments)
    starts = list(range(0, n_segments, P)) if units is None else units
    for s0 in starts:
        writer.write_block(video_id, query_id, s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
    if units is None:
        writer.finalize_entry(video_id, query_id)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["write", "units"])
    parser.add_argument("url")
    parser.add_argument("video")
    parser.add_argument("queries", help="comma-separated query ids")
    parser.add_argument("--units", default="", help="units (seg_start values) for mode=units")
    parser.add_argument("--signal-after", type=int, default=-1, help="print READY after this many blocks")
    parser.add_argument("--loop", action="store_true", help="keep rewriting blocks until killed")
    args = parser.parse_args(argv)
    writer = open_writer(args.url)
    queries = args.queries.split(",")
    if args.mode == "units":
        for q in queries:
            cand, rel = block_data(args.video, q)
            for s0 in (int(u) for u in args.units.split(",")):
                writer.write_block(args.video, q, s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
        return 0
    writer.write_video(args.video, make_meta())
    blocks = 0
    for i, q in enumerate(queries):
        victim = args.loop and i == len(queries) - 1  # rewritten until the parent kills us
        cand, rel = block_data(args.video, q)
        writer.begin_entry(args.video, q, f"question {q}?", S)
        while True:
            for s0 in range(0, S, P):
                writer.write_block(args.video, q, s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
                blocks += 1
                if blocks == args.signal_after:
                    print("READY", flush=True)
            if not victim:
                break
        writer.finalize_entry(args.video, q)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(_main(sys.argv[1:]))
