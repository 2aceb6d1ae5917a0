"""Benchmark: ``tempo train`` throughput vs a minimal hand-written torch loop.

Both train the same LLM stage (projector + LLM, float32, AdamW, clipping) on the same 64
samples (4 segments × 16 random candidate tokens of width 64, the tiny SVLM's, and a
multiple-choice question with its answer), batch 8, one torch thread each:

- ``tempo train``: the real loop (``tempo_ops.train.loop.train``) reading the samples from a
  WebDataset shard set on local disk: decode, ``TempoLLM.build_inputs`` per sample,
  token-count micro-batching, padding, loss over answer tokens, metrics per step;
- hand loop: the samples' input ids, visual positions, tokens and labels prepared once as
  in-memory tensors; per step only embed + project + forward + loss + backward + clip + step.

Throughput is samples (and real tokens) per second of the median step time over steps 3..
of each run (the first steps warm up allocators; the median resists load spikes from other
processes), medians of 3 runs side by side, alternating. Two LLM sizes: the
tiny test model (hidden 96, 2 layers: overhead-bound, the data path's worst case) and a
small one (hidden 512, 4 layers). Target: ratio ≥ 0.8 (the data path is not the bottleneck).

Run: ``python -m bench.bench_train`` → ``bench/results/train.json``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import peak_rss_mb, write_result

N_SAMPLES = 64
BATCH = 8
STEPS = 24
SKIP = 2
REPEAT = 3
SIZES = {"tiny": None, "small": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}}


def _make_init(tmp: Path, size: str) -> str:
    """A Tempo checkpoint for ``size``: the tiny one, or the tiny one with a bigger random LLM."""
    from tempo_ops.llm import TempoLLM
    from tempo_ops.llm.projector import build_projector
    from tempo_ops.svlm.tiny import make_tiny_models

    tiny = make_tiny_models(tmp / "tiny", seed=0)["tempo"]
    if SIZES[size] is None:
        return tiny
    from transformers import Qwen3Config, Qwen3ForCausalLM

    base = TempoLLM.from_pretrained(tiny, dtype=torch.float32, device="cpu")
    cfg = Qwen3Config(**{**base.lm.config.to_dict(), "layer_types": None, **SIZES[size]})
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(cfg).float()
    proj = build_projector(base.projector_type, base.mm_hidden_size, cfg.hidden_size)
    bigger = TempoLLM(lm, proj, base.tokenizer, base.tempo_config)
    out = tmp / f"tempo-{size}"
    bigger.save_pretrained(out)
    return str(out)


def _tempo_train(shards: str, init: str, out: Path) -> dict:
    from tempo_ops.train.loop import TrainConfig, train
    from tempo_ops.train.metrics import read_metrics

    train(TrainConfig(shards=shards, init=init, out=str(out), train="projector+llm", steps=STEPS, batch=BATCH,
                      lr=1e-3, threads=1))
    recs = read_metrics(out / "metrics.jsonl", "train")[SKIP:]
    return _rates([r["samples"] / r["samples_per_s"] for r in recs], [r["samples"] for r in recs], [r["tokens"] for r in recs])


def _rates(step_s: list[float], samples: list[int], tokens: list[int]) -> dict:
    """Rates from the median step time (robust to load spikes from other processes on the machine)."""
    t = statistics.median(step_s)
    return {"samples_per_s": statistics.median(samples) / t, "tokens_per_s": statistics.median(tokens) / t, "median_step_s": t}


def _hand_loop(shards: str, init: str) -> dict:
    """The minimal loop over prepared in-memory tensors (same model, optimizer, batch, loss)."""
    import torch.nn.functional as F

    from tempo_ops.llm import TempoLLM
    from tempo_ops.llm.evaluate import resolve_sample_context
    from tempo_ops.shards import shard_dataset

    torch.set_num_threads(1)
    llm = TempoLLM.from_pretrained(init, dtype=torch.float32, device="cpu")
    llm.train()
    llm.requires_grad_(True)
    params = list({id(p): p for p in llm.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=1e-3)
    prepared = []
    with torch.no_grad():
        for s in shard_dataset(shards):
            x = llm.build_inputs(s["tokens"], s["alloc"], s["timestamp_texts"], resolve_sample_context(s["meta"])[1], answer=s["meta"]["answer"])
            prepared.append((x.input_ids, torch.from_numpy(s["tokens"].astype("float32")), x.labels))
    embed = llm.lm.get_input_embeddings()
    times, samples, tokens = [], [], []
    for step in range(STEPS):
        t0 = time.perf_counter()
        batch = [prepared[(step * BATCH + i) % len(prepared)] for i in range(BATCH)]
        rows = []
        for ids, toks, _ in batch:
            vis = ids < 0
            e = embed(ids.clamp(min=0))
            rows.append(e.masked_scatter(vis[:, None], llm.projector(toks[: int(vis.sum())])))
        x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
        y = torch.nn.utils.rnn.pad_sequence([b[2] for b in batch], batch_first=True, padding_value=-100)
        h = llm.lm.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
        t = y[:, 1:]
        sel = t != -100
        loss = F.cross_entropy(llm.lm.lm_head(h[sel]).float(), t[sel])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= SKIP:
            times.append(time.perf_counter() - t0)
            samples.append(BATCH)
            tokens.append(int(mask.sum()))
    return _rates(times, samples, tokens)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from train_support import write_random_shard_set

    figures: dict = {"samples": N_SAMPLES, "batch": BATCH, "steps_timed": STEPS - SKIP, "repeat": REPEAT, "threads": 1}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as d:
        tmp = Path(d)
        shards = write_random_shard_set(tmp / "shards", n_samples=N_SAMPLES, per_shard=8, segments=4, k=16)
        for size in SIZES:
            init = _make_init(tmp / size, size)
            runs = {"tempo_train": [], "hand_loop": []}
            for r in range(REPEAT):  # side by side, alternating
                runs["tempo_train"].append(_tempo_train(shards, init, tmp / f"run-{size}-{r}"))
                runs["hand_loop"].append(_hand_loop(shards, init))
            med = {k: {m: statistics.median(x[m] for x in v) for m in ("samples_per_s", "tokens_per_s")} for k, v in runs.items()}
            ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs["tempo_train"], runs["hand_loop"])]
            figures[size] = {
                "tempo_train_samples_per_s": med["tempo_train"]["samples_per_s"],
                "tempo_train_tokens_per_s": med["tempo_train"]["tokens_per_s"],
                "hand_loop_samples_per_s": med["hand_loop"]["samples_per_s"],
                "hand_loop_tokens_per_s": med["hand_loop"]["tokens_per_s"],
                "ratio_median": statistics.median(ratios),
                "ratios": ratios,
                "target_ratio": 0.8,
                "meets_target": statistics.median(ratios) >= 0.8,
            }
            print(size, figures[size], flush=True)
    figures["peak_rss_mb"] = peak_rss_mb()
    write_result("train", figures, "python -m bench.bench_train")


if __name__ == "__main__":
    main()
