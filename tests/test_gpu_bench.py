"""bench/gpu.py: exits cleanly without CUDA; its whole logic runs on the CPU in a dry run."""

from __future__ import annotations

import json

import torch

from bench import gpu


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_peak_table_matches_device_names():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("NVIDIA L4") == 121.0
    assert gpu.peak_tflops("NVIDIA L40S") == 362.0
    assert gpu.peak_tflops("Some Future GPU") is None


def test_dry_run_exercises_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--out", str(out), "--budget-s", "600"]) == 0
    fig = json.loads(out.read_text())["figures"]
    comp = fig["compressor"]
    assert set(comp) == {f"batch_{b}_queries_{q}" for b in (1, 2) for q in (1, 2)}
    for key, row in comp.items():
        assert row["segments_per_s"] > 0 and row["counted_tflop_per_call"] > 0, key
        assert row["query_segments_per_s"] == row["segments_per_s"] * row["queries"]
    # twice the queries on the same segments: more counted work per call (suffix + memory tokens)
    assert comp["batch_2_queries_2"]["counted_tflop_per_call"] > comp["batch_2_queries_1"]["counted_tflop_per_call"]
    dec = fig["decode"]
    assert dec["workers_1"]["segments"] == 2 * 2 and dec["workers_2"]["segments"] == 4 * 2  # 6 s → 12 frames → 2 segments
    assert dec["workers_to_feed_gpu_at_1_worker_rate"] > 0 and isinstance(dec["cpu_can_feed_gpu"], bool)
    ev = fig["eval"]
    assert ev["visual_tokens"] <= 64 and ev["batch_1"]["samples_per_s"] > 0 and ev["batch_2"]["prompt_length"] > 64


def test_spent_budget_skips_sections(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--out", str(out), "--budget-s", "0"]) == 0
    fig = json.loads(out.read_text())["figures"]
    assert all(v == "skipped: time budget spent" for v in fig["compressor"].values())
    assert fig["eval"] == "skipped: time budget spent"
