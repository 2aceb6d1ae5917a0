"""The training loop of the LLM stage: teacher-forced causal-LM loss on the answer.

One step (optimizer update) per rank: take ``batch × grad_accum`` samples from the rank's
stream, build each sample's input with ``TempoLLM.build_inputs`` (the one input-construction
function, shared with evaluation; labels only on the assistant turn), pack them into
micro-batches by padded token count, and accumulate

    loss = Σ_ranks Σ_answer-positions CE(logits, next token) / N_step

where ``N_step`` is the step's number of label tokens over all ranks (all-reduced before the
backward passes). Each rank backpropagates ``W · Σ_its-positions CE / N_step`` and DDP
averages gradients over the W ranks, so the update equals the single-process update on the
union of the ranks' samples, however the step is cut into ranks and micro-batches (up to
float summation order). Then: gradient clipping (total norm), AdamW, the warmup + cosine
schedule. Logits are computed only at label positions (the LM head never sees the rest).

Precision: float32 master weights; bf16 autocast on CUDA, float32 on CPU. Distributed:
``torchrun`` sets ``RANK`` / ``WORLD_SIZE``; the loop then initialises torch.distributed
(gloo on CPU, nccl on CUDA) and wraps the trainable model in DDP. Rank 0 alone writes
checkpoints, metrics, the plot and the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tempo_ops.errors import ConfigError, ShardError
from tempo_ops.llm.evaluate import resolve_sample_context
from tempo_ops.llm.model import IGNORE_INDEX
from tempo_ops.train import checkpoint as ckpt
from tempo_ops.train.data import (
    SampleStream,
    StreamPosition,
    pack_micro_batches,
    pad_batch,
    resolve_shards,
)
from tempo_ops.train.metrics import MetricsLog, Progress, plot_loss, read_metrics
from tempo_ops.train.schedule import lr_multiplier

TRAIN_MODES = ("projector", "projector+llm")
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
SUMMARY_NAME = "summary.json"
# Settings that must not change when a run resumes (they decide the loss curve).
_RESUME_FIELDS = (
    "shards", "init", "train", "steps", "epochs", "batch", "grad_accum", "lr", "warmup", "min_lr_ratio",
    "weight_decay", "clip", "seed", "shuffle", "prompt_template", "num_workers",
)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (``tempo train`` flags; see README "Training").

    ``batch`` is samples per rank per micro-step; a step takes ``batch × grad_accum`` samples
    per rank. ``max_batch_tokens`` caps the padded tokens (longest × count) of one forward pass
    (None: one pass per ``batch``). ``warmup`` is in steps. ``save_every`` 0 saves only at the end.
    """

    shards: str
    init: str
    out: str
    train: str = "projector"
    steps: int | None = None
    epochs: float | None = None
    batch: int = 8
    grad_accum: int = 1
    max_batch_tokens: int | None = None
    lr: float = 1e-3
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    shuffle: int = 0
    num_workers: int = 0
    eval_shards: str | None = None
    eval_every: int = 0
    save_every: int = 0
    save_compressor: bool = False
    grad_checkpointing: bool = False
    prompt_template: str | None = None
    device: str | None = None
    threads: int | None = None

    def check(self) -> None:
        """Raise ``ConfigError`` naming the first bad setting."""
        if self.train not in TRAIN_MODES:
            raise ConfigError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}", item="--train")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of --steps and --epochs", item="--steps")
        for name in ("batch", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}", item=name)
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}", item="--steps")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"--epochs must be > 0, got {self.epochs}", item="--epochs")
        if self.lr <= 0 or self.clip < 0 or self.warmup < 0 or self.save_every < 0 or self.eval_every < 0:
            raise ConfigError("--lr must be > 0 and --clip, --warmup, --save-every, --eval-every >= 0", item="schedule")


# --------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    dev = torch.device(f"cuda:{local}" if cuda else (device or "cpu"))
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local), dev


