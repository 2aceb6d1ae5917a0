"""``tempo demo-train`` (``make demo-train``): prove that the whole path learns, on CPU, in minutes.

The learnable task (``tempo_ops.synthetic.write_learnable_corpus``): every video is filled
with one of four colours; its question asks which, with options A-D. Videos are split into
train and validation sets *by video*. Steps, each the real command a user would run:

1. ``tempo make-tiny-models``  (reused when present);
2. the corpus (``train.jsonl``, ``val.jsonl`` and their union ``manifest.jsonl``);
3. ``tempo compress`` of every video with the tiny SVLM → one Zarr cache;
4. ``tempo shards`` for each split (budget 16, ``ata``) → ``shards/train``, ``shards/val``;
5. ``tempo eval`` of the untrained checkpoint on the validation shards (greedy answers, parsed, scored);
6. ``tempo train`` on the train shards only (projector + LLM; teacher-forced eval on val);
7. ``tempo eval`` of the trained checkpoint on the validation shards.

The tiny models are random, so the SVLM's memory tokens carry the colour only as whatever
its random layers keep; the projector and the tiny LLM learn to read it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BUDGET = 16
POLICY = "ata"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out/train", help="output folder (default: demo_out/train)")
    parser.add_argument("--models", default=None, help="tiny models folder (default: OUT/models, built when missing)")
    parser.add_argument("--train-videos", type=int, default=32, help="training videos (default %(default)s)")
    parser.add_argument("--val-videos", type=int, default=16, help="validation videos (default %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="corpus and training seed")


def _call(argv: list[str]) -> int:
    from pipelines.cli import main

    print("$ tempo " + " ".join(argv), flush=True)
    return main(argv)


def validation_accuracy(llm_path: str, shards: str, out: Path) -> dict[str, Any]:
    """``tempo eval --shards`` of the checkpoint at ``llm_path``; accuracy of its one budget × policy.

    Returns ``{"accuracy", "correct", "total", "no_answer", "video_ids", "eval_dir"}``.
    """
    rc = _call(["eval", "--shards", shards, "--llm", llm_path, "--out", str(out), "--force"])
    if rc != 0:
        raise RuntimeError(f"eval failed with status {rc}")
    cell = json.loads((out / "summary.json").read_text(encoding="utf-8"))["results"]["accuracy"][str(BUDGET)][POLICY]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return {
        "accuracy": cell["accuracy"],
        "correct": cell["correct"],
        "total": cell["n"],
        "no_answer": cell["no_answer"],
        "video_ids": sorted(r["video_id"] for r in rows),
        "eval_dir": str(out),
    }


def run_learnable_task(
    out: str | os.PathLike,
    *,
    models: str | os.PathLike | None = None,
    n_train: int = 32,
    n_val: int = 16,
    steps: int = 100,
    seed: int = 0,
    eval_before: bool = True,
) -> dict[str, Any]:
    """Run steps 1-7 (module docstring) under ``out``; returns (and writes ``out/demo_train.json``) the results.

    ``eval_before`` False skips step 5 (``val_accuracy_before`` is then None; the run's
    teacher-forced eval before training is in ``run_eval_before``).
    """
    import torch

    threads = torch.get_num_threads()
    # One torch thread throughout: models this small are overhead-bound, extra threads only contend.
    torch.set_num_threads(1)
    try:
        return _run_learnable_task(Path(out), models, n_train, n_val, steps, seed, eval_before)
    finally:
        torch.set_num_threads(threads)


def _run_learnable_task(
    out: Path, models: Any, n_train: int, n_val: int, steps: int, seed: int, eval_before: bool
) -> dict[str, Any]:
    from tempo_ops.synthetic import write_learnable_corpus

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = Path(models) if models is not None else out / "models"
    if not (models / "tempo" / "config.json").exists():
        if _call(["make-tiny-models", str(models)]) != 0:
            raise RuntimeError("make-tiny-models failed")
    corpus = write_learnable_corpus(out / "corpus", n_train=n_train, n_val=n_val, seed=seed)
    cache = out / "cache.zarr"
    rc = _call(["compress", "--manifest", corpus["manifest"], "--cache", str(cache), "--svlm", str(models / "svlm"),
                "--compressor", str(models / "tempo")])
    if rc != 0:
        raise RuntimeError(f"compress failed with status {rc}")
    sets = {}
    for split in ("train", "val"):
        rc = _call(["shards", "--cache", str(cache), "--manifest", corpus[split], "--budgets", str(BUDGET),
                    "--policies", POLICY, "--out", str(out / "shards" / split), "--shard-size-mb", "0.05"])
        if rc != 0:
            raise RuntimeError(f"shards ({split}) failed with status {rc}")
        sets[split] = str(out / "shards" / split / f"{BUDGET}-{POLICY}" / "index.json")

    before = validation_accuracy(str(models / "tempo"), sets["val"], out / "eval_before") if eval_before else None
    run = out / "run"
    rc = _call(["train", "--shards", sets["train"], "--eval-shards", sets["val"], "--init", str(models / "tempo"),
                "--out", str(run), "--train", "projector+llm", "--steps", str(steps), "--batch", "8", "--lr", "3e-3",
                "--warmup", "10", "--shuffle", "16", "--seed", str(seed), "--save-every", str(max(1, steps // 2)),
                "--eval-every", str(max(1, steps // 4)), "--threads", "1"])
    if rc != 0:
        raise RuntimeError(f"train failed with status {rc}")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    after = validation_accuracy(summary["final_checkpoint"], sets["val"], out / "eval_after")
    result = {
        "val_accuracy_before": before["accuracy"] if before else None,
        "val_accuracy_after": after["accuracy"],
        "val_no_answer_before": before["no_answer"] if before else None,
        "val_no_answer_after": after["no_answer"],
        "val_samples": after["total"],
        "val_video_ids": after["video_ids"],
        "eval_before": before["eval_dir"] if before else None,
        "run_eval_before": summary["eval_before"],
        "run_eval_after": summary["eval_after"],
        "eval_after": after["eval_dir"],
        "train_samples": n_train,
        "steps": steps,
        "checkpoint": summary["final_checkpoint"],
        "metrics": summary["metrics"],
        "plot": summary["plot"],
        "run_summary": str(run / "summary.json"),
        "train_wall_s": summary["wall_s"],
    }
    (out / "demo_train.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return result


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    started = time.time()
    res = run_learnable_task(
        args.out, models=args.models, n_train=args.train_videos, n_val=args.val_videos, steps=args.steps, seed=args.seed
    )
    print(f"\nLearnable task: {res['train_samples']} training videos, {res['val_samples']} validation videos (other videos).")
    print(f"  validation accuracy before training: {res['val_accuracy_before']:.1%} "
          f"({res['val_no_answer_before']} without a parsable answer; chance for a guesser is 25%)")
    print(f"  validation accuracy after {res['steps']} steps:  {res['val_accuracy_after']:.1%}")
    print(f"  loss curve: {os.path.relpath(res['plot'])}")
    print(f"  eval:       {os.path.relpath(res['eval_after'])}/summary.json (accuracy plots beside it)")
    print(f"  metrics:    {os.path.relpath(res['metrics'])}")
    print(f"  checkpoint: {os.path.relpath(res['checkpoint'])}")
    print(f"Finished in {time.time() - started:.0f}s.", file=sys.stderr)
    return 0
