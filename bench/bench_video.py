"""Video front-end benchmark: exact and key-frame sampling vs decoding every frame.

Generates (once, cached under ``/tmp/tempo_bench_video``) a 30-minute and a 10-minute
640x360 H.264 video at 15 frames/s with a key frame every 5 s (x264 ``ultrafast``, panning
texture so decoding costs what it does on real footage), then samples them with
``tempo_ops.video.iter_segments``:

- ``sampler``: our default path, ``frame_accuracy="exact"`` (``seek_mode="auto"``: seek
  past key frames when that saves decoding);
- ``decode_all``: the same code with ``seek_mode="never"`` (decode every frame, keep the
  sampled ones);
- ``keyframe``: ``frame_accuracy="keyframe"`` (the last key frame at or before each sample,
  decoded with ``skip_frame="NONKEY"``; approximate, so its checksum differs);
- ``sampler_threaded`` / ``decode_all_threaded`` (30-min, 1024 samples only): the exact
  paths with FFmpeg frame threading on (``threaded=True``, ``thread_type="AUTO"``), to
  decide whether it pays. ``sampler`` and ``decode_all`` both run with the shipped default
  (off: it gained nothing on 2 cores), so their ratio stays like for like.

All convert and resize their sampled frames (640x360 -> 512x288; a frame picked again is
converted once). The clock runs from ``plan_video`` to the last segment; ``av`` and PIL are
imported before it starts (a once-per-process cost). Each measurement runs in a fresh subprocess so ``ru_maxrss`` is that
run's peak; the modes are interleaved (the machine's load drifts) and medians taken over
repeats. ``python -m bench.bench_video`` writes ``bench/results/video.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE_DIR = Path(os.environ.get("TEMPO_BENCH_VIDEO_DIR", "/tmp/tempo_bench_video"))
FPS = 15
GOP_S = 5
WIDTH, HEIGHT = 640, 360
BIT_RATE = 300_000
REPEAT = 3


def ensure_video(minutes: int) -> tuple[str, float]:
    """Path of the cached ``minutes``-long benchmark video and its generation time (0 if cached)."""
    from tempo_ops.synthetic import write_test_video

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"bench_{minutes}min_{WIDTH}x{HEIGHT}_{FPS}fps_gop{GOP_S}s_v1.mp4"
    if path.exists() and path.stat().st_size > 0:
        return str(path), 0.0
    tmp = path.with_suffix(".partial.mp4")
    t0 = time.perf_counter()
    write_test_video(
        tmp,
        n_frames=minutes * 60 * FPS,
        fps=FPS,
        width=WIDTH,
        height=HEIGHT,
        gop=GOP_S * FPS,
        preset="ultrafast",
        pattern="texture",
        bit_rate=BIT_RATE,
    )
    tmp.rename(path)
    return str(path), time.perf_counter() - t0


# mode -> (frame_accuracy, seek_mode, threaded)
MODES = {
    "decode_all": ("exact", "never", False),
    "sampler": ("exact", "auto", False),
    "keyframe": ("keyframe", "auto", False),
    "decode_all_threaded": ("exact", "never", True),
    "sampler_threaded": ("exact", "auto", True),
}


def worker(mode: str, path: str, max_frames: int) -> dict:
    """One measurement (run in a fresh process): sample ``path`` and report time and memory."""
    import av  # noqa: F401 - imported before the clock starts: a once-per-process cost (~0.2 s)
    from PIL import Image  # noqa: F401

    from bench.common import peak_rss_mb
    from tempo_ops.video import SamplingConfig, count_decoded_frames, iter_segments, plan_video

    rss_before = peak_rss_mb()
    accuracy, seek_mode, threaded = MODES[mode]
    t0 = time.perf_counter()
    plan = plan_video(path, SamplingConfig(max_frames=max_frames, frame_accuracy=accuracy))
    n_frames = 0
    checksum = 0
    returned: list[int] = []
    for seg in iter_segments(path, plan=plan, seek_mode=seek_mode, threaded=threaded):
        n_frames += len(seg.frames)
        checksum += int(seg.frames[:, 0, 0, 0].sum())
        returned.extend(seg.frame_indices[: plan.bounds[seg.index][1] - plan.bounds[seg.index][0]])
    seconds = time.perf_counter() - t0
    stats = count_decoded_frames(path, plan, seek_mode, threaded=threaded)  # after timing: counts only
    fps = plan.info.fps or 1.0
    lags = [(want - got) / fps for want, got in zip(plan.frame_indices, returned)]  # s earlier than nominal
    return {
        "seconds": seconds,
        "sampled_frames": n_frames,
        "frames_per_s": n_frames / seconds,
        "decoded_frames": stats["decoded"],
        "seeks": stats["seeks"],
        "source_frames": plan.info.frame_count,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss_before,
        "checksum": checksum,
        "mean_lag_s": sum(lags) / len(lags),
        "max_lag_s": max(lags),
        "exact_frames_fraction": sum(1 for x in lags if x == 0) / len(lags),
    }


def _run_worker(mode: str, path: str, max_frames: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_video", "--worker", mode, path, str(max_frames)],
        check=True,
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    if len({r["checksum"] for r in runs}) != 1:
        raise RuntimeError("repeated runs picked different frames")
    med = statistics.median(r["seconds"] for r in runs)
    first = runs[0]
    return {
        "median_s": med,
        "min_s": min(r["seconds"] for r in runs),
        "max_s": max(r["seconds"] for r in runs),
        "repeat": len(runs),
        "sampled_frames_per_s": first["sampled_frames"] / med,
        "sampled_frames": first["sampled_frames"],
        "decoded_frames": first["decoded_frames"],
        "source_frames": first["source_frames"],
        "seeks": first["seeks"],
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "rss_after_imports_mb": statistics.median(r["rss_after_imports_mb"] for r in runs),
        "checksum": first["checksum"],
        "mean_lag_s": first["mean_lag_s"],
        "max_lag_s": first["max_lag_s"],
        "exact_frames_fraction": first["exact_frames_fraction"],
    }


def _measure(path: str, max_frames: int, modes: tuple[str, ...], repeat: int = REPEAT) -> dict[str, dict]:
    """``repeat`` runs of each mode, interleaved (the machine's load drifts); summaries by mode."""
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeat):
        for mode in modes:
            runs[mode].append(_run_worker(mode, path, max_frames))
    return {mode: _summary(r) for mode, r in runs.items()}


