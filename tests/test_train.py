"""``tempo train``: schedule, batching, checkpoints, metrics, resume after SIGKILL, DDP equivalence."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import write_random_shard_set

from tempo_ops.errors import CheckpointFormatError, ConfigError, ShardError
from tempo_ops.train import checkpoint as ckpt
from tempo_ops.train.data import SampleStream, StreamPosition, pack_micro_batches, pad_batch, resolve_shards
from tempo_ops.train.loop import TrainConfig, train
from tempo_ops.train.metrics import MetricsLog, plot_loss, read_metrics
from tempo_ops.train.schedule import lr_multiplier

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 samples, 2 per shard (4 shards)."""
    return write_random_shard_set(tmp_path_factory.mktemp("shards"), n_samples=8, per_shard=2)


def _cfg(shards: str, init: str, out: Path, **kw) -> TrainConfig:
    base = dict(shards=shards, init=init, out=str(out), train="projector+llm", steps=3, batch=4, lr=1e-2, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _cli(*args: str, torchrun: int = 0) -> list[str]:
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m", "pipelines.cli", *args]
    return [sys.executable, "-m", "pipelines.cli", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TEMPO_PROGRESS_INTERVAL_S="0")


# --------------------------------------------------------------------------- pure pieces
def test_lr_multiplier_warmup_then_cosine():
    total, warm = 10, 2
    got = [lr_multiplier(s, total_steps=total, warmup_steps=warm) for s in range(total)]
    assert got[:2] == [0.5, 1.0]
    assert got[2] == pytest.approx(1.0)
    for s in range(2, total):
        assert got[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 2) / 8)))
    assert all(a > b for a, b in zip(got[2:], got[3:])) and got[-1] > 0
    assert lr_multiplier(10, total_steps=10, warmup_steps=0, min_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        lr_multiplier(0, total_steps=0, warmup_steps=0)


def test_pack_micro_batches_by_padded_tokens():
    lengths = [10, 30, 20, 30, 5]
    # longest first (ties by position); a batch closes when longest × count would pass 60
    assert pack_micro_batches(lengths, 60) == [[1, 3], [2, 0, 4]]
    assert pack_micro_batches(lengths, 25) == [[1], [3], [2], [0, 4]]  # a too-long sample stands alone
    assert pack_micro_batches(lengths, None) == [[1, 3, 2, 0, 4]]
    assert pack_micro_batches([], 10) == []
    with pytest.raises(ConfigError):
        pack_micro_batches(lengths, 0)


def test_pad_batch_masks_and_ignores_padding():
    e = [torch.randn(3, 4), torch.randn(5, 4)]
    y = [torch.tensor([-100, 7, 8]), torch.tensor([-100, -100, 1, 2, 3])]
    inputs, mask, labels = pad_batch(e, y)
    assert inputs.shape == (2, 5, 4) and torch.equal(inputs[0, 3:], torch.zeros(2, 4)) and torch.equal(inputs[0, :3], e[0])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, 7, 8, -100, -100], [-100, -100, 1, 2, 3]]
    with pytest.raises(ConfigError):
        pad_batch(e, [y[0], y[0]])


def test_padded_batch_loss_equals_per_sample_loss(tiny_models, shards):
    """Right padding changes nothing: the batch's loss sum is the sum of batch-of-one losses."""
    from tempo_ops.llm import TempoLLM
    from tempo_ops.train.loop import AnswerLoss, build_sample_inputs

    llm = TempoLLM.from_pretrained(tiny_models["tempo"], dtype=torch.float32, device="cpu")
    samples = SampleStream(resolve_shards(shards).urls).take(4)
    samples[1] = dict(samples[1], tokens=samples[1]["tokens"][:6], alloc=samples[1]["alloc"].copy())
    samples[1]["alloc"][1] = 2  # a shorter sample, so the batch really pads
    built = [build_sample_inputs(llm, s, None) for s in samples]
    assert len({x.length for x in built}) == 2
    loss = AnswerLoss(llm)
    with torch.no_grad():
        together, _ = loss(*pad_batch([x.inputs_embeds for x in built], [x.labels for x in built]))
        alone = sum(float(loss(*pad_batch([x.inputs_embeds], [x.labels]))[0]) for x in built)
    assert float(together) == pytest.approx(alone, rel=1e-5)


