"""Benchmark: SVLM input preparation per segment (frames → patches; prompt token ids).

Measures, side by side in one run, for an 8-frame 512×288 segment (the common 16:9 case):
frames_to_video_inputs with and without the reference geometry pass, building the
query-independent prefix ids, and building one query's suffix ids (what each extra query
costs once the prefix is shared).
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np

from bench.common import median_time, peak_rss_mb, write_result


def main() -> None:
    from transformers import AutoTokenizer

    from tempo_ops.svlm.prompt import build_prefix_ids, build_suffix_ids
    from tempo_ops.svlm.tokenizer_build import write_tokenizer
    from tempo_ops.svlm.vision_inputs import frames_to_video_inputs

    rng = np.random.default_rng(0)
    frames_288 = rng.integers(0, 256, (8, 288, 512, 3), dtype=np.uint8)
    frames_256 = rng.integers(0, 256, (8, 256, 512, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp)))
    vi = frames_to_video_inputs(frames_288)

    repeat = 20
    geo = median_time(lambda: frames_to_video_inputs(frames_288), repeat=repeat)
    geo_noop = median_time(lambda: frames_to_video_inputs(frames_256), repeat=repeat)
    plain = median_time(lambda: frames_to_video_inputs(frames_256, reference_geometry=False), repeat=repeat)
    prefix = median_time(lambda: build_prefix_ids(tok, vi.video_grid_thw, 8, 2.0), repeat=repeat)
    suffix = median_time(lambda: build_suffix_ids(tok, "What is the person in the video doing?"), repeat=repeat)
    figures = {
        "segment": "8 frames, 512x288 uint8 -> grid (4,16,32), 512 visual tokens",
        "video_inputs_reference_geometry_512x288_ms": geo["median_s"] * 1e3,
        "video_inputs_reference_geometry_512x256_ms": geo_noop["median_s"] * 1e3,
        "video_inputs_no_geometry_512x256_ms": plain["median_s"] * 1e3,
        "geometry_overhead_ratio_512x288": geo["median_s"] / plain["median_s"],
        "prefix_ids_ms": prefix["median_s"] * 1e3,
        "prefix_tokens": int(len(build_prefix_ids(tok, vi.video_grid_thw, 8, 2.0))),
        "suffix_ids_ms": suffix["median_s"] * 1e3,
        "segments_per_s_inputs_plus_prefix": 1.0 / (geo["median_s"] + prefix["median_s"]),
        "repeat": repeat,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_result("svlm_inputs", figures, command=" ".join([sys.executable, "-m", "bench.bench_svlm_inputs"]))


if __name__ == "__main__":
    main()
