"""Benchmark of the segment index: new queries compressed from the index vs from the video.

Figures (``bench/results/index.json``):
- ``job_wall_s``: for the same new (video, query) pairs, wall time of the user-level commands
  ``tempo compress --from-index I`` and ``tempo compress`` (from the video), tiny models,
  local runner, fresh caches; medians of ``REPEAT`` runs alternating the two, side by side.
  ``speedup`` = from_video / from_index (target >= 2).
- ``compressor_wall_s``: the same split without Beam and model loading: ``decode +
  Compressor.compress`` vs ``IndexVideo.features + Compressor.compress_from_features``.
- ``index_job_wall_s``: one ``tempo index`` run of the archive (the one-off cost).
- ``flops_qwen3_vl_2b``: expected FLOP ratio per video of compressing Q new queries from the
  video vs from the index on Qwen3-VL-2B shapes (formula in the JSON; the FLOP model is
  ``bench_svlm``'s). Decode and I/O come on top of the FLOP saving.
- ``bytes_per_video_hour``: index bytes (bf16 and float32) per hour of video next to the token
  cache's per (video, query), on Qwen3-VL-2B shapes at 2 fps, with and without the default
  1024-frame clamp; ``measured_tiny`` checks the per-segment formula against bytes on disk.

Run: ``python -m bench.bench_index``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_svlm import QWEN3_VL_2B, lm_flops, vision_flops
from bench.common import write_result

REPEAT = 3
N_VIDEOS = 3
FRAMES_PER_VIDEO = 64  # at 2 fps: 8 segments each
QUERIES = ["What is the person holding?", "Which colour is the moving block?"]


def _corpus(root: Path) -> tuple[Path, Path]:
    from tempo_ops.synthetic import write_test_video

    archive, later = [], []
    for i in range(N_VIDEOS):
        write_test_video(root / f"v{i}.mp4", n_frames=FRAMES_PER_VIDEO, fps=2, width=160, height=96, gop=16)
        archive.append({"video_id": f"v{i}", "uri": f"v{i}.mp4"})
        later.append({"video_id": f"v{i}", "uri": f"v{i}.mp4", "queries": [{"query_id": f"q{j}", "text": q} for j, q in enumerate(QUERIES)]})
    a, b = root / "archive.jsonl", root / "later.jsonl"
    a.write_text("".join(json.dumps(x) + "\n" for x in archive))
    b.write_text("".join(json.dumps(x) + "\n" for x in later))
    return a, b


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _alternate(fn_a, fn_b, repeat: int) -> tuple[list[float], list[float]]:
    a, b = [], []
    for _ in range(repeat):
        a.append(_timed(fn_a))
        b.append(_timed(fn_b))
    return a, b


def flop_figures(c: dict, queries: tuple[int, ...] = (1, 2, 4, 16)) -> dict:
    """Expected FLOP ratio (from video / from index) for Q new queries of one segment."""
    prefix = c["system_tokens"] + c["visual_tokens"] + c["time_tokens"]
    suffix = c["query_tokens"] + c["memory_tokens"]
    v, lp, ls = vision_flops(c), lm_flops(prefix, 0, c), lm_flops(suffix, prefix, c)
    out = {
        "formula": "ratio(Q) = (V + L(P) + Q*L(S|P)) / (L(P) + Q*L(S|P)); V vision-encoder FLOPs per segment "
        "(bench_svlm.vision_flops), L text-model FLOPs (bench_svlm.lm_flops), P prefix tokens (system + time "
        "stamps + visual), S query + memory tokens. Both paths share the prefix once per segment; the index "
        "removes V (and the decode, which is not counted).",
        "prefix_tokens": prefix,
        "suffix_tokens": suffix,
        "vision_gflops": v / 1e9,
        "lm_prefix_gflops": lp / 1e9,
        "lm_suffix_gflops": ls / 1e9,
        "vision_share_of_one_query": v / (v + lp + ls),
    }
    for q in queries:
        out[f"ratio_q{q}"] = (v + lp + q * ls) / (lp + q * ls)
    return out


def byte_figures(c: dict) -> dict:
    """Index and token-cache bytes per hour of video on Qwen3-VL-2B shapes."""
    from tempo_ops.index_store import stored_nbytes_per_segment

    prefix = c["system_tokens"] + c["visual_tokens"] + c["time_tokens"]
    layers, d, n = c["deepstack_mergers"], c["hidden"], c["visual_tokens"]
    per_seg = {dt: stored_nbytes_per_segment(n, d, layers, prefix, dt) for dt in ("bfloat16", "float32")}
    cache_per_seg = c["memory_tokens"] * d * 2 + 4  # float16 candidates + float32 relevance
    unclamped = int(3600 * 2 / 8)  # 2 fps, 8 frames per segment
    clamped = 1024 // 8  # default max_frames: an hour-long video keeps 1024 frames
    gib = 2**30
    return {
        "formula": "index bytes/segment = N_visual*D*(1+L_deepstack)*w + P*5 + 28 (w = 2 bf16, 4 float32; "
        "ids int32 + mm int8 per prefix token); cache bytes/segment/query = K*D*2 + 4",
        "per_segment": {"index_bfloat16": per_seg["bfloat16"], "index_float32": per_seg["float32"], "cache_per_query": cache_per_seg},
        "unclamped_2fps": {
            "segments_per_hour": unclamped,
            "index_bfloat16_gib": per_seg["bfloat16"] * unclamped / gib,
            "index_float32_gib": per_seg["float32"] * unclamped / gib,
            "cache_per_query_gib": cache_per_seg * unclamped / gib,
        },
        "default_max_frames_1024": {
            "segments_per_video": clamped,
            "index_bfloat16_gib": per_seg["bfloat16"] * clamped / gib,
            "index_float32_gib": per_seg["float32"] * clamped / gib,
            "cache_per_query_gib": cache_per_seg * clamped / gib,
        },
        "index_over_cache_one_query": per_seg["bfloat16"] / cache_per_seg,
    }


def main() -> int:
    from pipelines.cli import main as tempo
    from tempo_ops import video
    from tempo_ops.index_store import IndexReader, index_nbytes, stored_nbytes_per_segment
    from tempo_ops.svlm.compressor import Compressor
    from tempo_ops.svlm.tiny import make_tiny_models

    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        root = Path(tmp)
        models = make_tiny_models(root / "models", seed=0)
        model_args = ["--svlm", models["svlm"], "--compressor", models["tempo"]]
        archive, later = _corpus(root)
        index = root / "index.zarr"
        index_s = _timed(lambda: tempo(["index", "--manifest", str(archive), "--index", str(index), *model_args]))
        counter = iter(range(1000))

        def from_index() -> None:
            assert tempo(["compress", "--from-index", str(index), "--manifest", str(later), "--cache", str(root / f"c{next(counter)}.zarr"), *model_args]) == 0

        def from_video() -> None:
            assert tempo(["compress", "--manifest", str(later), "--cache", str(root / f"c{next(counter)}.zarr"), *model_args]) == 0

        from_index()  # warm-up: imports, page cache
        from_video()
        t_index, t_video = _alternate(from_index, from_video, REPEAT)

        # The same split at the compressor level (no Beam, model loaded once).
        comp = Compressor.from_pretrained(models["svlm"], memory_tokens=models["tempo"], device="cpu")
        reader = IndexReader(str(index))

        def comp_from_video() -> None:
            for i in range(N_VIDEOS):
                comp.compress(list(video.iter_segments(str(root / f"v{i}.mp4"), video.SamplingConfig())), QUERIES)

        def comp_from_index() -> None:
            for i in range(N_VIDEOS):
                comp.compress_from_features(reader.video(f"v{i}").features(), QUERIES)

        comp_from_index()
        comp_from_video()
        c_index, c_video = _alternate(comp_from_index, comp_from_video, REPEAT)

        # Bytes on disk vs the per-segment formula (tiny shapes).
        feats = reader.video("v0").features()
        n_seg = sum(reader.video(f"v{i}").n_segments for i in range(N_VIDEOS))
        predicted = sum(
            stored_nbytes_per_segment(int(f.visual.shape[0]), int(f.visual.shape[1]), int(f.deepstack.shape[0]), int(f.input_ids.numel()), "bfloat16")
            for f in feats
        ) * N_VIDEOS
        measured = index_nbytes(str(index))
        tiny_geometry = {"visual_tokens": int(feats[0].visual.shape[0]), "hidden": int(feats[0].visual.shape[1]), "deepstack_layers": int(feats[0].deepstack.shape[0])}

    med = statistics.median
    figures = {
        "corpus": {"videos": N_VIDEOS, "segments_per_video": FRAMES_PER_VIDEO // 8, "queries_per_video": len(QUERIES), "model": "tiny Qwen3-VL (tempo_ops.svlm.tiny), CPU float32, reference geometry"},
        "job_wall_s": {
            "from_index": {"median_s": med(t_index), "runs": t_index},
            "from_video": {"median_s": med(t_video), "runs": t_video},
            "speedup": med(t_video) / med(t_index),
            "target_speedup": 2.0,
        },
        "compressor_wall_s": {
            "from_index": {"median_s": med(c_index), "runs": c_index},
            "from_video": {"median_s": med(c_video), "runs": c_video},
            "speedup": med(c_video) / med(c_index),
        },
        "index_job_wall_s": index_s,
        "flops_qwen3_vl_2b": flop_figures(QWEN3_VL_2B),
        "bytes_per_video_hour": byte_figures(QWEN3_VL_2B),
        "measured_tiny": {
            "geometry": tiny_geometry,
            "segments": n_seg,
            "index_bytes_on_disk": measured,
            "array_bytes_by_formula": predicted,
            "overhead_ratio": measured / predicted,
        },
    }
    path = write_result("index", figures, "python -m bench.bench_index")
    print(json.dumps({k: figures[k] for k in ("job_wall_s", "compressor_wall_s")}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