def test_sample_stream_resumes_at_its_position(shards):
    urls = resolve_shards(shards).urls
    whole = SampleStream(urls)
    keys = [s["__key__"] for s in whole.take(13)]  # crosses an epoch boundary (8 samples per epoch)
    assert len(set(keys[:8])) == 8 and keys[8:] == keys[:5]  # no shuffle: every epoch in shard order
    first = SampleStream(urls)
    first.take(6)
    assert first.position == StreamPosition(0, 6)
    again = SampleStream(urls, position=first.position)
    assert [s["__key__"] for s in again.take(7)] == keys[6:13]
    assert again.position == StreamPosition(1, 5)


def test_resolve_shards_counts_and_rank_split(shards, tmp_path):
    src = resolve_shards(shards + "," + shards)
    assert len(src.urls) == 8 and src.samples_per_shard == (2,) * 8
    assert src.samples_for_rank(0, 3) == 6 and src.samples_for_rank(2, 3) == 4
    assert resolve_shards(src.urls[0]).samples_per_shard is None
    with pytest.raises(ShardError):
        resolve_shards(" , ")
    with pytest.raises(ShardError):
        resolve_shards(str(tmp_path / "missing" / "index.json"))


def test_checkpoints_are_atomic(tmp_path):
    run = tmp_path / "run"

    def model(d: Path) -> None:
        (d / "config.json").write_text("{}")

    p2 = ckpt.save_checkpoint(run, 2, write_model=model, state={"a": 1}, tensors={"x": torch.arange(3)})
    assert p2.name == "checkpoint-2" and ckpt.latest_checkpoint(run) == p2

    def crash(d: Path) -> None:
        (d / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(run, 4, write_model=crash, state={}, tensors={})
    assert ckpt.latest_checkpoint(run) == p2 and not list(run.glob(".checkpoint-*"))
    # a writer killed mid-way leaves a temp dir (and maybe a renamed dir without state): ignored, cleaned
    (run / ".checkpoint-6.tmp-dead").mkdir()
    (run / "checkpoint-8").mkdir()
    assert ckpt.latest_checkpoint(run) == p2
    assert [p.name for p in ckpt.cleanup_partial_checkpoints(run)] == [".checkpoint-6.tmp-dead"]
    state, tensors = ckpt.load_trainer_state(p2)
    assert state["a"] == 1 and state["step"] == 2 and torch.equal(tensors["x"], torch.arange(3))
    (p2 / ckpt.STATE_JSON).write_text(json.dumps({"trainer_state_version": 99}))
    with pytest.raises(CheckpointFormatError):
        ckpt.load_trainer_state(p2)
    with pytest.raises(ConfigError):
        ckpt.save_checkpoint("gs://bucket/run", 1, write_model=model, state={}, tensors={})


def test_metrics_log_drops_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for s in range(1, 6):
        log.write({"kind": "train", "step": s, "loss": 1.0 / s})
    log.close()
    with open(path, "a") as fh:
        fh.write('{"kind": "train", "st')  # torn line of a killed writer
    log = MetricsLog(path, resume_step=3)
    log.write({"kind": "eval", "step": 3, "eval_loss": 0.5})
    log.close()
    assert [(r["kind"], r["step"]) for r in read_metrics(path)] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    png = plot_loss(read_metrics(path), tmp_path / "loss.png")
    assert Path(png).read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- runs
def test_bad_settings_are_config_errors(tiny_models, shards, tmp_path):
    init = tiny_models["tempo"]
    with pytest.raises(ConfigError, match="exactly one"):
        train(_cfg(shards, init, tmp_path / "a", epochs=1.0))
    with pytest.raises(ConfigError, match="--train"):
        train(_cfg(shards, init, tmp_path / "b", train="everything"))
    with pytest.raises(ConfigError, match="--epochs"):
        train(_cfg(resolve_shards(shards).urls[0], init, tmp_path / "c", steps=None, epochs=1.0))
    with pytest.raises(ConfigError, match="no step"):
        train(_cfg(shards, init, tmp_path / "d", steps=None, epochs=0.25, batch=4))


@pytest.mark.parametrize("where", ["shard_set", "inside_shard_set", "encloses_init", "second_eval_set"])
def test_out_overlapping_an_input_is_refused_before_any_work(tiny_models, shards, tmp_path, capsys, where):
    from pipelines.cli import main as tempo

    init, set_dir = tiny_models["tempo"], Path(shards).parent
    other = write_random_shard_set(tmp_path / "other", n_samples=2, per_shard=2)
    out = {
        "shard_set": set_dir,
        "inside_shard_set": set_dir / "run",
        "encloses_init": Path(init).parent,
        "second_eval_set": Path(other).parent,
    }[where]
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    args = ["train", "--shards", shards, "--init", init, "--out", str(out), "--steps", "1", "--eval-shards", f"{shards},{other}"]
    assert tempo(args) == 2
    err = capsys.readouterr().err
    assert "output_overlaps_input" in err and str(out) in err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before  # nothing written there


def test_micro_batching_and_accumulation_do_not_change_the_update(tiny_models, shards, tmp_path):
    """One step of 8 samples == 2 accumulated micro-steps of 4 == micro-batches cut by tokens."""
    init = tiny_models["tempo"]
    a = train(_cfg(shards, init, tmp_path / "a", steps=2, batch=8))
    b = train(_cfg(shards, init, tmp_path / "b", steps=2, batch=4, grad_accum=2, max_batch_tokens=40))
    wa, wb = _weights(a["final_checkpoint"]), _weights(b["final_checkpoint"])
    assert wa.keys() == wb.keys()
    init_w = _weights(Path(init))
    moved = max(float((wa[k] - init_w[k].float()).abs().max()) for k in wa)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    # float32 sums in another order: Adam turns that rounding into update differences of ~1e-5
    # (measured 1.3e-5 on one CPU, < 1e-5 on another) against weights that moved ~1e-2.
    assert moved > 1e-3 and diff < 1e-4 and diff < 0.01 * moved, (moved, diff)
    la = [r["loss"] for r in read_metrics(Path(a["metrics"]), "train")]
    lb = [r["loss"] for r in read_metrics(Path(b["metrics"]), "train")]
    assert la == pytest.approx(lb, rel=1e-5) and la[1] < la[0]


def test_run_outputs_and_epochs(tiny_models, shards, tmp_path):
    out = tmp_path / "run"
    s = train(_cfg(shards, tiny_models["tempo"], out, steps=None, epochs=1.0, batch=2, save_every=2, eval_shards=shards))
    assert s["steps"] == 4 and s["samples_per_step"] == 2
    assert [Path(p).name for p in s["checkpoints"]] == ["checkpoint-2", "checkpoint-4"]
    recs = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    for r in train_recs:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= r.keys() and r["samples"] == 2
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 4]
    assert s["eval_before"]["eval_samples"] == 8
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "summary.json").read_text())["final_checkpoint"] == str(out / "checkpoint-4")
    # the checkpoint is a Tempo checkpoint: TempoLLM loads it directly
    from tempo_ops.llm import TempoLLM

    TempoLLM.from_pretrained(out / "checkpoint-4")
    # running the finished command again changes nothing; another lr is refused
    again = train(_cfg(shards, tiny_models["tempo"], out, steps=None, epochs=1.0, batch=2, save_every=2, eval_shards=shards))
    assert again["already_complete"] and again["steps"] == 4
    assert len(read_metrics(out / "metrics.jsonl")) == len(recs)
    with pytest.raises(ConfigError, match="lr"):
        train(_cfg(shards, tiny_models["tempo"], out, steps=None, epochs=1.0, batch=2, save_every=2, lr=0.5))


