"""Real-shape smoke run on CPU: Qwen3-VL-2B compressor and Tempo-6B's Qwen3-4B LLM stage in bf16.

Random-weight models with the published configurations (``tempo make-random-models --preset
tempo-6b``, ~17 GB on disk, generated into a temporary directory and deleted afterwards unless
``--models DIR`` points at existing ones). Stages run one after the other, each in its own
process, so each one's peak memory is its own and is freed before the next starts:

1. ``compressor``: ``Compressor.from_pretrained(svlm, memory_tokens=tempo)`` (fine-tuned SVLM
   weights installed from the Tempo checkpoint), then ``compress`` of 2 segments × 2 queries
   (8 frames of 512×288 each → 512×256 by the reference geometry: 512 visual tokens per segment).
2. ``llm``: ``TempoLLM.from_pretrained(tempo)`` and one evaluation sample at an 8K budget:
   64 segments (the two compressed segments' candidates, repeated, stored float16 as in the
   cache) with equal relevance → ATA gives every segment 128 tokens = 8192 visual tokens, then
   ``pack`` → ``build_inputs`` (timestamps, prompt) → greedy ``generate`` (16 new tokens).

Figures (``bench/results/real_shapes.json``): output shapes, seconds (load / run) and peak RSS
(VmHWM, includes file pages mapped while loading) per stage. Needs ≥ 14 GiB of available memory
(checked first; otherwise it prints why and exits 0 without writing).

Run: ``python -m bench.bench_real_shapes [--models DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import peak_rss_mb, write_result

MIN_AVAILABLE_GIB = 14
FRAMES, HEIGHT, WIDTH = 8, 288, 512
SEGMENTS, QUERIES = 2, 2
EVAL_SEGMENTS, EVAL_BUDGET = 64, 8192
QUESTION = "What is the person in the red jacket holding?"
OPTIONS = ["A. a cup", "B. a phone", "C. a book", "D. nothing"]


@dataclass
class _Seg:
    frames: np.ndarray
    start_position: int
    real_fps: float


def available_gib() -> float:
    """``MemAvailable`` of /proc/meminfo in GiB (inf where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("inf")


def queries() -> list[str]:
    from tempo_ops.query_text import render_query

    return [render_query(QUESTION, OPTIONS, "videomme"), render_query("Describe what happens after the door opens.")]


def segments(n: int = SEGMENTS) -> list[_Seg]:
    rng = np.random.default_rng(0)
    return [_Seg(rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8), FRAMES * i, 2.0) for i in range(n)]


