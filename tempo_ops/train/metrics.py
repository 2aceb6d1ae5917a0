"""Training logs: ``metrics.jsonl`` records, progress lines, the loss-curve PNG.

Records (one JSON object per line, written by rank 0 only):

- train: ``{"kind": "train", "step", "epoch", "loss", "lr", "grad_norm", "samples",
  "tokens", "samples_per_s", "tokens_per_s", "elapsed_s"}`` — ``loss`` is the mean
  cross-entropy per answer token of the step over all ranks; ``tokens`` counts real
  (unpadded) input positions of the step over all ranks, and the rates are per second of
  that step's wall time;
- eval: ``{"kind": "eval", "step", "eval_loss", "eval_token_accuracy", "eval_samples"}`` —
  teacher-forced, on ``--eval-shards``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer.

    ``resume_step``: when a run resumes from a checkpoint, records of later steps (written
    before the crash, after the checkpoint) are dropped first, so the file reads as one run.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line is skipped), optionally of one ``kind``."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if kind is None or rec.get("kind") == kind:
            records.append(rec)
    return records


class Progress:
    """Rate-limited progress lines on stderr: ``[train] step 40/300 loss 1.234 lr 2.0e-04 ...``."""

    def __init__(self, total_steps: int, interval_s: float | None = None) -> None:
        self.total = total_steps
        self.interval_s = float(os.environ.get("TEMPO_PROGRESS_INTERVAL_S", "5")) if interval_s is None else interval_s
        self._last = 0.0

    def update(self, rec: dict[str, Any], *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            print(
                f"[train] step {rec['step']}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                f"grad_norm {rec['grad_norm']:.3f} ({rec['samples_per_s']:.1f} samples/s, "
                f"{rec['tokens_per_s']:.0f} tokens/s, {rec['elapsed_s']:.0f}s)",
                file=sys.stderr,
                flush=True,
            )


def plot_loss(records: list[dict[str, Any]], path: str | os.PathLike) -> str:
    """Write the loss curve (train loss per step; eval loss points if any) as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return str(path)