def test_sigkill_and_restart_continue_the_same_loss_curve(tiny_models, shards, tmp_path):
    """A run killed with SIGKILL resumes from its last complete checkpoint with identical losses (CPU)."""
    args = dict(steps=24, batch=2, save_every=3, warmup=2, shuffle=4, seed=3)
    ref = train(_cfg(shards, tiny_models["tempo"], tmp_path / "ref", **args))
    ref_losses = [r["loss"] for r in read_metrics(Path(ref["metrics"]), "train")]

    out = tmp_path / "killed"
    argv = _cli(
        "train", "--shards", shards, "--init", tiny_models["tempo"], "--out", str(out), "--train", "projector+llm",
        "--steps", "24", "--batch", "2", "--save-every", "3", "--warmup", "2", "--shuffle", "4", "--seed", "3",
        "--lr", "0.01", "--threads", "1",
    )
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-6").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = [s for s, _ in ckpt.list_checkpoints(out)][-1]
    assert 6 <= killed_at < 24

    resumed = train(_cfg(shards, tiny_models["tempo"], out, **args))
    assert resumed["resumed_from_step"] == killed_at
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == list(range(1, 25))
    assert losses == ref_losses  # identical, not merely close
    wr, wk = _weights(ref["final_checkpoint"]), _weights(resumed["final_checkpoint"])
    assert all(torch.equal(wr[k], wk[k]) for k in wr)


