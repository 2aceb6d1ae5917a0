"""``tempo demo`` (``make demo``): the whole pipeline on generated videos and tiny local models.

Steps, each the real command a user would run:
1. ``tempo make-tiny-models``  — a tiny Qwen3-VL + tokenizer and a tiny Tempo-6B-layout checkpoint;
2. a sample corpus           — a few generated videos of different lengths and sizes, several
                               queries each, and one deliberately corrupt file;
3. ``tempo probe``           — per-video sampling/segmentation summary;
4. ``tempo compress``        — the Beam job on the local runner → Zarr cache (+ dead letters, summary);
5. ``tempo inspect``         — what the cache holds;
6. ``tempo shards``          — WebDataset shards at two budgets with ``ata`` and ``uniform``;
7. ``tempo eval``            — the LLM stage answers every annotated query at the same two budgets
                               and two policies: accuracy table, predictions, summary and plots
                               (random tiny weights: the accuracy means nothing).
Nothing is downloaded. Re-running reuses the models and corpus and resumes the cache.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--budgets", default="256,1024", help="shard budgets (tokens per video)")


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _call(argv: list[str]) -> int:
    from pipelines.cli import main

    print("$ tempo " + " ".join(argv), flush=True)
    return main(argv)


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    from tempo_ops.synthetic import write_sample_corpus

    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    cache = out / "cache.zarr"
    shards = out / "shards"

    _step("1/7 tiny models (built locally, seeded, no download)")
    if not (models / "svlm" / "config.json").exists():
        if _call(["make-tiny-models", str(models)]) != 0:
            return 1
    else:
        print(f"reusing {models}")

    _step("2/7 sample corpus (generated videos + one corrupt file)")
    manifest = write_sample_corpus(out / "corpus")
    print(f"manifest: {manifest}")

    _step("3/7 probe, sample and segment")
    _call(["probe", "--manifest", str(manifest)])

    _step("4/7 compress (Beam, local FnApiRunner)")
    rc = _call(
        [
            "compress",
            "--manifest",
            str(manifest),
            "--cache",
            str(cache),
            "--svlm",
            str(models / "svlm"),
            "--compressor",
            str(models / "tempo"),
        ]
    )
    if rc not in (0, 1):  # 1 = some items failed (the corrupt file): expected here
        return rc

    _step("5/7 inspect the cache")
    if _call(["inspect", str(cache)]) != 0:
        return 1

    _step("6/7 training shards (ata and uniform at two budgets)")
    rc = _call(
        [
            "shards",
            "--cache",
            str(cache),
            "--manifest",
            str(manifest),
            "--budgets",
            args.budgets,
            "--policies",
            "ata,uniform",
            "--out",
            str(shards),
        ]
    )
    if rc != 0:
        return rc

    _step("7/7 evaluate the LLM stage (ata and uniform at the same two budgets)")
    evaluation = out / "eval"
    rc = _call(
        [
            "eval",
            "--cache",
            str(cache),
            "--manifest",
            str(manifest),
            "--llm",
            str(models / "tempo"),
            "--budgets",
            args.budgets,
            "--policies",
            "ata,uniform",
            "--out",
            str(evaluation),
        ]
    )
    if rc != 0:
        return rc
    print(
        "note: the tiny models have random weights, so these accuracies mean nothing; they show the "
        "pipeline end to end. Point --llm at a real Tempo checkpoint for meaningful numbers."
    )

    print(f"\nDemo finished in {time.time() - started:.0f}s. Outputs:")
    for label, path in [
        ("cache", cache),
        ("dead letters", Path(str(cache) + ".deadletter.jsonl")),
        ("compress summary", Path(str(cache) + ".summary.json")),
        ("shards", shards),
        ("eval predictions", evaluation / "predictions.jsonl"),
        ("eval summary", evaluation / "summary.json"),
        ("accuracy plot", evaluation / "accuracy_vs_budget.png"),
        ("tokens/frame plot", evaluation / "tokens_per_frame_vs_budget.png"),
        ("models", models),
    ]:
        print(f"  {label:<17} {os.path.relpath(path)}")
    return 0

