"""GPU benchmark of the real-shape models: one short run (≤ 8 min) → ``bench/results/gpu.json``.

On a CUDA machine it builds random-weight Qwen3-VL-2B (compressor) and Qwen3-4B + projector
(Tempo-6B's LLM stage) with the published configurations directly on the GPU in bf16 (no files:
writing 17 GB of weights would take most of the time budget), then measures:

- compressor segments/s of ``Compressor.compress`` (shared-prefix path) for several batch sizes
  (segments per call) with 1 and 16 queries; 8-frame 512×256 segments (512 visual tokens);
- achieved TFLOP/s = FLOPs counted by ``torch.utils.flop_counter`` on one call of the same
  shape (the counter sees the GPU's flash / memory-efficient attention kernels) ÷ seconds,
  against the device's dense bf16 peak from the vendor datasheet (``PEAK_BF16_TFLOPS``);
- GPU utilisation sampled by NVML (``nvidia-smi``'s source) while the timed calls run;
- peak GPU memory (``torch.cuda.max_memory_allocated``) per stage;
- CPU decode segments/s with N worker processes on a synthetic 640×360 H.264 video (exact
  sampling) vs the GPU's segments/s: how many decode workers keep one GPU busy;
- ``tempo eval``-style samples/s at an 8K budget (``allocate`` → ``pack`` → ``build_inputs`` →
  greedy ``generate``, 16 new tokens), batch 1 and 4.

Sections stop being started once the time budget is spent (each says so in the output).
Without CUDA it prints that and exits 0. ``--dry-run`` runs the same logic on the CPU with
1-layer models at the exact widths and small inputs (used by the tests; figures meaningless),
writing to ``--out`` instead of bench/results.

Run: ``python -m bench.gpu [--budget-s 480] [--dry-run --out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine_info, write_result

PEAK_BF16_TFLOPS = {
    # dense bf16 tensor-core peaks (no sparsity), vendor datasheets:
    "H200": 989.0,  # NVIDIA H200 datasheet (SXM), same tensor cores as H100 SXM
    "H100 PCIe": 756.0,  # NVIDIA H100 datasheet (PCIe)
    "H100": 989.0,  # NVIDIA H100 datasheet (SXM5): 1979 with sparsity
    "A100": 312.0,  # NVIDIA A100 datasheet: 312 bf16 dense (624 with sparsity)
    "L4": 121.0,  # NVIDIA L4 datasheet: 242 with sparsity
    "L40S": 362.0,  # NVIDIA L40S datasheet: 362.05 (733 with sparsity)
}


@dataclass
class Plan:
    """What one run measures (full on CUDA; small for ``--dry-run``)."""

    device: str
    svlm_cfg: dict
    llm_cfg: dict
    batch_sizes: list[int]
    query_counts: list[int]
    frames_hw: tuple[int, int]
    reference_geometry: bool
    budget_tokens: int
    eval_segments: int
    eval_batches: list[int]
    decode_workers: list[int]
    decode_video: dict = field(default_factory=lambda: {"n_frames": 1800, "fps": 30.0, "width": 640, "height": 360, "gop": 150})
    repeat: int = 3


def full_plan() -> Plan:
    from tempo_ops import model_presets as mp

    cpus = os.cpu_count() or 1
    workers = sorted({1, 2, 4, 8, 16, cpus} & set(range(1, cpus + 1)))
    return Plan(
        device="cuda", svlm_cfg=mp.svlm_config(), llm_cfg=mp.tempo_config(mp.llm_config()),
        batch_sizes=[1, 4, 16, 32], query_counts=[1, 16], frames_hw=(288, 512), reference_geometry=True,
        budget_tokens=8192, eval_segments=128, eval_batches=[1, 4], decode_workers=workers,
    )


def dry_plan() -> Plan:
    from tempo_ops import model_presets as mp

    s_cfg = mp.svlm_config(text_layers=1, vision_depth=1, compact_vocab=True)
    l_cfg = mp.tempo_config(mp.llm_config(layers=1, vocab_size=s_cfg["text_config"]["vocab_size"]))
    for key in ("bos_token_id", "eos_token_id"):
        l_cfg[key] = s_cfg["text_config"][key]
    return Plan(
        device="cpu", svlm_cfg=s_cfg, llm_cfg=l_cfg, batch_sizes=[1, 2], query_counts=[1, 2], frames_hw=(64, 64),
        reference_geometry=False, budget_tokens=64, eval_segments=4, eval_batches=[1, 2], decode_workers=[1, 2],
        decode_video={"n_frames": 48, "fps": 8.0, "width": 64, "height": 48, "gop": 8}, repeat=1,
    )


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a device name (longest matching key), None when unknown."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


class UtilSampler:
    """Samples GPU utilisation (%) with NVML every 50 ms while active (no-op without NVML/CUDA)."""

    def __init__(self, device_index: int = 0) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # noqa: BLE001 - no NVML: utilisation is reported as unavailable
            self._nvml = None

    def __enter__(self) -> UtilSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        return {"mean_pct": statistics.mean(self.samples), "median_pct": statistics.median(self.samples), "samples": len(self.samples)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _counted_flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


@dataclass
class _Seg:
    frames: np.ndarray
    start_position: int
    real_fps: float


def _tokenizer(cfg: dict, tmp: str) -> Any:
    from transformers import AutoTokenizer

    from tempo_ops import model_presets as mp
    from tempo_ops.svlm.tokenizer_build import write_tokenizer

    return AutoTokenizer.from_pretrained(str(write_tokenizer(tmp, mp.tokenizer_for(cfg))))


def build_compressor(plan: Plan, tmp: str) -> Any:
    from tempo_ops import model_presets as mp
    from tempo_ops.svlm.checkpoints import init_memory_tokens, single_token_id
    from tempo_ops.svlm.compressor import Compressor

    torch.manual_seed(0)
    model = mp.build_svlm(plan.svlm_cfg, device=plan.device, dtype=torch.bfloat16)
    tok = _tokenizer(plan.svlm_cfg, tmp)
    yes, no = single_token_id(tok, "Yes", item="gpu"), single_token_id(tok, "No", item="gpu")
    rows = model.lm_head.weight.detach()[[yes, no]].float().cpu()
    memory = init_memory_tokens(model.get_input_embeddings().weight, 128, seed=0)
    return Compressor(
        model, tok, memory, rows, svlm_name="qwen3-vl-2b-random", svlm_weights_sha256="0" * 64,
        memory_tokens_source="init:seed=0", device=torch.device(plan.device), dtype=torch.bfloat16,
        max_batch_tokens=1 << 20, reference_geometry=plan.reference_geometry,
    )


def _segments(plan: Plan, n: int) -> list[_Seg]:
    rng = np.random.default_rng(0)
    h, w = plan.frames_hw
    return [_Seg(rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8), 8 * i, 2.0) for i in range(n)]


def _queries(n: int) -> list[str]:
    from tempo_ops.query_text import render_query

    base = render_query("What is the person in the red jacket holding?", ["A. a cup", "B. a phone", "C. a book", "D. nothing"], "videomme")
    return [f"{base} ({i})" for i in range(n)]


def bench_compressor(plan: Plan, tmp: str, deadline: float, out: dict) -> float | None:
    """Segments/s per (batch, queries); returns the best 1-query segments/s (for the decode comparison)."""
    if time.perf_counter() > deadline:
        out["compressor"] = {f"batch_{b}_queries_{q}": "skipped: time budget spent" for q in plan.query_counts for b in plan.batch_sizes}
        return None
    comp = build_compressor(plan, tmp)
    peak = peak_tflops(torch.cuda.get_device_name(0)) if plan.device == "cuda" else None
    results: dict = {}
    best = None
    for q in plan.query_counts:
        queries = _queries(q)
        for b in plan.batch_sizes:
            key = f"batch_{b}_queries_{q}"
            if time.perf_counter() > deadline:
                results[key] = "skipped: time budget spent"
                continue
            segs = _segments(plan, b)
            if plan.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                flops = _counted_flops(lambda s=segs, qs=queries, c=comp: c.compress(s, qs))
                with UtilSampler() as util:
                    t = _timed(lambda s=segs, qs=queries, c=comp: c.compress(s, qs), plan.device, plan.repeat)
            except torch.OutOfMemoryError as exc:  # a batch too large for this GPU is a result, not a crash
                results[key] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
                continue
            tflops = flops / t / 1e12
            results[key] = {
                "segments": b, "queries": q, "median_s": t, "segments_per_s": b / t,
                "query_segments_per_s": b * q / t, "counted_tflop_per_call": flops / 1e12,
                "achieved_tflops": tflops, "fraction_of_peak": (tflops / peak) if peak else None,
                "gpu_util": util.summary(),
                "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if plan.device == "cuda" else None,
            }
            if q == 1:
                best = max(best or 0.0, b / t)
    out["compressor"] = results
    out["peak_bf16_tflops"] = peak
    del comp
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return best


def _decode_worker(args: tuple[str, int, int]) -> int:
    from tempo_ops.video import SamplingConfig, iter_segments, plan_video

    path, seed, _ = args
    vplan = plan_video(path, SamplingConfig())
    return sum(1 for _ in iter_segments(path, plan=vplan))


def bench_decode(plan: Plan, tmp: str, deadline: float, gpu_segments_per_s: float | None, out: dict) -> None:
    """Aggregate CPU decode segments/s with N worker processes, each decoding the whole video."""
    from tempo_ops.synthetic import write_test_video

    path = write_test_video(os.path.join(tmp, "decode.mp4"), **plan.decode_video)
    results: dict = {"video": plan.decode_video}
    for n in plan.decode_workers:
        if time.perf_counter() > deadline:
            results[f"workers_{n}"] = "skipped: time budget spent"
            continue
        # spawn under CUDA: a forked child of a process holding a CUDA context must not touch it
        ctx = multiprocessing.get_context("spawn") if plan.device == "cuda" else None
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
            list(pool.map(_decode_worker, [(path, i, n) for i in range(n)]))  # warm-up (imports)
            t0 = time.perf_counter()
            counts = list(pool.map(_decode_worker, [(path, i, n) for i in range(2 * n)]))
            wall = time.perf_counter() - t0
        results[f"workers_{n}"] = {"segments": sum(counts), "seconds": wall, "segments_per_s": sum(counts) / wall}
    rates = [v["segments_per_s"] for v in results.values() if isinstance(v, dict) and "segments_per_s" in v]
    if gpu_segments_per_s and rates:
        per_worker = results["workers_1"]["segments_per_s"] if isinstance(results.get("workers_1"), dict) else rates[0]
        results["gpu_segments_per_s_1_query"] = gpu_segments_per_s
        results["workers_to_feed_gpu_at_1_worker_rate"] = gpu_segments_per_s / per_worker
        results["cpu_can_feed_gpu"] = max(rates) >= gpu_segments_per_s
    out["decode"] = results


def bench_eval(plan: Plan, tmp: str, deadline: float, out: dict) -> None:
    from tempo_ops import model_presets as mp
    from tempo_ops.allocation import allocate
    from tempo_ops.llm.model import TempoLLM
    from tempo_ops.llm.projector import build_projector
    from tempo_ops.packing import pack
    from tempo_ops.video import segment_timestamp

    if time.perf_counter() > deadline:
        out["eval"] = "skipped: time budget spent"
        return
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = plan.llm_cfg
    lm = mp.build_llm(cfg, device=plan.device, dtype=torch.bfloat16)
    with torch.device(plan.device):
        projector = build_projector(cfg["mm_projector_type"], cfg["mm_hidden_size"], cfg["hidden_size"]).to(torch.bfloat16)
    llm = TempoLLM(lm, projector, _tokenizer(plan.svlm_cfg, tmp), cfg, name="tempo-6b-random", numerics="exact")
    S = plan.eval_segments
    rng = np.random.default_rng(0)

    class Entry:
        n_segments, K, D = S, 128, cfg["mm_hidden_size"]
        cand = (rng.standard_normal((S, 128, cfg["mm_hidden_size"])) * 0.5).astype(np.float16)

        def read_token_ranges(self, ranges):
            return [self.cand[i, a:b] for i, (a, b) in enumerate(ranges)]

    alloc = allocate(np.full(S, 0.5, dtype=np.float32), plan.budget_tokens)
    packed = pack(Entry(), alloc, [segment_timestamp(i, 2.0) for i in range(S)])
    context = _queries(1)[0]
    results: dict = {"budget": plan.budget_tokens, "segments": S, "visual_tokens": int(alloc.sum())}
    for b in plan.eval_batches:
        if time.perf_counter() > deadline:
            results[f"batch_{b}"] = "skipped: time budget spent"
            continue

        def one_batch(b=b):
            batch = [llm.build_inputs(packed.tokens, packed.allocation, packed.timestamp_texts, context) for _ in range(b)]
            return llm.generate(batch, max_new_tokens=16)

        try:
            with UtilSampler() as util:
                t = _timed(one_batch, plan.device, plan.repeat)
        except torch.OutOfMemoryError as exc:
            results[f"batch_{b}"] = f"out of memory: {str(exc).splitlines()[0]}"
            continue
        prompt = llm.build_inputs(packed.tokens, packed.allocation, packed.timestamp_texts, context).prompt_length
        results[f"batch_{b}"] = {"median_s": t, "samples_per_s": b / t, "prompt_length": int(prompt), "gpu_util": util.summary()}
    results["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if plan.device == "cuda" else None
    out["eval"] = results


def run(plan: Plan, budget_s: float) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    out: dict = {"plan": {k: v for k, v in plan.__dict__.items() if k not in ("svlm_cfg", "llm_cfg")}, "time_budget_s": budget_s}
    if plan.device == "cuda":
        out["device"] = torch.cuda.get_device_name(0)
        out["device_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    seconds = out["section_s"] = {}
    with tempfile.TemporaryDirectory(prefix="tempo_gpu_") as tmp:
        t0 = time.perf_counter()
        best = bench_compressor(plan, tmp, deadline - 0.35 * budget_s, out)
        t1 = time.perf_counter()
        bench_decode(plan, tmp, deadline - 0.25 * budget_s, best, out)
        t2 = time.perf_counter()
        bench_eval(plan, tmp, deadline, out)
        seconds.update(compressor=t1 - t0, decode=t2 - t1, eval=time.perf_counter() - t2)
    out["wall_s"] = time.perf_counter() - t_start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark of the real-shape models (bench/results/gpu.json)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this many seconds (default 420)")
    parser.add_argument("--dry-run", action="store_true", help="run the logic on the CPU with 1-layer models (tests)")
    parser.add_argument("--out", default=None, help="write the JSON here (dry runs never write bench/results)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured (bench/results/gpu.json not written)")
        return 0
    plan = dry_plan() if args.dry_run else full_plan()
    figures = run(plan, args.budget_s)
    command = "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "machine": machine_info(), "figures": figures}, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    elif not args.dry_run:
        write_result("gpu", figures, command)
    else:
        print(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