def _sigterm_after_two_steps(argv: list[str], out: Path) -> tuple[int, str]:
    """Run ``argv``, send SIGTERM once RUN/metrics.jsonl holds two records; (exit status, stderr)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err.decode()


def test_sigterm_checkpoints_the_current_step_and_resumes_the_same_loss_curve(tiny_models, shards, tmp_path):
    """SIGTERM (a preemption notice) stops after the running step with a checkpoint of it and exit
    143; the re-run resumes there with the uninterrupted run's losses. No periodic checkpoints."""
    args = dict(steps=24, batch=2, warmup=2, shuffle=4, seed=3)
    ref = train(_cfg(shards, tiny_models["tempo"], tmp_path / "ref", **args))
    assert ref["status"] == "complete"
    out = tmp_path / "preempted"
    argv = _cli(
        "train", "--shards", shards, "--init", tiny_models["tempo"], "--out", str(out), "--train", "projector+llm",
        "--steps", "24", "--batch", "2", "--warmup", "2", "--shuffle", "4", "--seed", "3", "--lr", "0.01", "--threads", "1",
    )
    rc, err = _sigterm_after_two_steps(argv, out)
    metrics = out / "metrics.jsonl"
    assert rc == 143, err[-2000:]
    assert "interrupted by SIGTERM" in err and "stopping after this step" in err
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps_done"]
    assert summary["status"] == "interrupted" and 2 <= stopped < 24
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [stopped]  # the step it stopped at, nothing else
    assert [r["step"] for r in read_metrics(metrics, "train")] == list(range(1, stopped + 1))

    resumed = train(_cfg(shards, tiny_models["tempo"], out, **args))
    assert resumed["status"] == "complete" and resumed["resumed_from_step"] == stopped
    assert [r["loss"] for r in read_metrics(metrics, "train")] == [r["loss"] for r in read_metrics(Path(ref["metrics"]), "train")]
    wr, wk = _weights(ref["final_checkpoint"]), _weights(resumed["final_checkpoint"])
    assert all(torch.equal(wr[k], wk[k]) for k in wr)


def test_sigterm_to_torchrun_checkpoints_every_rank_at_the_same_step(tiny_models, shards, tmp_path):
    """torchrun forwards SIGTERM to both ranks: they agree on the step, save one checkpoint of it
    (every rank's data position) and stop; torchrun itself reports the signal (exit 1)."""
    out = tmp_path / "ddp"
    argv = _cli("train", "--shards", shards, "--init", tiny_models["tempo"], "--out", str(out), "--steps", "40",
                "--batch", "2", "--threads", "1", torchrun=2)
    rc, err = _sigterm_after_two_steps(argv, out)
    assert rc != 0 and "interrupted by SIGTERM" in err, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps_done"]
    assert summary["status"] == "interrupted" and 2 <= stopped < 40
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [stopped]
    state, _ = ckpt.load_trainer_state(out / ckpt.checkpoint_name(stopped))
    assert state["world_size"] == 2 and len(state["positions"]) == 2


def test_two_ddp_processes_equal_one_process_with_twice_the_batch(tiny_models, shards, tmp_path):
    """torchrun, 2 ranks × batch 2 (gloo) gives the weights of 1 process × batch 4."""
    common = ["--shards", shards, "--init", tiny_models["tempo"], "--train", "projector+llm", "--steps", "3",
              "--lr", "0.01", "--warmup", "1", "--threads", "1"]
    two = subprocess.run(
        _cli("train", *common, "--out", str(tmp_path / "two"), "--batch", "2", torchrun=2),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(_cfg(shards, tiny_models["tempo"], tmp_path / "one", steps=3, batch=4, warmup=1))
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["samples_per_step"] == 4
    w1, w2 = _weights(one["final_checkpoint"]), _weights(s2["final_checkpoint"])
    init = _weights(Path(tiny_models["tempo"]))
    moved = max(float((w1[k] - init[k].float()).abs().max()) for k in w1)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved > 1e-2 and diff < 1e-4, (moved, diff)  # measured: moved 2.5e-2, diff 5.5e-6
    l1 = [r["loss"] for r in read_metrics(Path(one["metrics"]), "train")]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl", "train")]
    assert l1 == pytest.approx(l2, rel=1e-5)