def _all_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _gather(obj: Any, dist: Dist) -> list[Any]:
    if dist.world == 1:
        return [obj]
    out: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------- model pieces
class AnswerLoss(nn.Module):
    """Sum of next-token cross-entropy over label positions of a padded batch (the DDP-wrapped module).

    ``forward(inputs (B, L, D), attention_mask (B, L), labels (B, L))`` → ``(loss_sum, correct)``
    where ``correct (B, L-1) bool`` marks label positions whose argmax equals the label.
    Only label positions go through the LM head.
    """

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        lm = self.llm.lm
        hidden = lm.model(inputs_embeds=inputs, attention_mask=attention_mask, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        sel = target != IGNORE_INDEX
        logits = lm.lm_head(hidden[:, :-1][sel]).float()
        loss = F.cross_entropy(logits, target[sel], reduction="sum")
        correct = torch.zeros_like(sel)
        correct[sel] = logits.argmax(dim=-1) == target[sel]
        return loss, correct


def build_sample_inputs(llm: Any, sample: dict[str, Any], template: str | None) -> Any:
    """``TempoLLM.build_inputs`` of one decoded shard sample, with its answer as the label."""
    meta = sample["meta"]
    answer = meta.get("answer")
    if answer is None:
        raise ShardError("training sample has no answer", item=str(sample.get("__key__")))
    return llm.build_inputs(
        sample["tokens"], sample["alloc"], sample["timestamp_texts"], resolve_sample_context(meta, template)[1], answer=str(answer)
    )


def _answer_span(x: Any, im_end_id: int) -> tuple[int, int]:
    """Positions ``[start, end)`` of the answer tokens and its ``<|im_end|>`` in ``x.input_ids``.

    These are exactly the tokens greedy generation must produce (it stops at ``<|im_end|>``),
    so all of them predicted right under teacher forcing ⇔ the greedy answer is the label.
    """
    start = int(x.prompt_length)
    ids = x.input_ids[start:].tolist()
    end = start + (ids.index(im_end_id) + 1 if im_end_id in ids else len(ids))
    return start, end


def _set_trainable(llm: nn.Module, mode: str) -> list[nn.Parameter]:
    llm.requires_grad_(False)
    llm.projector.requires_grad_(True)
    if mode == "projector+llm":
        llm.lm.requires_grad_(True)
    seen: set[int] = set()
    params = []
    for p in llm.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


# --------------------------------------------------------------------------- the run
@dataclass
class _Ctx:
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    llm: Any
    module: nn.Module  # AnswerLoss, DDP-wrapped when distributed
    autocast: Any


def _autocast(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _forward_micro_batches(ctx: _Ctx, built: list[Any], groups: list[list[int]], *, scale: float | None):
    """Run the micro-batches of ``groups`` (each cut further by ``max_batch_tokens``).

    Training (``scale`` given): backpropagates ``scale × loss_sum`` per micro-batch through the
    DDP module, synchronising gradients only on the last one. Evaluation (``scale`` None):
    runs the bare module (no DDP collectives: ranks may run different numbers of batches).
    Returns ``(loss_sum, {"exact": answers all right, "correct_tokens": label tokens right})``.
    """
    batches = []
    for g in groups:
        for mb in pack_micro_batches([built[i].length for i in g], ctx.cfg.max_batch_tokens):
            batches.append([g[j] for j in mb])
    module = ctx.module if scale is not None else getattr(ctx.module, "module", ctx.module)
    no_sync = getattr(module, "no_sync", None)
    loss_total, exact, correct_tokens = 0.0, 0, 0
    for n, mb in enumerate(batches):
        xs = [built[i] for i in mb]
        inputs, mask, labels = pad_batch([x.inputs_embeds for x in xs], [x.labels for x in xs])
        defer_sync = scale is not None and no_sync is not None and n < len(batches) - 1
        with ctx.autocast(), (no_sync() if defer_sync else contextlib.nullcontext()):
            loss_sum, correct = module(inputs, mask, labels)
            if scale is not None:
                (loss_sum * scale).backward()
        loss_total += float(loss_sum.detach())
        correct_tokens += int(correct.sum())
        for b, x in enumerate(xs):
            start, end = _answer_span(x, ctx.llm.im_end_id)
            # correct[:, t] judges the prediction made at position t (of the token at t + 1)
            exact += int(bool(correct[b, start - 1 : end - 1].all()))
    return loss_total, {"exact": exact, "correct_tokens": correct_tokens}


def evaluate(ctx: _Ctx, eval_urls: list[str]) -> dict[str, float]:
    """Teacher-forced loss, token accuracy and answer accuracy on the eval shards (split over ranks)."""
    from tempo_ops.shards import shard_dataset

    was_training = ctx.llm.training
    ctx.llm.eval()
    loss = labels = exact = correct = samples = 0.0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal loss, labels, exact, correct, samples
        if not pending:
            return
        built = [build_sample_inputs(ctx.llm, s, ctx.cfg.prompt_template) for s in pending]
        ls, st = _forward_micro_batches(ctx, built, [list(range(len(built)))], scale=None)
        loss += ls
        labels += sum(int((x.labels[1:] != IGNORE_INDEX).sum()) for x in built)
        exact += st["exact"]
        correct += st["correct_tokens"]
        samples += len(built)
        pending.clear()

    with torch.no_grad():
        for sample in shard_dataset(eval_urls):
            pending.append(sample)
            if len(pending) >= ctx.cfg.batch:
                flush()
        flush()
    loss, labels, exact, correct, samples = _all_sum([loss, labels, exact, correct, samples], ctx.dist, ctx.device)
    ctx.llm.train(was_training)
    if samples == 0:
        raise ShardError("the eval shards hold no samples", item=",".join(eval_urls[:1]))
    return {
        "eval_loss": loss / max(labels, 1.0),
        "eval_token_accuracy": correct / max(labels, 1.0),
        "eval_answer_accuracy": exact / samples,
        "eval_samples": int(samples),
    }


def _total_steps(cfg: TrainConfig, source: Any, dist: Dist) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    per_rank = [source.samples_for_rank(r, dist.world) for r in range(dist.world)]
    if any(n is None for n in per_rank):
        raise ConfigError("--epochs needs shard sets given by index.json (sample counts); use --steps", item="--epochs")
    steps = int(min(per_rank) * cfg.epochs) // (cfg.batch * cfg.grad_accum)
    if steps < 1:
        raise ConfigError(
            f"{cfg.epochs} epochs of {min(per_rank)} samples per rank give no step of {cfg.batch * cfg.grad_accum} samples",
            item="--epochs",
        )
    return steps


def train(cfg: TrainConfig, *, stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the run summary (rank 0 writes it to ``RUN/summary.json``).

    Resuming: when ``cfg.out`` holds a complete checkpoint, the run continues from the latest
    one (model, optimizer, schedule, every rank's data position and RNG state); the settings
    that shape the loss curve must be unchanged (``ConfigError`` names the differing ones).

    ``stop_requested`` (e.g. set by SIGTERM on a preemptible machine) is polled at the end of
    every step; when it is true on any rank, all ranks checkpoint that step and stop, and the
    summary has ``status: "interrupted"`` (re-running the command resumes from there).
    """
    from tempo_ops.llm import TempoLLM

    cfg.check()
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dist, device = init_distributed(cfg.device)
    run = Path(cfg.out)
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        ckpt.cleanup_partial_checkpoints(run)
    _barrier(dist)
    source = resolve_shards(cfg.shards)
    if dist.world > len(source.urls):
        raise ConfigError(f"{dist.world} ranks but only {len(source.urls)} shards: every rank needs a shard", item="--shards")
    total_steps = _total_steps(cfg, source, dist)
    eval_urls = list(resolve_shards(cfg.eval_shards).urls) if cfg.eval_shards else []

    resume = ckpt.latest_checkpoint(run)
    state: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    if resume is not None:
        state, tensors = ckpt.load_trainer_state(resume)
        saved = state.get("config", {})
        now = dataclasses.asdict(cfg)
        diff = [k for k in _RESUME_FIELDS if saved.get(k) != now.get(k)]
        if state.get("world_size") != dist.world:
            diff.append("world size")
        if diff:
            raise ConfigError(
                f"cannot resume {resume.name}: settings differ from the interrupted run ({', '.join(diff)}); "
                "use the same command or a new --out",
                item=str(run),
            )
    start_step = int(state.get("step", 0))
    if start_step >= total_steps and (run / SUMMARY_NAME).is_file():
        _barrier(dist)
        if dist.main:
            print(f"[train] {run} is complete ({total_steps} steps); nothing to do", file=sys.stderr, flush=True)
        return dict(json.loads((run / SUMMARY_NAME).read_text(encoding="utf-8")), already_complete=True)
    torch.manual_seed(cfg.seed)
    llm = TempoLLM.from_pretrained(str(resume or cfg.init), dtype=torch.float32, device=device)
    params = _set_trainable(llm, cfg.train)
    llm.train()
    if cfg.grad_checkpointing:
        llm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module: nn.Module = AnswerLoss(llm)
    if dist.world > 1:
        # broadcast_buffers off: the only buffers are constant rope tables, and ranks may run
        # different numbers of micro-batches per step (token-count packing).
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps=total_steps, warmup_steps=cfg.warmup, min_ratio=cfg.min_lr_ratio)
    )
    position = StreamPosition()
    if resume is not None:
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        position = StreamPosition(**state["positions"][dist.rank])
        torch.set_rng_state(tensors["rng"][dist.rank])
        if device.type == "cuda" and tensors.get("cuda_rng"):
            torch.cuda.set_rng_state(tensors["cuda_rng"][dist.rank], device)
    stream = SampleStream(
        source.urls, shuffle=cfg.shuffle, seed=cfg.seed, num_workers=cfg.num_workers, position=position,
        prefetch=2 * cfg.batch * cfg.grad_accum,
    )
    ctx = _Ctx(cfg, dist, device, llm, module, _autocast(device))

    log = MetricsLog(run / METRICS_NAME, resume_step=start_step if resume is not None else None) if dist.main else None
    progress = Progress(total_steps)

    def save(step: int) -> None:
        positions = _gather(stream.position.to_dict(), dist)
        rngs = _gather(torch.get_rng_state(), dist)
        cuda_rngs = _gather(torch.cuda.get_rng_state(device) if device.type == "cuda" else None, dist)
        if dist.main:
            ckpt.save_checkpoint(
                run,
                step,
                write_model=lambda d: llm.save_pretrained(d, compressor_from=cfg.init if cfg.save_compressor else None),
                state={"config": dataclasses.asdict(cfg), "world_size": dist.world, "positions": positions, "total_steps": total_steps},
                tensors={
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs,
                    "cuda_rng": cuda_rngs if device.type == "cuda" else [],
                },
            )
        _barrier(dist)

    def run_eval(step: int) -> dict[str, float]:
        res = evaluate(ctx, eval_urls)
        if log is not None:
            log.write({"kind": "eval", "step": step, **res})
        if dist.main:
            print(
                f"[train] eval at step {step}: loss {res['eval_loss']:.4f}, answer accuracy "
                f"{res['eval_answer_accuracy']:.3f} ({res['eval_samples']} samples)",
                file=sys.stderr,
                flush=True,
            )
        return res

    if dist.main:
        where = f"resuming from {resume.name}" if resume is not None else f"from {cfg.init}"
        print(
            f"[train] {total_steps} steps × {cfg.batch * cfg.grad_accum} samples × {dist.world} rank(s), "
            f"training {cfg.train}, {where}, device {device}",
            file=sys.stderr,
            flush=True,
        )
    stopped_at: int | None = None
    try:
        first_eval = run_eval(start_step) if eval_urls and resume is None else None
        last_loss = None
        totals = {"samples": 0, "tokens": 0, "seconds": 0.0}
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            samples = stream.take(cfg.batch * cfg.grad_accum)
            built = [build_sample_inputs(llm, s, cfg.prompt_template) for s in samples]
            local = [
                sum(int((x.labels[1:] != IGNORE_INDEX).sum()) for x in built),
                sum(x.length for x in built),
                len(built),
            ]
            n_labels, n_tokens, n_samples = _all_sum(local, dist, device)
            if n_labels <= 0:
                raise ShardError("a training step has no answer tokens", item=str(samples[0].get("__key__")))
            groups = [list(range(g * cfg.batch, (g + 1) * cfg.batch)) for g in range(cfg.grad_accum)]
            loss_sum, _ = _forward_micro_batches(ctx, built, groups, scale=dist.world / n_labels)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
            lr = float(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # One all-reduce: the loss and whether any rank was asked to stop (all stop at the same step).
            loss_all, stop_votes = _all_sum([loss_sum, float(bool(stop_requested and stop_requested()))], dist, device)
            dt = time.perf_counter() - t0
            done = step + 1
            last_loss = loss_all / n_labels
            totals["samples"] += int(n_samples)
            totals["tokens"] += int(n_tokens)
            totals["seconds"] += dt
            rec = {
                "kind": "train",
                "step": done,
                "epoch": stream.position.epoch,
                "loss": last_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "samples": int(n_samples),
                "tokens": int(n_tokens),
                "samples_per_s": n_samples / dt,
                "tokens_per_s": n_tokens / dt,
                "elapsed_s": time.time() - started,
            }
            if log is not None:
                log.write(rec)
                progress.update(rec, force=done == total_steps)
            if eval_urls and cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
                run_eval(done)
            if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                save(done)
            if stop_votes > 0 and done != total_steps:
                if not (cfg.save_every and done % cfg.save_every == 0):
                    save(done)
                stopped_at = done
                break
    finally:
        stream.close()
    def run_summary(status: str, **fields: Any) -> dict[str, Any]:
        return {
            "kind": "tempo-train-run",
            "status": status,
            "run": str(run),
            "steps": total_steps,
            "resumed_from_step": start_step if resume is not None else None,
            "final_loss": last_loss,
            "eval_before": first_eval,
            "metrics": str(run / METRICS_NAME),
            **fields,
            "wall_s": time.time() - started,
            "config": dataclasses.asdict(cfg),
        }

    def write_summary(summary: dict[str, Any]) -> None:
        with open(run / SUMMARY_NAME, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    if stopped_at is not None:  # every rank returns it: each one exits as interrupted
        summary = run_summary("interrupted", steps_done=stopped_at, checkpoint=str(run / ckpt.checkpoint_name(stopped_at)))
        if dist.main:
            log.close()
            write_summary(summary)
        _barrier(dist)
        return summary
    final_eval = run_eval(total_steps) if eval_urls else None
    save(total_steps)
    summary = {}
    if dist.main:
        log.close()
        summary = run_summary(
            "complete",
            world_size=dist.world,
            device=str(device),
            precision="bf16 autocast" if device.type == "cuda" else "float32",
            train=cfg.train,
            trainable_parameters=sum(p.numel() for p in params),
            samples_per_step=cfg.batch * cfg.grad_accum * dist.world,
            samples_this_session=totals["samples"],
            tokens_this_session=totals["tokens"],
            samples_per_s=totals["samples"] / totals["seconds"] if totals["seconds"] else None,
            tokens_per_s=totals["tokens"] / totals["seconds"] if totals["seconds"] else None,
            eval_after=final_eval,
            final_checkpoint=str(run / ckpt.checkpoint_name(total_steps)),
            checkpoints=[str(p) for _s, p in ckpt.list_checkpoints(run)],
            plot=plot_loss(read_metrics(run / METRICS_NAME), run / PLOT_NAME),
        )
        write_summary(summary)
    _barrier(dist)
    return summary
