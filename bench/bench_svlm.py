"""Benchmark of the SVLM compressor (tiny Qwen3-VL, CPU): throughput and the shared-prefix speedup.

Figures (``bench/results/svlm.json``):
- ``segments_per_s``: segments/s of ``Compressor.compress`` with one query, for 1, 4 and 16
  segments per call (8 frames of 512×256 each: grid (4, 16, 32), 512 visual tokens, as the
  reference geometry gives for the paper's frames).
- ``shared_prefix``: for 1, 4 and 16 queries per segment, wall time of ``compress`` (vision
  encoder + prefix once per segment, every query's suffix + memory tokens batched against the
  KV cache) vs the reference way — for each query separately, the full sequence of every segment
  (``compress_unshared(segments, [query])``: vision encoder and prefix again per query). Medians,
  measured side by side in one run.
- ``flops_qwen3_vl_2b``: the FLOP ratio the same sharing should give on Qwen3-VL-2B (formula below).

Run: ``python -m bench.bench_svlm``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.common import median_time, peak_rss_mb, write_result

FRAMES, HEIGHT, WIDTH = 8, 256, 512
QUERY = "What is the person in the red jacket holding?"


@dataclass
class _Seg:
    frames: np.ndarray
    start_position: int
    real_fps: float


def _segments(n: int) -> list[_Seg]:
    rng = np.random.default_rng(0)
    return [_Seg(rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8), 8 * i, 2.0) for i in range(n)]


def _queries(n: int) -> list[str]:
    base = ["Is there a dog?", "What colour is the car that drives past the house?", "Count the people.",
            "Describe what happens after the door opens and who leaves the room first."]
    return [f"{base[i % len(base)]} ({i})" for i in range(n)]


# ----------------------------------------------------------------------------- FLOP model
QWEN3_VL_2B = {
    # text model (numbers as given for Qwen3-VL-2B; third-party configs quote intermediate 6144)
    "text_layers": 28, "hidden": 2048, "intermediate": 6144, "heads": 16, "kv_heads": 8, "head_dim": 128,
    # vision tower
    "vision_layers": 24, "vision_hidden": 1024, "vision_intermediate": 4096, "patch": 16,
    "temporal_patch": 2, "merge": 2, "deepstack_mergers": 3,
    # token counts of one 8-frame 512×256 segment
    "temporal_groups": 4, "system_tokens": 60, "visual_tokens": 512, "time_tokens": 4 * 8,
    "query_tokens": 30, "memory_tokens": 128,
}


def lm_flops(n_new: int, n_past: int, c: dict) -> float:
    """Forward FLOPs (2 per multiply-add) of the text model for ``n_new`` tokens attending to
    ``n_past`` cached tokens plus themselves (causal):
    per token and layer: projections D·(H·hd + 2·KV·hd) + (H·hd)·D, MLP 3·D·I, attention
    2·H·hd·ctx (QKᵀ and AV), ctx = n_past + position within the new tokens (average (n_new+1)/2).
    """
    d, i, h, kv, hd = c["hidden"], c["intermediate"], c["heads"], c["kv_heads"], c["head_dim"]
    dense = d * (h * hd + 2 * kv * hd) + h * hd * d + 3 * d * i
    attn_ctx = n_new * n_past + n_new * (n_new + 1) / 2
    return 2.0 * c["text_layers"] * (n_new * dense + 2 * h * hd * attn_ctx)


def vision_flops(c: dict) -> float:
    """Forward FLOPs of the vision tower for one segment: patch embedding, blocks (qkv/proj 4·Dv²,
    MLP 2·Dv·Iv, attention 2·Dv·ctx within each temporal group), main + DeepStack mergers
    (per merged token: (4Dv)² + 4Dv·D_text)."""
    dv, iv = c["vision_hidden"], c["vision_intermediate"]
    patches = c["visual_tokens"] * c["merge"] ** 2
    per_group = patches // c["temporal_groups"]  # vision attention stays within one temporal group
    embed = patches * (3 * c["temporal_patch"] * c["patch"] ** 2) * dv
    blocks = c["vision_layers"] * (patches * (4 * dv * dv + 2 * dv * iv) + 2 * dv * per_group * patches)
    merger = (1 + c["deepstack_mergers"]) * c["visual_tokens"] * ((4 * dv) ** 2 + 4 * dv * c["hidden"])
    return 2.0 * (embed + blocks + merger)


def flop_ratios(c: dict, queries: tuple[int, ...] = (1, 4, 16)) -> dict:
    prefix = c["system_tokens"] + c["visual_tokens"] + c["time_tokens"]
    suffix = c["query_tokens"] + c["memory_tokens"]
    v = vision_flops(c)
    lp = lm_flops(prefix, 0, c)
    ls = lm_flops(suffix, prefix, c)
    full = lm_flops(prefix + suffix, 0, c)
    out = {
        "formula": "ratio(Q) = Q*(V + L(P+S)) / (V + L(P) + Q*L(S|P)); V vision FLOPs per segment, "
        "L text-model FLOPs (see bench_svlm.lm_flops), P prefix tokens, S suffix+memory tokens",
        "config": c,
        "prefix_tokens": prefix,
        "suffix_tokens": suffix,
        "vision_gflops": v / 1e9,
        "lm_prefix_gflops": lp / 1e9,
        "lm_suffix_gflops": ls / 1e9,
        "lm_full_sequence_gflops": full / 1e9,
        "ratio_limit_many_queries": (v + full) / ls,
    }
    for q in queries:
        out[f"ratio_q{q}"] = q * (v + full) / (v + lp + q * ls)
    return out


# ----------------------------------------------------------------------------- timing
def _interleaved_medians(fn_a, fn_b, repeat: int) -> tuple[float, float]:
    """Median wall seconds of ``fn_a`` and ``fn_b``, run alternately (one warm-up each) so that
    load from other processes affects both alike."""
    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        times_a.append(t1 - t0)
        times_b.append(t2 - t1)
    return statistics.median(times_a), statistics.median(times_b)


def main(argv: list[str] | None = None) -> dict:
    from tempo_ops.svlm.compressor import Compressor
    from tempo_ops.svlm.tiny import make_tiny_models

    torch.manual_seed(0)
    # One intra-op thread: the tiny model's ops are too small to gain from more, and timings on a
    # shared 2-core machine are far steadier without thread oversubscription.
    torch.set_num_threads(1)
    figures: dict = {
        "model": "tiny Qwen3-VL (make_tiny_models seed 0: vision 2x64, text 2x64), CPU float32",
        "segment": f"{FRAMES} frames of {WIDTH}x{HEIGHT} (WxH) uint8, reference geometry",
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_models(tmp, seed=0)
        comp = Compressor.from_pretrained(paths["svlm"], device="cpu", max_batch_tokens=65536)
        segs16 = _segments(16)
        prepared = comp._prepare_segment(segs16[0], 0)
        figures["grid_thw"] = prepared.grid[0].tolist()
        figures["prefix_tokens"] = int(prepared.input_ids.numel())

        throughput = {}
        for b in (1, 4, 16):
            segs = segs16[:b]
            t = median_time(lambda s=segs: comp.compress(s, [QUERY]), repeat=5)
            throughput[f"batch_{b}"] = {"segments_per_s": b / t["median_s"], **t}
        figures["segments_per_s"] = throughput

        shared = {}
        segs = segs16[:4]
        for q in (1, 4, 16):
            queries = _queries(q)
            a = comp.compress(segs, queries)
            b = [comp.compress_unshared(segs, [x]) for x in queries]
            diff = max(float(np.abs(a.candidates[i] - b[i].candidates[0]).max()) for i in range(q))
            t_shared, t_sep = _interleaved_medians(
                lambda qs=queries: comp.compress(segs, qs),
                lambda qs=queries: [comp.compress_unshared(segs, [x]) for x in qs],
                repeat=5,
            )
            shared[f"queries_{q}"] = {
                "segments": len(segs),
                "shared_median_s": t_shared,
                "separate_full_sequences_median_s": t_sep,
                "speedup": t_sep / t_shared,
                "max_abs_diff_candidates": diff,
            }
        figures["shared_prefix"] = shared
    figures["flops_qwen3_vl_2b"] = flop_ratios(QWEN3_VL_2B)
    figures["peak_rss_mb"] = peak_rss_mb()
    write_result("svlm", figures, "python -m bench.bench_svlm " + " ".join(argv or sys.argv[1:]))
    return figures


if __name__ == "__main__":
    main()