def main() -> None:
    from bench.common import write_result

    t_start = time.perf_counter()
    long_path, gen_long = ensure_video(30)
    short_path, gen_short = ensure_video(10)
    figures: dict = {
        "video": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "gop_s": GOP_S, "codec": "h264 (x264 ultrafast)", "bit_rate": BIT_RATE},
        "generation_s": {"30min": gen_long, "10min": gen_short},
    }
    base = ("decode_all", "sampler", "keyframe")
    cases = (
        ("30min_1024", long_path, 1024, base + ("decode_all_threaded", "sampler_threaded")),
        ("10min_1024", short_path, 1024, base),
        ("30min_64", long_path, 64, base),
    )
    for label, path, max_frames, modes in cases:
        res = _measure(path, max_frames, modes)
        sampler, full, key = res["sampler"], res["decode_all"], res["keyframe"]
        exact_sums = {res[m]["checksum"] for m in modes if MODES[m][0] == "exact"}
        if len(exact_sums) != 1:
            raise RuntimeError(f"{label}: the exact paths (seek / sequential / threaded / unthreaded) picked different frames")
        fig = {
            **res,
            "speedup": full["median_s"] / sampler["median_s"],
            "keyframe_speedup": full["median_s"] / key["median_s"],
            "keyframe_vs_exact_speedup": sampler["median_s"] / key["median_s"],
            "decoded_fraction": sampler["decoded_frames"] / full["decoded_frames"],
            "decoded_ratio": full["decoded_frames"] / sampler["decoded_frames"],
            "keyframe_decoded_ratio": full["decoded_frames"] / key["decoded_frames"],
        }
        if "sampler_threaded" in res:  # > 1: frame threading is faster
            fig["thread_gain_sampler"] = sampler["median_s"] / res["sampler_threaded"]["median_s"]
            fig["thread_gain_decode_all"] = full["median_s"] / res["decode_all_threaded"]["median_s"]
        figures[label] = fig
        print(
            f"{label}: decode-all {full['median_s']:.2f} s, exact {sampler['median_s']:.2f} s (x{fig['speedup']:.2f}), "
            f"keyframe {key['median_s']:.2f} s (x{fig['keyframe_speedup']:.2f})",
            flush=True,
        )
    for mode in ("sampler", "keyframe"):
        figures[f"peak_rss_ratio_30min_vs_10min_{mode}"] = figures["30min_1024"][mode]["peak_rss_mb"] / figures["10min_1024"][mode]["peak_rss_mb"]
    figures["peak_rss_ratio_30min_vs_10min"] = figures["peak_rss_ratio_30min_vs_10min_sampler"]  # kept for older readers
    figures["total_bench_s"] = time.perf_counter() - t_start
    write_result("video", figures, "python -m bench.bench_video")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
