"""The whole path learns: generated videos whose colour decides the answer, split by video.

compress (tiny SVLM) → shards per split → ``tempo train`` on the training videos → greedy
answers on the validation videos only: from about chance to at least 80% (fixed seed, 60 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.demo_train import run_learnable_task
from tempo_ops.train.metrics import read_metrics


def test_validation_accuracy_rises_from_chance(tiny_models, tmp_path):
    models = Path(tiny_models["tempo"]).parent
    res = run_learnable_task(tmp_path / "task", models=models, n_train=8, n_val=8, steps=60, seed=0)
    # validation samples are the validation videos, and only those
    assert res["val_samples"] == 8 and all(k.startswith("val_") for k in res["val_keys"])
    train_keys = {json.loads(line)["video_id"] for line in (tmp_path / "task" / "corpus" / "train.jsonl").read_text().splitlines()}
    assert train_keys.isdisjoint(k.split("~~")[0] for k in res["val_keys"])
    assert res["val_accuracy_before"] <= 0.5
    assert res["val_accuracy_after"] >= 0.8, res
    losses = [r["loss"] for r in read_metrics(res["metrics"], "train")]
    assert len(losses) == 60 and losses[-1] < 0.1 * losses[0]
    assert Path(res["plot"]).read_bytes()[:4] == b"\x89PNG"