def stage_compressor(models: Path, scratch: Path) -> dict:
    import torch

    from tempo_ops.svlm.compressor import Compressor

    torch.manual_seed(0)
    t0 = time.perf_counter()
    comp = Compressor.from_pretrained(models / "svlm", memory_tokens=models / "tempo", device="cpu", dtype="bfloat16")
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_mb()
    segs, qs = segments(), queries()
    prepared = comp._prepare_segment(segs[0], 0)
    t0 = time.perf_counter()
    out = comp.compress(segs, qs)
    run_s = time.perf_counter() - t0
    np.save(scratch / "candidates.npy", out.candidates.astype(np.float16), allow_pickle=False)
    np.save(scratch / "relevance.npy", out.relevance, allow_pickle=False)
    return {
        "model": "Qwen3-VL-2B-Instruct config, random bf16 weights (+ Tempo-6B-layout memory tokens and SVLM)",
        "dtype": "bfloat16",
        "memory_tokens_source": comp.memory_tokens_source,
        "segments": len(segs),
        "queries": len(qs),
        "frames_per_segment": f"{FRAMES} x {WIDTH}x{HEIGHT} (WxH) uint8, reference geometry",
        "grid_thw": prepared.grid[0].tolist(),
        "pixel_values_shape": list(prepared.pixel_values.shape),
        "prefix_tokens": int(prepared.input_ids.numel()),
        "visual_tokens_per_segment": int((prepared.input_ids == comp._video_token_id).sum()),
        "suffix_tokens": [int(len(x)) for x in comp._suffix_ids(qs)],
        "candidates_shape": list(out.candidates.shape),
        "relevance_shape": list(out.relevance.shape),
        "relevance": out.relevance.round(4).tolist(),
        "candidates_abs_max": float(np.abs(out.candidates).max()),
        "candidates_fit_float16": bool(np.abs(out.candidates).max() < 65504),
        "load_s": load_s,
        "compress_s": run_s,
        "segments_per_s": len(segs) / run_s,
        "peak_rss_after_load_mb": rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


class _MemoryEntry:
    """A cache-entry stand-in over in-memory candidates ``(S, K, D) float16`` (``TokenSource``)."""

    def __init__(self, candidates: np.ndarray) -> None:
        self.candidates = candidates
        self.n_segments, self.K, self.D = candidates.shape
        self.video_id, self.query_id = "real_shapes", "q0"

    def read_token_ranges(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        return [self.candidates[i, a:b] for i, (a, b) in enumerate(ranges)]


def stage_llm(models: Path, scratch: Path) -> dict:
    import torch

    from tempo_ops.allocation import allocate
    from tempo_ops.llm.model import TempoLLM
    from tempo_ops.packing import pack
    from tempo_ops.video import segment_timestamp

    torch.manual_seed(0)
    cand = np.load(scratch / "candidates.npy", allow_pickle=False)[0]  # (2, K, D) of the first query
    reps = EVAL_SEGMENTS // cand.shape[0]
    entry = _MemoryEntry(np.concatenate([cand] * reps, axis=0))
    scores = np.full(EVAL_SEGMENTS, 0.5, dtype=np.float32)  # equal scores: every segment gets min(128, B/S)
    alloc = allocate(scores, EVAL_BUDGET, policy="ata")
    timestamps = [segment_timestamp(i, 2.0) for i in range(EVAL_SEGMENTS)]
    packed = pack(entry, alloc, timestamps)
    t0 = time.perf_counter()
    llm = TempoLLM.from_pretrained(models / "tempo", dtype="bfloat16", device="cpu")
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_mb()
    t0 = time.perf_counter()
    inputs = llm.build_inputs(packed.tokens, packed.allocation, packed.timestamp_texts, queries()[0])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen = llm.generate([inputs], max_new_tokens=16)[0]
    gen_s = time.perf_counter() - t0
    return {
        "model": "Qwen3-4B config (Tempo-6B layout, projector " + llm.projector_type + " 2048->2560), random bf16 weights",
        "dtype": str(llm.dtype).removeprefix("torch."),
        "numerics": llm.numerics,
        "budget": EVAL_BUDGET,
        "segments": EVAL_SEGMENTS,
        "visual_tokens": int(alloc.sum()),
        "packed_tokens_shape": list(packed.tokens.shape),
        "inputs_embeds_shape": list(inputs.inputs_embeds.shape),
        "prompt_length": int(inputs.prompt_length),
        "generated_tokens": len(gen.token_ids),
        "stopped": gen.stopped,
        "load_s": load_s,
        "build_inputs_s": build_s,
        "generate_s": gen_s,
        "samples_per_s": 1.0 / (build_s + gen_s),
        "peak_rss_after_load_mb": rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


STAGES = {"compressor": stage_compressor, "llm": stage_llm}


def _run_stage(name: str, models: Path, scratch: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_real_shapes", "--stage", name, "--models", str(models), "--scratch", str(scratch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"stage {name} failed with exit status {proc.returncode}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["stage_wall_s"] = time.perf_counter() - t0
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help="existing make-random-models --preset tempo-6b output (else generated)")
    parser.add_argument("--keep", action="store_true", help="keep generated models")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(STAGES[args.stage](Path(args.models), Path(args.scratch))))
        return 0
    avail = available_gib()
    if avail < MIN_AVAILABLE_GIB:
        print(f"real-shape smoke skipped: {avail:.1f} GiB available, needs {MIN_AVAILABLE_GIB} GiB (results not rewritten)")
        return 0
    figures: dict = {"available_gib_at_start": round(avail, 1)}
    made = None
    with tempfile.TemporaryDirectory(prefix="tempo_real_shapes_") as scratch:
        if args.models:
            models = Path(args.models)
        else:
            from tempo_ops.model_presets import make_random_models

            made = Path(tempfile.mkdtemp(prefix="tempo_real_models_"))
            t0 = time.perf_counter()
            make_random_models(made, "tempo-6b", seed=0)
            figures["generate_models_s"] = time.perf_counter() - t0
            models = made
        try:
            figures["disk_bytes"] = {
                sub: sum(p.stat().st_size for p in (models / sub).iterdir()) for sub in ("svlm", "tempo")
            }
            command = "python -m bench.bench_real_shapes " + " ".join(argv or sys.argv[1:])
            for name in ("compressor", "llm"):
                figures[name] = _run_stage(name, models, Path(scratch))
                print(f"{name}: {json.dumps(figures[name])}", flush=True)
                # written after every stage: a run stopped during the slow LLM stage keeps the compressor's
                write_result("real_shapes", {**figures, "complete": name == "llm"}, command)
        finally:
            if made is not None and not args.keep:
                shutil.rmtree(made, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    sys.exit(main())
