"""`tempo eval` end to end: predictions, summary, plots, resume, --force, dead letters, shards source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tempo_ops.allocation import allocate
from tempo_ops.llm import TempoLLM
from tempo_ops.llm.evaluate import PREDICTION_FIELDS, make_item, plan_batches, prediction_key
from tempo_ops.llm.report import PLOTS, format_table, summarize
from tempo_ops.query_text import render_query
from tempo_ops.video import format_timestamp

K, D = 16, 64
PNG = b"\x89PNG\r\n\x1a\n"


def _cache_config():
    from tests.test_shards import _cache_config as shards_cache_config

    config = shards_cache_config()
    config["compressor"].update(num_memory_tokens=K, hidden_size=D)
    return config


QUERIES = {
    "v1": ([("q1", "What is added first?", ["salt", "oil"], "B"), ("q2", "Unannotated?", None, None)], 6, "cooking"),
    "v.2": ([("q1", "What colour is the car?", None, "red")], 3, "street"),
    "v3": ([("q1", "How many people?", ["one", "two", "three"], "A")], 9, None),
}


@pytest.fixture
def corpus(tmp_path):
    """A real token cache (3 videos, 4 entries, 3 answered; compressed under videomme) and its manifest."""
    from tempo_ops.store import CacheWriter

    url = str(tmp_path / "cache.zarr")
    writer = CacheWriter.open(url, _cache_config(), segments_per_shard=4, token_chunk=4)
    lines = []
    for v, (queries, S, kind) in QUERIES.items():
        ts = [(8 * i + 4) / 2.0 for i in range(S)]
        writer.write_video(v, {"uri": f"{v}.mp4", "timestamps": ts, "timestamp_texts": [format_timestamp(t) for t in ts]})
        for j, (q, text, opts, _ans) in enumerate(queries):
            rng = np.random.default_rng(len(v) * 10 + j)
            cand = rng.standard_normal((S, K, D)).astype(np.float16)
            rel = rng.random(S).astype(np.float32)
            # as tempo compress records them: the text the compressor read and its template
            writer.begin_entry(v, q, render_query(text, opts, "videomme"), S, prompt_template="videomme")
            for s0 in range(0, S, 4):
                writer.write_block(v, q, s0, cand[s0 : s0 + 4], rel[s0 : s0 + 4])
            writer.finalize_entry(v, q)
        lines.append({
            "video_id": v, "uri": f"{v}.mp4",
            "queries": [{"query_id": q, "text": t, "options": o, "answer": a} for q, t, o, a in queries],
            "metadata": {"kind": kind} if kind else {},
        })
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return url, str(manifest)


def tempo(*argv) -> int:
    from pipelines.cli import main

    return main(list(argv))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_eval_job_end_to_end_and_resume(corpus, tiny_models, tmp_path, capsys):
    cache, manifest = corpus
    out = tmp_path / "eval"
    base = ["eval", "--cache", cache, "--manifest", manifest, "--llm", tiny_models["tempo"], "--out", str(out),
            "--policies", "ata,uniform", "--group-by", "kind"]
    assert tempo(*base, "--budgets", "8,24") == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    keys = [r["key"] for r in rows]
    assert keys == sorted(keys) and len(rows) == 3 * 2 * 2
    assert all(set(r) == set(PREDICTION_FIELDS) for r in rows)
    assert {r["prompt_template"] for r in rows} == {"videomme"}  # the template the entries record
    assert {(r["video_id"], r["query_id"]) for r in rows} == {("v1", "q1"), ("v.2", "q1"), ("v3", "q1")}
    # The job's answers are exactly what the LLM stage gives for the packed tokens, batch of one.
    from tempo_ops.packing import pack
    from tempo_ops.store import CacheReader

    llm = TempoLLM.from_pretrained(tiny_models["tempo"])
    reader = CacheReader(cache)
    for r in rows:
        entry = reader.entry(r["video_id"], r["query_id"])
        k = allocate(entry.relevance(), r["budget"], policy=r["policy"], k_max=K)
        assert r["tokens_allocated"] == r["tokens_used"] == int(k.sum())
        assert r["tokens_per_frame"] == pytest.approx(k.sum() / (8 * entry.n_segments))
        assert r["segments_kept"] == int(np.count_nonzero(k)) and r["n_segments"] == entry.n_segments
        q = {q: (t, o) for q, t, o, _ in QUERIES[r["video_id"]][0]}[r["query_id"]]
        packed = pack(entry, k, entry.timestamp_texts)
        x = llm.build_inputs(packed.tokens, k, packed.timestamp_texts, render_query(q[0], q[1], "videomme"))
        assert llm.generate([x], max_new_tokens=16)[0].text == r["raw_answer"]
        assert r["rule"] == ("open" if q[1] is None else "mc") and r["correct"] is False or r["parsed_answer"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"] == summarize(rows, ["kind"])
    assert summary["counts"]["written"] == 12 and summary["counts"]["unanswered"] == 1
    assert summary["counts"]["context_differs_from_cache_query"] == 0
    assert summary["failures"]["items"] == 0
    assert set(summary["results"]["by_group"]["kind"]["groups"]) == {"cooking", "street", "(none)"}
    assert "accuracy" in summary["results"]["accuracy"]["8"]["ata"]
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
        import matplotlib.image

        assert matplotlib.image.imread(out / name).ndim == 3
    assert str(out / "accuracy_vs_budget.png") in printed and "policy" in printed and "B=24" in printed
    assert not (out / "parts").exists() or not list((out / "parts").iterdir())

    # Re-run: nothing to do, nothing rewritten.
    before = (out / "predictions.jsonl").read_bytes()
    assert tempo(*base, "--budgets", "8,24") == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["counts"]["written"] == 0 and again["counts"]["skipped_done"] == 12
    assert (out / "predictions.jsonl").read_bytes() == before
    # A new budget: only its predictions are made.
    assert tempo(*base, "--budgets", "8,24,48") == 0
    more = json.loads((out / "summary.json").read_text())
    assert more["counts"]["written"] == 6 and len(_rows(out)) == 18
    assert [r for r in _rows(out) if r["budget"] != 48] == rows
    # Another configuration is refused; --force redoes everything.
    capsys.readouterr()
    assert tempo(*base, "--budgets", "8", "--pack-mode", "tail") == 2
    assert "config_error" in capsys.readouterr().err
    assert tempo(*base, "--budgets", "8", "--pack-mode", "tail", "--force") == 0
    forced = _rows(out)
    assert len(forced) == 6 and all(r["budget"] == 8 for r in forced)


def test_eval_dead_letters_a_corrupt_entry(corpus, tiny_models, tmp_path):
    cache, manifest = corpus
    # Corrupt the candidate bytes of one entry (its relevance still reads, so it is planned).
    cand = Path(cache) / "videos"
    files = [p for p in cand.rglob("*") if p.is_file() and "candidates" in p.parts and "c" in p.parts]
    target = [p for p in files if "v3" in str(p)]
    assert target
    for p in target:
        p.write_bytes(b"garbage")
    out = tmp_path / "eval"
    rc = tempo("eval", "--cache", cache, "--manifest", manifest, "--llm", tiny_models["tempo"], "--out", str(out),
               "--budgets", "16", "--prompt-template", "videomme")
    assert rc == 1
    letters = [json.loads(line) for line in (out / "deadletter.jsonl").read_text().splitlines()]
    assert [(d["video_id"], d["query_id"], d["stage"]) for d in letters] == [("v3", "q1", "pack")]
    assert {r["video_id"] for r in _rows(out)} == {"v1", "v.2"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"]["items"] == 1 and summary["counts"]["failed"] == 1


def test_eval_from_shards_equals_eval_from_cache(corpus, tiny_models, tmp_path):
    cache, manifest = corpus
    shards = tmp_path / "shards"
    assert tempo("shards", "--cache", cache, "--manifest", manifest, "--budgets", "24", "--policies", "ata",
                 "--out", str(shards)) == 0
    from tempo_ops.shards import shard_dataset

    samples = list(shard_dataset(str(shards / "24-ata" / "index.json")))
    meta = {s["meta"]["video_id"]: s["meta"] for s in samples}
    assert meta["v1"]["prompt_template"] == "videomme"
    assert meta["v1"]["query_text"] == render_query("What is added first?", ["salt", "oil"], "videomme")
    assert meta["v1"]["metadata"] == {"kind": "cooking"}
    index = str(shards / "24-ata" / "index.json")
    for template in ([], ["--prompt-template", "lvbench"]):  # the recorded template, then another one
        a, b = tmp_path / f"from_shards{len(template)}", tmp_path / f"from_cache{len(template)}"
        assert tempo("eval", "--shards", index, "--llm", tiny_models["tempo"], "--out", str(a), "--group-by", "kind",
                     *template) == 0
        assert tempo("eval", "--cache", cache, "--manifest", manifest, "--llm", tiny_models["tempo"], "--out", str(b),
                     "--budgets", "24", "--policies", "ata", "--group-by", "kind", *template) == 0
        assert _rows(a) == _rows(b)
        assert {r["prompt_template"] for r in _rows(a)} == {"lvbench" if template else "videomme"}
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        assert sa["results"] == sb["results"]
    assert sb["counts"]["context_differs_from_cache_query"] == 3


def test_eval_rejects_bad_arguments(corpus, tiny_models, tmp_path, capsys):
    cache, manifest = corpus
    llm = tiny_models["tempo"]
    assert tempo("eval", "--llm", llm, "--out", str(tmp_path / "o")) == 2
    assert tempo("eval", "--cache", cache, "--llm", llm, "--out", str(tmp_path / "o")) == 2
    assert tempo("eval", "--cache", cache, "--manifest", manifest, "--llm", llm, "--out", str(tmp_path / "o"),
                 "--policies", "nope") == 2
    assert "config_error" in capsys.readouterr().err


# --------------------------------------------------------------------------- pure parts
def _item(i, cost_tokens, template="videomme"):
    return make_item(f"v{i}", "q", 8, "ata", [cost_tokens], question="q?", options=["a", "b"], answer="A",
                     prompt_template=template)


def test_plan_batches_by_cost_and_generation_limit():
    items = [_item(i, c) for i, c in enumerate([500, 10, 300, 20, 400, 30])] + [_item(9, 5, "longvideobench")]
    batches = plan_batches(items, max_batch_tokens=800, max_batch_size=2)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(items)))
    for b in batches:
        assert len(b) <= 2
        assert len({items[i].max_new_tokens for i in b}) == 1
        assert len(b) == 1 or sum(items[i].cost for i in b) <= 800
    costs = [items[i].cost for i in flat if items[i].max_new_tokens == 16]
    assert costs == sorted(costs)  # similar lengths batch together
    assert batches[-1] == [6]  # the 32-token template is batched on its own


def test_summary_counts_and_table():
    def row(b, p, correct, none, kind, tpf=1.0):
        return {"key": prediction_key("v", f"{kind}{correct}{none}", b, p), "budget": b, "policy": p,
                "correct": correct, "no_answer": none, "tokens_used": 10, "tokens_per_frame": tpf,
                "segments_kept": 2, "truncated": 0, "metadata": {"task": kind} if kind else {}}

    rows = [row(8, "ata", True, False, "x"), row(8, "ata", False, True, "y"), row(8, "ata", False, False, "y"),
            row(16, "ata", True, False, "x", 2.0), row(8, "uniform", True, False, None)]
    s = summarize(rows, ["task"])
    assert s["predictions"] == 5 and s["no_answer"] == 1 and s["budgets"] == [8, 16] and s["policies"] == ["ata", "uniform"]
    cell = s["accuracy"]["8"]["ata"]
    assert (cell["n"], cell["correct"], cell["no_answer"]) == (3, 1, 1) and cell["accuracy"] == pytest.approx(1 / 3)
    assert s["accuracy"]["16"]["ata"]["mean_tokens_per_frame"] == 2.0
    groups = s["by_group"]["task"]
    assert groups["groups"]["y"]["8"]["ata"]["accuracy"] == 0.0
    assert groups["macro_accuracy"]["8"]["ata"] == pytest.approx(0.5)  # mean of x (1.0) and y (0.0)
    assert groups["groups"]["(none)"]["8"]["uniform"]["n"] == 1
    table = format_table(s)
    assert "33.3% (n=3, none=1)" in table and table.splitlines()[0].split() == ["policy", "B=8", "B=16"]
    assert "-" in table.splitlines()[2]  # uniform has no 16-token cell


def test_resolve_context_prefers_what_the_compressor_read():
    from tempo_ops.llm.evaluate import resolve_context

    rendered = render_query("Q?", ["x", "y"], "videomme")
    assert resolve_context("Q?", ["x", "y"], template=None, recorded_template="videomme", recorded_text=rendered) == (
        "videomme", rendered)
    # Another template than the entry's: rendered anew.
    assert resolve_context("Q?", ["x", "y"], template="lvbench", recorded_template="videomme", recorded_text=rendered) == (
        "lvbench", render_query("Q?", ["x", "y"], "lvbench"))
    # Nothing recorded (older caches and shards): the plain template.
    assert resolve_context("Q?", ["x", "y"], template=None, recorded_template=None, recorded_text="Q?") == (
        "plain", "Q?\nx\ny")
