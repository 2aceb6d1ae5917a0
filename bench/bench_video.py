"""Video front-end benchmark: exact and key-frame sampling vs decoding every frame.

Generates (once, cached under ``/tmp/tempo_bench_video``) 640x360 H.264 videos at 15
frames/s, 300 kbit/s, a key frame every 5 s (also 2 s and 10 s for the default profile,
the ends of the issue's range), showing a panning texture (so decoding costs what it does
on real footage), in two encoder profiles:

- ``x264_default``: x264's default preset (medium: B-frames, most of them non-reference
  pictures, CABAC, deblocking) -- what ``ffmpeg -c:v libx264`` writes; the headline case;
- ``x264_ultrafast``: no B-frames, CAVLC, no deblocking -- the cheapest stream to decode,
  where every frame is a reference picture.

Each is sampled with ``tempo_ops.video.iter_segments`` in these modes:

- ``sampler``: the shipped default, ``frame_accuracy="exact"``, ``seek_mode="auto"`` (seek
  past key frames and skip non-reference pictures that no sample shows);
- ``decode_all``: the same code with ``seek_mode="never"`` (decode every frame, keep and
  convert the sampled ones) -- the baseline;
- ``keyframe``: ``frame_accuracy="keyframe"`` (the last key frame at or before each sample,
  decoding key frames only; approximate, so its checksum differs);
- ``*_inline``: the same with ``convert_threads=0`` (conversion in the decoding thread)
  instead of the default conversion threads, to show what the threads add;
- ``*_frame_threads`` (30-min default profile only): FFmpeg frame threading
  (``threaded=True``), to decide whether it pays;
- ``convert_only``: the per-frame cost of the output conversion alone (colour conversion +
  PIL bicubic resize 640x360 -> 512x288) on 128 sampled frames: any exact sampler must
  convert its 1024 distinct frames, so ``decode_all_inline / (1024 x that)`` bounds the
  speed-up an exact sampler could reach even if decoding cost nothing.

The clock runs from ``plan_video`` to the last segment; ``av`` and PIL are imported before
it starts (a once-per-process cost). Each measurement runs in a fresh subprocess so the
peak RSS (VmHWM) is that run's; the modes are interleaved (the machine's load drifts) and
medians taken over repeats. Ratios compare modes measured side by side in this one run.
``python -m bench.bench_video`` writes ``bench/results/video.json``.
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
MAX_FRAMES = 1024
CONVERT_SAMPLE = 128
# profile -> x264 preset (None: x264's default, "medium")
PROFILES = {"x264_default": None, "x264_ultrafast": "ultrafast"}


def ensure_video(minutes: int, profile: str, gop_s: int = GOP_S) -> tuple[str, float]:
    """Path of the cached benchmark video and its generation time in s (0 if cached)."""
    from tempo_ops.synthetic import write_test_video

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"bench_{minutes}min_{WIDTH}x{HEIGHT}_{FPS}fps_gop{gop_s}s_{profile}_v1.mp4"
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
        gop=gop_s * FPS,
        preset=PROFILES[profile],
        pattern="texture",
        bit_rate=BIT_RATE,
    )
    tmp.rename(path)
    return str(path), time.perf_counter() - t0


# mode -> (frame_accuracy, seek_mode, frame threads, convert_threads (None: default))
MODES = {
    "decode_all": ("exact", "never", False, None),
    "sampler": ("exact", "auto", False, None),
    "keyframe": ("keyframe", "auto", False, None),
    "decode_all_inline": ("exact", "never", False, 0),
    "sampler_inline": ("exact", "auto", False, 0),
    "keyframe_inline": ("keyframe", "auto", False, 0),
    "decode_all_frame_threads": ("exact", "never", True, None),
    "sampler_frame_threads": ("exact", "auto", True, None),
}
BASE = ("decode_all", "sampler", "keyframe")
WITH_INLINE = BASE + ("decode_all_inline", "sampler_inline", "keyframe_inline")


def worker(mode: str, path: str, max_frames: int) -> dict:
    """One measurement (run in a fresh process): sample ``path`` and report time and memory."""
    import av  # noqa: F401 - imported before the clock starts: a once-per-process cost (~0.2 s)
    from PIL import Image  # noqa: F401

    from bench.common import peak_rss_mb
    from tempo_ops.video import (
        SamplingConfig,
        count_decoded_frames,
        default_convert_threads,
        iter_segments,
        plan_video,
    )

    if mode == "convert_only":
        return _convert_only(path, max_frames)
    rss_before = peak_rss_mb()
    accuracy, seek_mode, threaded, convert_threads = MODES[mode]
    t0 = time.perf_counter()
    plan = plan_video(path, SamplingConfig(max_frames=max_frames, frame_accuracy=accuracy))
    n_frames = 0
    checksum = 0
    returned: list[int] = []
    segments = iter_segments(path, plan=plan, seek_mode=seek_mode, threaded=threaded, convert_threads=convert_threads)
    for seg in segments:
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
        "redone_picks": stats["redone"],
        "source_frames": plan.info.frame_count,
        "convert_threads": default_convert_threads() if convert_threads is None else convert_threads,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss_before,
        "checksum": checksum,
        "mean_lag_s": sum(lags) / len(lags),
        "max_lag_s": max(lags),
        "exact_frames_fraction": sum(1 for x in lags if x == 0) / len(lags),
    }


def _convert_only(path: str, max_frames: int) -> dict:
    """Seconds per frame of the output conversion alone, on the first sampled frames."""
    from tempo_ops import video

    plan = video.plan_video(path, video.SamplingConfig(max_frames=max_frames))
    seconds = 0.0
    with video._open_container(path) as (container, stream):  # noqa: SLF001 - benchmark internals
        picker = video._FramePicker(container, stream, plan.info, "auto")  # noqa: SLF001
        for i in plan.frame_indices[:CONVERT_SAMPLE]:
            frame, _ = picker.pick(video._target_time(plan.info, i))  # noqa: SLF001
            t0 = time.perf_counter()  # timed right after decoding, as in the sampler (warm caches)
            video._to_output(frame, plan.info.rotation, plan.frame_width, plan.frame_height)  # noqa: SLF001
            seconds += time.perf_counter() - t0
    return {"seconds": seconds, "frames": CONVERT_SAMPLE, "s_per_frame": seconds / CONVERT_SAMPLE}


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
        "redone_picks": first["redone_picks"],
        "convert_threads": first["convert_threads"],
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


def _ratios(res: dict[str, dict]) -> dict[str, float]:
    """Speed-ups (> 1: faster) between modes measured side by side."""
    t = {mode: r["median_s"] for mode, r in res.items()}
    out = {
        "speedup": t["decode_all"] / t["sampler"],
        "keyframe_speedup": t["decode_all"] / t["keyframe"],
        "keyframe_vs_exact_speedup": t["sampler"] / t["keyframe"],
        "decoded_fraction": res["sampler"]["decoded_frames"] / res["decode_all"]["decoded_frames"],
        "keyframe_decoded_fraction": res["keyframe"]["decoded_frames"] / res["decode_all"]["decoded_frames"],
    }
    if "sampler_inline" in t:
        out["speedup_inline"] = t["decode_all_inline"] / t["sampler_inline"]
        out["keyframe_speedup_inline"] = t["decode_all_inline"] / t["keyframe_inline"]
        # What the conversion threads add to each path (> 1: the threads are faster).
        out["convert_thread_gain_sampler"] = t["sampler_inline"] / t["sampler"]
        out["convert_thread_gain_decode_all"] = t["decode_all_inline"] / t["decode_all"]
        out["convert_thread_gain_keyframe"] = t["keyframe_inline"] / t["keyframe"]
    if "sampler_frame_threads" in t:
        out["frame_thread_gain_sampler"] = t["sampler"] / t["sampler_frame_threads"]
        out["frame_thread_gain_decode_all"] = t["decode_all"] / t["decode_all_frame_threads"]
    return out


def main() -> None:
    from bench.common import write_result

    t_start = time.perf_counter()
    paths, generation = {}, {}
    videos = {  # key -> (minutes, profile, GOP in s)
        "30min_x264_default": (30, "x264_default", GOP_S),
        "10min_x264_default": (10, "x264_default", GOP_S),
        "30min_x264_ultrafast": (30, "x264_ultrafast", GOP_S),
        "30min_x264_default_gop2s": (30, "x264_default", 2),
        "30min_x264_default_gop10s": (30, "x264_default", 10),
    }
    for key, (minutes, profile, gop_s) in videos.items():
        paths[key], generation[key] = ensure_video(minutes, profile, gop_s)
    figures: dict = {
        "video": {
            "width": WIDTH,
            "height": HEIGHT,
            "fps": FPS,
            "gop_s": GOP_S,
            "gop_s_sweep": [2, GOP_S, 10],
            "bit_rate": BIT_RATE,
            "profiles": {p: f"h264, x264 preset {preset or 'default (medium)'}" for p, preset in PROFILES.items()},
        },
        "generation_s": generation,
    }
    cases = (  # label, video, sampled frames, modes
        ("30min_1024", "30min_x264_default", MAX_FRAMES, WITH_INLINE + ("decode_all_frame_threads", "sampler_frame_threads")),
        ("30min_1024_ultrafast", "30min_x264_ultrafast", MAX_FRAMES, WITH_INLINE),
        ("10min_1024", "10min_x264_default", MAX_FRAMES, BASE),
        ("30min_64", "30min_x264_default", 64, BASE),
        ("30min_1024_gop2s", "30min_x264_default_gop2s", MAX_FRAMES, BASE),
        ("30min_1024_gop10s", "30min_x264_default_gop10s", MAX_FRAMES, BASE),
    )
    for label, video_key, max_frames, modes in cases:
        path = paths[video_key]
        res = _measure(path, max_frames, modes)
        exact_sums = {res[m]["checksum"] for m in modes if MODES[m][0] == "exact"}
        key_sums = {res[m]["checksum"] for m in modes if MODES[m][0] == "keyframe"}
        if len(exact_sums) != 1 or len(key_sums) != 1:
            raise RuntimeError(f"{label}: paths of one frame accuracy picked different frames")
        fig = {"video": video_key, "max_frames": max_frames, **res, **_ratios(res)}
        if label in ("30min_1024", "30min_1024_ultrafast"):
            conv = [_run_worker("convert_only", path, max_frames) for _ in range(REPEAT)]
            per_frame = statistics.median(c["s_per_frame"] for c in conv)
            fig["convert_s_per_frame"] = per_frame
            fig["exact_speedup_bound_if_decoding_were_free"] = res["decode_all_inline"]["median_s"] / (
                per_frame * res["sampler"]["sampled_frames"]
            )
        figures[label] = fig
        print(
            f"{label}: decode-all {res['decode_all']['median_s']:.2f} s, exact {res['sampler']['median_s']:.2f} s "
            f"(x{fig['speedup']:.2f}), keyframe {res['keyframe']['median_s']:.2f} s (x{fig['keyframe_speedup']:.2f})",
            flush=True,
        )
    for mode in BASE[1:]:
        figures[f"peak_rss_ratio_30min_vs_10min_{mode}"] = (
            figures["30min_1024"][mode]["peak_rss_mb"] / figures["10min_1024"][mode]["peak_rss_mb"]
        )
    figures["total_bench_s"] = time.perf_counter() - t_start
    write_result("video", figures, "python -m bench.bench_video")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
