"""``tempo train``: train the LLM stage (projector, optionally the LLM) on cached-token shards.

Single process: ``tempo train --shards S/index.json --init CKPT --out RUN --steps N``.
Distributed: the same command under ``torchrun --nproc_per_node N [--nnodes ...] -m
pipelines.cli train ...`` (DDP; gloo on CPU, nccl on CUDA). Running the same command again
resumes from the run's latest complete checkpoint. The loop is ``tempo_ops.train.loop``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import posixpath
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from tempo_ops.train.loop import TRAIN_MODES, TrainConfig, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard sets: comma-separated index.json / set directory / .tar URLs")
    parser.add_argument("--init", required=True, help="Tempo checkpoint to start from (directory or fsspec URL)")
    parser.add_argument("--out", required=True, help="run directory (local): checkpoints, metrics.jsonl, loss.png, summary.json")
    parser.add_argument("--train", choices=TRAIN_MODES, default="projector", help="what is trained (default %(default)s)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the (smallest rank's) shards")
    parser.add_argument("--batch", type=int, default=8, help="samples per rank per micro-step (default %(default)s)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default %(default)s)")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=None,
        help="cap on padded tokens (longest x count) per forward pass; a step's samples are packed by length",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default %(default)s)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 = off; default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and torch RNG")
    parser.add_argument("--shuffle", type=int, default=0, help="sample shuffle buffer (0 = shard order; shards shuffled too)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader decoding processes per rank")
    parser.add_argument("--eval-shards", default=None, help="shard sets for teacher-forced eval (before, every --eval-every, after)")
    parser.add_argument("--eval-every", type=int, default=0, help="eval every N steps (0 = before and after only)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    parser.add_argument(
        "--save-compressor", action="store_true",
        help="copy the compressor tensors of --init into every checkpoint (a complete Tempo checkpoint)",
    )
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM activations in backward (less memory)")
    parser.add_argument("--prompt-template", default=None, help="query template of tempo_ops.query_text (default plain)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: torch's choice)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``tempo train`` arguments (flag names are its field names)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


@contextlib.contextmanager
def sigterm_stops_at_step_end() -> Iterator[Callable[[], bool]]:
    """Within the block, a first SIGTERM (a preemption notice) only asks the loop to stop after the
    current step, with a checkpoint; a second one interrupts at once. Yields the poll function."""
    from pipelines.job_support import JobInterrupted

    asked: list[int] = []

    def handler(signum, _frame):
        if asked:
            raise JobInterrupted(signum)
        asked.append(signum)
        print("[train] SIGTERM: stopping after this step with a checkpoint (send it again to stop now)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    import torch.distributed as dist

    from pipelines.job_support import JobInterrupted, check_output_location

    # Before any work: a run directory that is, holds or lies inside an input would overwrite it.
    inputs = [("--init", args.init)]
    for option, value in (("--shards", args.shards), ("--eval-shards", args.eval_shards)):
        for url in (u.strip() for u in (value or "").split(",") if u.strip()):  # an index.json or .tar: its set's directory
            inputs.append((option, posixpath.dirname(url.rstrip("/")) if url.endswith((".json", ".tar")) else url))
    for option, url in inputs:
        check_output_location(args.out, {option: url}, what="--out")
    try:
        with sigterm_stops_at_step_end() as stop:
            summary = train(config_from_args(args), stop_requested=stop)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("status") == "interrupted":
        if os.environ.get("RANK", "0") == "0":
            print(f"[train] stopped after step {summary['steps_done']}/{summary['steps']}: checkpoint {summary['checkpoint']}", file=sys.stderr)
        raise JobInterrupted(signal.SIGTERM)  # the CLI's one line and exit status 143
    if summary:
        before, after = summary.get("eval_before"), summary.get("eval_after")
        print(f"[train] done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}", file=sys.stderr)
        if after:
            was = f"{before['eval_answer_accuracy']:.3f} -> " if before else ""
            print(f"[train] eval answer accuracy (teacher-forced): {was}{after['eval_answer_accuracy']:.3f}", file=sys.stderr)
        print(f"[train] checkpoint {summary['final_checkpoint']}", file=sys.stderr)
        print(f"[train] metrics {summary['metrics']}, plot {summary['plot']}, summary {summary['run']}/summary.json", file=sys.stderr)
    return 0
