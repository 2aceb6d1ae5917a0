"""Compression job throughput: Beam pipeline vs a plain single-process loop (tiny model, CPU).

Each contender runs as its own process over the same generated corpus into a fresh cache,
and is timed as a whole (interpreter start, imports, model load, decode, compress, write):
- ``loop``: plan → decode → compress (shared prefix) → write → finalize, video by video,
  torch using every core (intra-op threads);
- ``loop_1thread``: the same loop with one torch thread — what one worker process of a
  multi-worker run gets on this machine, so ``pipeline_w2 / loop_1thread`` shows worker scaling;
- ``pipeline_w1``: ``tempo compress`` on the local FnApiRunner, one in-process worker;
- ``pipeline_w2``: the same with ``--local_workers 2`` (default ``--local_mode threads``: two
  worker threads in one process sharing one model, one torch thread each);
- ``pipeline_w2_processes``: ``--local_workers 2 --local_mode processes`` (two SDK worker
  subprocesses, each importing torch and loading the model).
The loop and every pipeline decode with the library's default conversion threads
(``video.default_convert_threads()``, split among local workers).
Figures: wall seconds, segments/s, ratios to the loop, and the loop's time split by stage.
``python -m bench.bench_compress`` (or ``make bench``) writes bench/results/compress.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_result

WORK = Path(os.environ.get("TEMPO_BENCH_DIR", "/tmp/tempo_bench_compress"))
N_VIDEOS = 24
SEGMENTS_PER_VIDEO = 16
QUERIES = ["What happens?", "Is there a red object?"]
REPEAT = 3


def build_corpus(root: Path) -> Path:
    from tempo_ops.synthetic import write_test_video

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(N_VIDEOS):
        path = root / f"v{i}.mp4"
        if not path.exists():
            # Like real footage: 30 fps 640x360 H.264 with 2 s GOPs, sampled at 2 fps, so decoding
            # (one core, ~15 decoded frames per sampled frame) is a real share of the work.
            write_test_video(path, n_frames=SEGMENTS_PER_VIDEO * 8 * 15, fps=30, width=640, height=360, gop=60,
                             preset="ultrafast")
        queries = [{"query_id": f"q{j}", "text": q} for j, q in enumerate(QUERIES)]
        lines.append(json.dumps({"video_id": f"v{i}", "uri": str(path), "queries": queries}))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_loop(manifest: str, cache: str, svlm: str, tempo: str, threads: str = "0") -> dict:
    """The baseline: the same work as the job, as a plain Python loop in one process."""
    t_start = time.perf_counter()
    if int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    from pipelines.compress import cache_config, unit_ranges, video_meta
    from schemas.manifest import iter_manifest
    from tempo_ops import video
    from tempo_ops.store import CacheWriter
    from tempo_ops.svlm.compressor import Compressor

    t0 = time.perf_counter()
    compressor = Compressor.from_pretrained(svlm, memory_tokens=tempo)
    sampling = video.SamplingConfig()
    writer = CacheWriter.open(cache, cache_config(compressor.fingerprint(), sampling))
    stages = {"load_s": time.perf_counter() - t0, "decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    segments_done = 0
    for entry in iter_manifest(manifest):
        t0 = time.perf_counter()
        plan = video.plan_video(entry.uri, sampling)
        stages["decode_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.write_video(entry.video_id, video_meta(entry, plan))
        for q in entry.queries:
            writer.begin_entry(entry.video_id, q.query_id, q.text, plan.n_segments)
        stages["write_s"] += time.perf_counter() - t0
        for a, b in unit_ranges(plan.n_segments, writer.segments_per_shard):
            t0 = time.perf_counter()
            segs = list(video.iter_segments(entry.uri, sampling, plan=plan, segments=range(a, b)))
            stages["decode_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = compressor.compress(segs, [q.text for q in entry.queries])
            stages["model_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for qi, q in enumerate(entry.queries):
                writer.write_block(entry.video_id, q.query_id, a, result.candidates[qi], result.relevance[qi])
            stages["write_s"] += time.perf_counter() - t0
            segments_done += len(segs)
        t0 = time.perf_counter()
        for q in entry.queries:
            writer.finalize_entry(entry.video_id, q.query_id)
        stages["write_s"] += time.perf_counter() - t0
    stages["total_in_process_s"] = time.perf_counter() - t_start
    stages["segments"] = segments_done
    return stages


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, proc.stdout


def main() -> None:
    from tempo_ops.svlm.tiny import make_tiny_models

    WORK.mkdir(parents=True, exist_ok=True)
    models = make_tiny_models(WORK / "models", seed=0)
    manifest = build_corpus(WORK / "corpus_640x360_30fps")
    total_segments = N_VIDEOS * SEGMENTS_PER_VIDEO
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    py = sys.executable
    contenders = {
        "loop": lambda cache: [py, "-m", "bench.bench_compress", "loop", str(manifest), cache, models["svlm"], models["tempo"]],
        "loop_1thread": lambda cache: [py, "-m", "bench.bench_compress", "loop", str(manifest), cache, models["svlm"],
                                       models["tempo"], "1"],
        "pipeline_w1": lambda cache: [py, "-m", "pipelines.cli", "compress", "--manifest", str(manifest), "--cache", cache,
                                      "--svlm", models["svlm"], "--compressor", models["tempo"], "--local_workers", "1"],
        "pipeline_w2": lambda cache: [py, "-m", "pipelines.cli", "compress", "--manifest", str(manifest), "--cache", cache,
                                      "--svlm", models["svlm"], "--compressor", models["tempo"], "--local_workers", "2"],
        "pipeline_w2_processes": lambda cache: [py, "-m", "pipelines.cli", "compress", "--manifest", str(manifest),
                                                "--cache", cache, "--svlm", models["svlm"], "--compressor",
                                                models["tempo"], "--local_workers", "2", "--local_mode", "processes"],
    }
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    loop_stages: list[dict] = []
    summaries: dict[str, dict] = {}
    for rep in range(REPEAT):
        for name, cmd in contenders.items():  # interleaved, so drift on this shared machine hits all alike
            cache = WORK / f"cache_{name}.zarr"
            shutil.rmtree(cache, ignore_errors=True)
            wall, out = _timed(cmd(str(cache)), env)
            walls[name].append(wall)
            if name.startswith("loop"):
                if name == "loop":
                    loop_stages.append(json.loads(out.strip().splitlines()[-1]))
            else:
                summaries[name] = json.loads(Path(str(cache) + ".summary.json").read_text())
            print(f"rep {rep} {name}: {wall:.1f}s", flush=True)
    med = {name: statistics.median(v) for name, v in walls.items()}
    stage_med = {k: statistics.median(s[k] for s in loop_stages) for k in loop_stages[0]}
    figures = {
        "corpus": {"videos": N_VIDEOS, "segments": total_segments, "queries_per_video": len(QUERIES),
                   "source": "640x360 30 fps H.264 (x264 ultrafast, GOP 2 s), sampled at 2 fps; 8 frames per segment, reference geometry",
                   "model": "tiny Qwen3-VL (make_tiny_models seed 0)"},
        "repeats": REPEAT,
        "wall_s_median": med,
        "wall_s_all": walls,
        "segments_per_s": {name: total_segments / w for name, w in med.items()},
        "ratio_to_loop": {name: med["loop"] / w for name, w in med.items()},
        "worker_scaling_w2_vs_loop_1thread": med["loop_1thread"] / med["pipeline_w2"],
        "loop_stage_split_s": stage_med,
        "pipeline_summaries_timing": {name: s["timing"] for name, s in summaries.items()},
        "note": "whole-process wall times: interpreter start, imports, model load(s), decode, compress, write",
    }
    bound = max(("decode_s", "model_s", "write_s"), key=lambda k: stage_med[k])
    figures["throughput_bound_by"] = bound
    write_result("compress", figures, command="python -m bench.bench_compress")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "loop":
        print(json.dumps(run_loop(*sys.argv[2:7])))
    else:
        main()
