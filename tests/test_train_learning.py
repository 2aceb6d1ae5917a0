"""The whole path learns: generated videos whose colour decides the answer, split by video.

compress (tiny SVLM) → shards per split → ``tempo train`` on the training videos → greedy
answers (``tempo eval``) on the validation videos only: at least 80% after 60 steps (fixed
seed). Before training the run's own teacher-forced eval on the same videos shows at most
chance (``tempo demo-train`` also runs ``tempo eval`` before training; skipped here for time).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.demo_train import run_learnable_task
from tempo_ops.train.metrics import read_metrics


def test_validation_accuracy_rises_from_chance(tiny_models, tmp_path):
    models = Path(tiny_models["tempo"]).parent
    res = run_learnable_task(tmp_path / "task", models=models, n_train=8, n_val=8, steps=60, seed=0, eval_before=False)
    # validation samples are the validation videos, and only those
    assert res["val_samples"] == 8 and res["val_video_ids"] == [f"val_{i:03d}" for i in range(8)]
    train_ids = {json.loads(line)["video_id"] for line in (tmp_path / "task" / "corpus" / "train.jsonl").read_text().splitlines()}
    assert len(train_ids) == 8 and train_ids.isdisjoint(res["val_video_ids"])
    assert res["run_eval_before"]["eval_answer_accuracy"] <= 0.5 and res["run_eval_before"]["eval_samples"] == 8
    assert res["run_eval_after"]["eval_answer_accuracy"] >= 0.8
    assert res["val_accuracy_after"] >= 0.8, res
    losses = [r["loss"] for r in read_metrics(res["metrics"], "train")]
    assert len(losses) == 60 and losses[-1] < 0.1 * losses[0]
    assert Path(res["plot"]).read_bytes()[:4] == b"\x89PNG"
