"""Video front-end benchmark: sparse sampling with key-frame seeks vs decoding every frame.

Generates (once, cached under ``/tmp/tempo_bench_video``) a 30-minute and a 10-minute
640x360 H.264 video at 15 frames/s with a key frame every 5 s (x264 ``ultrafast``, panning
texture so decoding costs what it does on real footage), then samples them with
``tempo_ops.video.iter_segments``:

- ``sampler``: our default path (``seek_mode="auto"``: seek past key frames when that saves
  decoding);
- ``decode_all``: the same code with ``seek_mode="never"`` (decode every frame, keep the
  sampled ones).

Both convert and resize the same sampled frames (640x360 -> 512x288), so the ratio is the
decoding saved. Each measurement runs in a fresh subprocess so ``ru_maxrss`` is that run's
peak; medians over repeats. ``python -m bench.bench_video`` writes ``bench/results/video.json``.
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


def worker(mode: str, path: str, max_frames: int) -> dict:
    """One measurement (run in a fresh process): sample ``path`` and report time and memory."""
    from bench.common import peak_rss_mb
    from tempo_ops.video import SamplingConfig, count_decoded_frames, iter_segments, plan_video

    rss_before = peak_rss_mb()
    seek_mode = {"sampler": "auto", "decode_all": "never"}[mode]
    t0 = time.perf_counter()
    plan = plan_video(path, SamplingConfig(max_frames=max_frames))
    n_frames = 0
    checksum = 0
    for seg in iter_segments(path, plan=plan, seek_mode=seek_mode):
        n_frames += len(seg.frames)
        checksum += int(seg.frames[:, 0, 0, 0].sum())
    seconds = time.perf_counter() - t0
    stats = count_decoded_frames(path, plan, seek_mode)  # after timing: counts only
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
    }


def _measure_pair(path: str, max_frames: int, repeat: int = REPEAT) -> tuple[dict, dict]:
    """Sampler and decode-all runs, interleaved (the machine's load drifts), ``repeat`` each."""
    sampler, full = [], []
    for _ in range(repeat):
        sampler.append(_run_worker("sampler", path, max_frames))
        full.append(_run_worker("decode_all", path, max_frames))
    return _summary(sampler), _summary(full)


def main() -> None:
    from bench.common import write_result

    t_start = time.perf_counter()
    long_path, gen_long = ensure_video(30)
    short_path, gen_short = ensure_video(10)
    figures: dict = {
        "video": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "gop_s": GOP_S, "codec": "h264 (x264 ultrafast)", "bit_rate": BIT_RATE},
        "generation_s": {"30min": gen_long, "10min": gen_short},
    }
    for label, path, max_frames in (("30min_1024", long_path, 1024), ("10min_1024", short_path, 1024), ("30min_64", long_path, 64)):
        sampler, full = _measure_pair(path, max_frames)
        if sampler["checksum"] != full["checksum"]:
            raise RuntimeError(f"{label}: the seek path and the sequential path picked different frames")
        figures[label] = {
            "sampler": sampler,
            "decode_all": full,
            "speedup": full["median_s"] / sampler["median_s"],
            "decoded_fraction": sampler["decoded_frames"] / full["decoded_frames"],
            "decoded_ratio": full["decoded_frames"] / sampler["decoded_frames"],
        }
        print(f"{label}: sampler {sampler['median_s']:.2f} s, decode-all {full['median_s']:.2f} s, x{figures[label]['speedup']:.2f}", flush=True)
    figures["peak_rss_ratio_30min_vs_10min"] = figures["30min_1024"]["sampler"]["peak_rss_mb"] / figures["10min_1024"]["sampler"]["peak_rss_mb"]
    figures["total_bench_s"] = time.perf_counter() - t_start
    write_result("video", figures, "python -m bench.bench_video")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
