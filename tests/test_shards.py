"""WebDataset shards: format, determinism, crash safety, reading, collation, the `tempo shards` job."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds

from schemas.shard_sample import (
    SHARD_FORMAT_VERSION,
    SampleMeta,
    decode_sample,
    encode_sample,
    sample_key,
)
from tempo_ops.allocation import allocate
from tempo_ops.errors import ShardError, ShardFormatError
from tempo_ops.packing import format_timestamp, pack
from tempo_ops.query_text import render_query
from tempo_ops.shards import (
    FIXED_MTIME,
    PlannedSample,
    assign_shards,
    build_sample,
    cleanup_partials,
    collate_samples,
    collate_torch,
    make_index,
    plan_shard_set,
    read_completion,
    read_index,
    shard_dataset,
    shard_done,
    shard_set_complete,
    write_index,
    write_shard,
    write_tar,
)


class FakeEntry:
    def __init__(self, video_id, query_id, S=6, K=16, D=8, seed=0):
        rng = np.random.default_rng(seed)
        self.video_id, self.query_id = video_id, query_id
        self.n_segments, self.K, self.D = S, K, D
        self.data = rng.standard_normal((S, K, D)).astype(np.float16)
        self.rel = rng.random(S).astype(np.float32)
        self.timestamps = [(8 * i + 4) / 2.0 for i in range(S)]
        self.timestamp_texts = [format_timestamp(t) for t in self.timestamps]

    def relevance(self):
        return self.rel

    def read_token_ranges(self, ranges):
        return [self.data[i, a:b] for i, (a, b) in enumerate(ranges)]


def planned_for(entry, budget=40, policy="ata", answer="B"):
    k = allocate(entry.rel, budget, policy=policy, k_max=entry.K)
    return PlannedSample(
        sample_key(entry.video_id, entry.query_id), entry.video_id, entry.query_id,
        f"question about {entry.video_id}?", ["A", "B"], answer, tuple(int(x) for x in k), 1000,
    )


def make_samples(n=4, budget=40):
    entries = [FakeEntry(f"vid.{i}/x", f"q{i % 2}", seed=i) for i in range(n)]
    planned = sorted((planned_for(e, budget) for e in entries), key=lambda p: p.key)
    by_key = {sample_key(e.video_id, e.query_id): e for e in entries}
    return entries, planned, by_key


def sample_stream(planned, by_key, budget=40, fail_after=None):
    for i, p in enumerate(planned):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("simulated crash while writing")
        yield build_sample(by_key[p.key], p, budget=budget, policy="ata", cache_fingerprint="fp")


# --------------------------------------------------------------------------- keys and format
def test_sample_key_is_dot_free_and_injective():
    key = sample_key("my.video/part 1.mp4", "q.1")
    assert "." not in key and "/" not in key
    # A naive "__" join would collide here; "~~" cannot occur inside a sanitised key.
    assert sample_key("a__b", "c") != sample_key("a", "b__c")
    assert sample_key("a~", "b") != sample_key("a", "~b")
    assert sample_key("_x", "y").count("~~") == 1


def test_encode_decode_roundtrip_and_version_check():
    e = FakeEntry("v", "q")
    p = planned_for(e)
    key, members = build_sample(e, p, budget=40, policy="ata", cache_fingerprint={"a": 1})
    decoded = decode_sample({"__key__": key, **members})
    packed = pack(e, np.array(p.allocation), e.timestamps)
    assert np.array_equal(decoded["tokens"], packed.tokens) and decoded["tokens"].dtype == np.float16
    assert decoded["alloc"].dtype == np.int16 and decoded["alloc"].tolist() == list(p.allocation)
    assert decoded["offsets"].tolist() == packed.offsets.tolist()
    assert decoded["timestamp_texts"] == e.timestamp_texts
    meta = decoded["meta"]
    assert meta["video_id"] == "v" and meta["answer"] == "B" and meta["options"] == ["A", "B"]
    assert meta["format_version"] == SHARD_FORMAT_VERSION and meta["cache_fingerprint"] == {"a": 1}
    bad = json.loads(members["meta.json"])
    bad["format_version"] = 999
    with pytest.raises(ShardFormatError, match="version"):
        decode_sample({"__key__": key, **members, "meta.json": json.dumps(bad).encode()})
    with pytest.raises(ShardFormatError, match="lacks"):
        decode_sample({"__key__": key, "meta.json": members["meta.json"]})
    with pytest.raises(ShardFormatError, match="npy"):
        decode_sample({"__key__": key, **members, "tokens.npy": b"garbage"})


def test_encode_rejects_inconsistent_sample():
    meta = SampleMeta("k", "v", "q", "?", None, "a", 8, "ata", "head", 2, 3, 4)
    with pytest.raises(ShardFormatError):
        encode_sample(meta, np.zeros((2, 4), np.float16), np.array([1, 2]), np.array([0, 1, 3]), ["a", "b"], [0.0, 1.0])


def test_assign_shards_is_deterministic_cut_rule():
    sizes = {"c": 40, "a": 50, "b": 60, "d": 200, "e": 10}
    # sorted: a(50) b(60) -> 110 > 100 so cut before b; b + c = 100 fits; d alone (too big); e.
    assert assign_shards(sizes, 100) == [["a"], ["b", "c"], ["d"], ["e"]]
    assert assign_shards(dict(reversed(list(sizes.items()))), 100) == assign_shards(sizes, 100)
    with pytest.raises(ShardError):
        assign_shards(sizes, 0)


# --------------------------------------------------------------------------- writing
def test_shard_readable_by_tarfile_and_plain_webdataset(tmp_path):
    _, planned, by_key = make_samples()
    rec = write_shard(str(tmp_path / "set"), 0, sample_stream(planned, by_key), planned_keys=[p.key for p in planned])
    path = tmp_path / "set" / "shard-000000.tar"
    assert rec.samples == 4 and rec.bytes == path.stat().st_size and not rec.failed
    assert rec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos]
    assert names == [f"{p.key}.{m}" for p in planned for m in ("alloc.npy", "meta.json", "times.json", "tokens.npy")]
    assert all(i.mtime == FIXED_MTIME and i.uid == 0 and i.gid == 0 and i.uname == "" and i.mode == 0o644 for i in infos)
    # plain webdataset, no help from us: keys survive (no dots), members decode with numpy.
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=True)
    raw = list(ds)
    assert [s["__key__"] for s in raw] == [p.key for p in planned]
    for s, p in zip(raw, planned):
        tokens = np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False)
        e = by_key[p.key]
        expected = np.concatenate([e.data[i, :k] for i, k in enumerate(p.allocation)])
        assert np.array_equal(tokens, expected)
        assert json.loads(s["meta.json"])["question"] == p.question


def test_two_runs_give_identical_bytes(tmp_path):
    _, planned, by_key = make_samples()
    keys = [p.key for p in planned]
    r1 = write_shard(str(tmp_path / "a"), 0, sample_stream(planned, by_key), planned_keys=keys)
    r2 = write_shard(str(tmp_path / "b"), 0, sample_stream(planned, by_key), planned_keys=keys)
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()
    assert r1 == r2


def test_crash_mid_write_leaves_nothing_complete(tmp_path):
    _, planned, by_key = make_samples()
    set_url = str(tmp_path / "set")
    with pytest.raises(RuntimeError, match="simulated"):
        write_shard(set_url, 0, sample_stream(planned, by_key, fail_after=2), planned_keys=[p.key for p in planned])
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == []  # no tar, no temp, no record
    assert read_completion(set_url, 0) is None
    assert not shard_done(set_url, 0, [p.key for p in planned])


def test_stale_record_and_leftover_temp_are_not_trusted(tmp_path):
    _, planned, by_key = make_samples()
    keys = [p.key for p in planned]
    set_url = str(tmp_path / "set")
    write_shard(set_url, 0, sample_stream(planned, by_key), planned_keys=keys)
    assert shard_done(set_url, 0, keys)
    assert not shard_done(set_url, 0, keys[:2])  # another plan: redo
    # A killed writer leaves a temp file: it is ignored by the reader and removed by cleanup.
    leftover = tmp_path / "set" / ".shard-000001.tar.tmp-deadbeef"
    leftover.write_bytes(b"partial")
    # A tar truncated after its record was written no longer counts as complete.
    tar = tmp_path / "set" / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    assert read_completion(set_url, 0) is None
    assert cleanup_partials(set_url) == [str(leftover)]
    assert not leftover.exists()
    # Crash during a rewrite: the old record is removed before the new bytes are written.
    write_shard(set_url, 0, sample_stream(planned, by_key), planned_keys=keys)
    with pytest.raises(RuntimeError):
        write_shard(set_url, 0, sample_stream(planned, by_key, fail_after=1), planned_keys=keys)
    assert read_completion(set_url, 0) is None


def test_write_tar_rejects_bad_keys():
    with pytest.raises(ShardError, match="dot-free"):
        write_tar(io.BytesIO(), [("a.b", {"x.json": b"{}"})])
    with pytest.raises(ShardError, match="increasing"):
        write_tar(io.BytesIO(), [("b", {"x.json": b"{}"}), ("a", {"x.json": b"{}"})])


def write_set(tmp_path, n=5, shard_bytes=1):
    entries, planned, by_key = make_samples(n)
    plan = plan_shard_set("40-ata", 40, "ata", planned, shard_bytes)  # 1 byte: one sample per shard
    url = str(tmp_path / "40-ata")
    records = [
        write_shard(url, t.n, sample_stream(list(t.samples), by_key), planned_keys=t.keys) for t in plan.tasks
    ]
    write_index(url, make_index(plan, records, pack_mode="head", cache_fingerprint="fp"))
    return url, plan, planned, by_key


def test_index_and_shard_dataset(tmp_path):
    url, plan, planned, by_key = write_set(tmp_path)
    doc = read_index(url)
    assert doc["total_samples"] == 5 and len(doc["shards"]) == 5 and doc["plan_sha256"] == plan.plan_sha256
    assert shard_set_complete(url, plan.plan_sha256) and not shard_set_complete(url, "other")
    (Path(url) / ".shard-000009.tar.tmp-x").write_bytes(b"junk")  # never listed: read via the index
    samples = list(shard_dataset(url + "/index.json"))
    assert [s["__key__"] for s in samples] == [p.key for p in planned]
    for s, p in zip(samples, planned):
        e = by_key[p.key]
        assert np.array_equal(s["tokens"], pack(e, np.array(p.allocation), e.timestamps).tokens)
    # node splitting: two "nodes" each see a disjoint half of the shards.
    halves = [
        [s["__key__"] for s in shard_dataset(url, nodesplitter=lambda src, r=r: (x for i, x in enumerate(src) if i % 2 == r))]
        for r in (0, 1)
    ]
    assert sorted(halves[0] + halves[1]) == sorted(p.key for p in planned) and not set(halves[0]) & set(halves[1])
    shuffled = [s["__key__"] for s in shard_dataset(url, shuffle=10, seed=1)]
    assert sorted(shuffled) == sorted(p.key for p in planned)


def test_index_version_is_checked(tmp_path):
    url, *_ = write_set(tmp_path, n=2)
    path = Path(url) / "index.json"
    doc = json.loads(path.read_text())
    doc["format_version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(ShardFormatError, match="version"):
        read_index(url)
    with pytest.raises(ShardError, match="not found"):
        read_index(str(tmp_path / "missing"))


def test_shard_dataset_over_fsspec_memory_filesystem(tmp_path):
    _, planned, by_key = make_samples(3)
    url = "memory://shards-test/40-ata"
    rec = write_shard(url, 0, sample_stream(planned, by_key), planned_keys=[p.key for p in planned])
    assert read_completion(url, 0) == rec
    got = [s["__key__"] for s in shard_dataset([url + "/shard-000000.tar"])]
    assert got == [p.key for p in planned]


def test_collate_samples_pads(tmp_path):
    url, _, planned, _ = write_set(tmp_path, n=3)
    samples = list(shard_dataset(url))
    batch = collate_samples(samples)
    lengths = [s["tokens"].shape[0] for s in samples]
    assert batch["tokens"].shape == (3, max(lengths), 8) and batch["tokens"].dtype == np.float16
    assert batch["lengths"].tolist() == lengths
    assert batch["mask"].sum(axis=1).tolist() == lengths
    for b, s in enumerate(samples):
        assert np.array_equal(batch["tokens"][b, : lengths[b]], s["tokens"])
        assert not batch["tokens"][b, lengths[b] :].any()
        assert batch["alloc"][b, : len(s["alloc"])].tolist() == s["alloc"].tolist()
    assert [m["video_id"] for m in batch["meta"]] == [s["meta"]["video_id"] for s in samples]
    t = collate_torch(samples)
    assert tuple(t["tokens"].shape) == batch["tokens"].shape and str(t["mask"].dtype) == "torch.bool"
    with pytest.raises(ShardError):
        collate_samples([])


# --------------------------------------------------------------------------- the `tempo shards` job over a real cache
K_INT, D_INT = 16, 8


def _cache_config():
    return {
        "compressor": {
            "svlm_name": "tiny", "svlm_weights_sha256": "1" * 64, "memory_tokens_source": "fresh:seed=0",
            "memory_tokens_sha256": "2" * 64, "prompt_sha256": "3" * 64, "num_memory_tokens": K_INT,
            "hidden_size": D_INT, "reference_geometry": True,
        },
        "sampling": {"target_fps": 2.0, "min_frames": 8, "max_frames": 1024, "max_edge": 512, "multiple": 16, "window": 8},
        "stored_dtype": "float16",
    }


QUESTIONS = {  # (text, options) of the manifest below
    ("vid.a", "q1"): ("What is shown?", ["A", "B"]),
    ("vid.a", "q2"): ("Unannotated?", None),
    ("vid/b", "q1"): ("Colour?", None),
    ("c", "q1"): ("How many?", None),
}


def build_cache(tmp_path):
    """A real token cache: 3 videos; entries for annotated, unannotated and unlisted queries."""
    from tempo_ops.store import CacheWriter

    url = str(tmp_path / "cache.zarr")
    writer = CacheWriter.open(url, _cache_config(), segments_per_shard=4, token_chunk=4)
    raw = {}
    layout = {"vid.a": (["q1", "q2"], 10), "vid/b": (["q1"], 3), "c": (["q1", "extra"], 6)}
    for v, (queries, S) in layout.items():
        ts = [(8 * i + 4) / 2.0 for i in range(S)]
        writer.write_video(v, {"uri": f"{v}.mp4", "timestamps": ts, "timestamp_texts": [format_timestamp(t) for t in ts]})
        for j, q in enumerate(queries):
            rng = np.random.default_rng(len(v) * 10 + j)
            cand = rng.standard_normal((S, K_INT, D_INT)).astype(np.float16)
            rel = rng.random(S).astype(np.float32)
            template = "videomme" if v == "vid.a" else "plain"
            text = render_query(*QUESTIONS.get((v, q), (f"text {q}", None)), template)  # what the compressor read
            writer.begin_entry(v, q, text, S, prompt_template=template)
            for s0 in range(0, S, 4):
                writer.write_block(v, q, s0, cand[s0 : s0 + 4], rel[s0 : s0 + 4])
            writer.finalize_entry(v, q)
            raw[(v, q)] = (cand, rel)
    manifest = tmp_path / "manifest.jsonl"
    lines = [
        {"video_id": "vid.a", "uri": "a.mp4", "queries": [
            {"query_id": "q1", "text": "What is shown?", "options": ["A", "B"], "answer": "A"},
            {"query_id": "q2", "text": "Unannotated?", "answer": None}]},
        {"video_id": "vid/b", "uri": "b.mp4", "queries": [{"query_id": "q1", "text": "Colour?", "answer": "red"}]},
        {"video_id": "c", "uri": "c.mp4", "queries": [{"query_id": "q1", "text": "How many?", "answer": "3"}]},
    ]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return url, str(manifest), raw


def run_cli(*argv):
    from pipelines.cli import main

    return main(["shards", *argv])


def test_build_shards_job_end_to_end(tmp_path, capsys):
    cache, manifest, raw = build_cache(tmp_path)
    out = tmp_path / "shards"
    args = ["--cache", cache, "--manifest", manifest, "--budgets", "20,40", "--policies", "ata,uniform",
            "--out", str(out), "--shard-size-mb", "0.0001"]
    assert run_cli(*args) == 0
    printed = capsys.readouterr().out
    assert "20-ata: 3 samples" in printed and "tokens/frame used" in printed
    for budget in (20, 40):
        for policy in ("ata", "uniform"):
            set_dir = out / f"{budget}-{policy}"
            doc = read_index(str(set_dir))
            assert doc["budget"] == budget and doc["policy"] == policy and doc["total_samples"] == 3
            assert doc["cache_fingerprint"] and not doc["failed"] and len(doc["shards"]) == 3  # ~100 B limit: 1 per shard
            samples = list(shard_dataset(str(set_dir / "index.json")))
            assert sorted((s["meta"]["video_id"], s["meta"]["query_id"]) for s in samples) == [
                ("c", "q1"), ("vid.a", "q1"), ("vid/b", "q1")]
            for s in samples:
                cand, rel = raw[(s["meta"]["video_id"], s["meta"]["query_id"])]
                k = allocate(rel, budget, policy=policy, k_max=K_INT)
                assert s["alloc"].tolist() == k.tolist()
                assert np.array_equal(s["tokens"], np.concatenate([cand[i, :n] for i, n in enumerate(k)]))
                assert s["meta"]["answer"] in ("A", "red", "3") and s["meta"]["budget"] == budget
                template = "videomme" if s["meta"]["video_id"] == "vid.a" else "plain"
                assert s["meta"]["prompt_template"] == template  # what the cache entry recorded
                assert s["meta"]["query_text"] == render_query(*QUESTIONS[(s["meta"]["video_id"], s["meta"]["query_id"])], template)
    summary = json.loads((tmp_path / "shards.summary.json").read_text())
    assert summary["failures"] == 0 and summary["counts"]["unannotated"] == 1 and summary["counts"]["not_in_manifest"] == 1
    assert summary["bytes_written"] > 0
    # Re-run: complete sets are skipped and their bytes stay as they were.
    before = {p: p.read_bytes() for p in out.rglob("*.tar")}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run_cli(*args) == 0
    assert "already complete, skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    # --force rewrites: identical bytes (deterministic).
    assert run_cli(*args, "--force") == 0
    assert {p: p.read_bytes() for p in out.rglob("*.tar")} == before


def test_build_shards_job_dead_letters_and_retry(tmp_path, monkeypatch, capsys):
    import pipelines.build_shards as job

    cache, manifest, _ = build_cache(tmp_path)
    out = tmp_path / "shards"
    args = ["--cache", cache, "--manifest", manifest, "--budgets", "30", "--policies", "topk", "--out", str(out)]
    real_build = job.build_sample

    def flaky(entry, planned, **kw):
        if planned.video_id == "c":
            raise ShardFormatError("simulated bad entry", item=planned.key)
        return real_build(entry, planned, **kw)

    monkeypatch.setattr(job, "build_sample", flaky)
    assert run_cli(*args) == 1
    letters = [json.loads(line) for line in (tmp_path / "shards.deadletter.jsonl").read_text().splitlines()]
    assert [(d["video_id"], d["query_id"], d["stage"], d["code"]) for d in letters] == [("c", "q1", "pack", "shard_format")]
    doc = read_index(str(out / "30-topk"))
    assert doc["total_samples"] == 2 and doc["failed"] == [sample_key("c", "q1")]
    # Fixed and re-run: the shard with the failure is redone, the set is complete.
    monkeypatch.setattr(job, "build_sample", real_build)
    capsys.readouterr()
    assert run_cli(*args) == 0
    doc = read_index(str(out / "30-topk"))
    assert doc["total_samples"] == 3 and doc["failed"] == []
    assert (tmp_path / "shards.deadletter.jsonl").read_text() == ""


def test_build_shards_job_rejects_bad_config(tmp_path, capsys):
    cache, manifest, _ = build_cache(tmp_path)
    base = ["--cache", cache, "--manifest", manifest, "--out", str(tmp_path / "o")]
    assert run_cli(*base, "--policies", "ata,bogus") == 2
    assert "config_error" in capsys.readouterr().err
    assert run_cli(*base, "--budgets", "10,-5") == 2
    assert run_cli(*base, "--budgets", "ten") == 2


def test_tar_bytes_equal_stdlib_tarfile_output(tmp_path):
    # Our direct writer must produce exactly what tarfile writes for the same members.
    samples = [("a~~q", {"tokens.npy": b"x" * 700, "meta.json": b"{}"}), ("b" * 150 + "~~q", {"alloc.npy": b"y" * 512})]
    ours = io.BytesIO()
    write_tar(ours, samples)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for name in sorted(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(members[name]), FIXED_MTIME, 0o644, "", ""
                tar.addfile(info, io.BytesIO(members[name]))
    assert ours.getvalue() == ref.getvalue()


from tests.gcs_emulator import gcs_server  # noqa: E402,F401  (module-scoped fixture)


def test_shards_on_gcs_emulator(gcs_server):  # noqa: F811
    # Object store path: written in place, completion record after, index last; read via fsspec.
    gcs_server.create_bucket("shards")
    opts = gcs_server.storage_options
    _, planned, by_key = make_samples(3)
    url = "gs://shards/run1/40-ata"
    plan = plan_shard_set("40-ata", 40, "ata", planned, 10**9)
    keys = plan.tasks[0].keys
    with pytest.raises(RuntimeError):  # a crash leaves no completion record
        write_shard(url, 0, sample_stream(planned, by_key, fail_after=1), planned_keys=keys, storage_options=opts)
    assert read_completion(url, 0, storage_options=opts) is None
    rec = write_shard(url, 0, sample_stream(planned, by_key), planned_keys=keys, storage_options=opts)
    assert shard_done(url, 0, keys, storage_options=opts)
    assert cleanup_partials(url, storage_options=opts) == []
    write_index(url, make_index(plan, [rec], pack_mode="head", cache_fingerprint="fp"), storage_options=opts)
    assert shard_set_complete(url, plan.plan_sha256, storage_options=opts)
    got = list(shard_dataset(url, storage_options=opts))
    assert [s["__key__"] for s in got] == keys
    e = by_key[keys[0]]
    assert np.array_equal(got[0]["tokens"], pack(e, np.array(planned[0].allocation), e.timestamps).tokens)


# --------------------------------------------------------------------------- integrity (cache v2, tar sha256)
def test_shard_dataset_verifies_each_tar_while_streaming(tmp_path):
    from tempo_ops.errors import ShardCorrupt

    url, plan, planned, _ = write_set(tmp_path, n=3)
    tar = Path(url) / read_index(url)["shards"][1]["name"]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01  # inside the first member's payload
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardCorrupt, match="sha256"):
        list(shard_dataset(url))
    assert len(list(shard_dataset(url, verify=False))) == 3  # opt-out: served unchecked
    with pytest.raises(ShardCorrupt, match="sha256"):  # plain tar URLs: checked against their completion record
        list(shard_dataset([str(tar)]))


def test_rerun_rewrites_broken_truncated_and_missing_tars(tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    cache, manifest, _ = build_cache(tmp_path)
    out = tmp_path / "shards"
    args = ["--cache", cache, "--manifest", manifest, "--budgets", "20", "--out", str(out), "--shard-size-mb", "0.0001"]
    assert run_cli(*args) == 0
    tars = sorted((out / "20-ata").glob("*.tar"))
    good = {p.name: p.read_bytes() for p in tars}
    data = bytearray(good[tars[0].name])
    data[600] ^= 0xFF
    tars[0].write_bytes(bytes(data))  # flipped
    tars[1].write_bytes(good[tars[1].name][:1000])  # truncated
    tars[2].unlink()  # missing
    capsys.readouterr()
    assert main(["verify", "--shards", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "0/3 shards intact" in printed and printed.count("BROKEN") == 3
    assert run_cli(*args) == 0
    assert "already complete" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in sorted((out / "20-ata").glob("*.tar"))} == good
    assert main(["verify", "--shards", str(out / "20-ata"), "--json"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # a relative directory of shard sets
    assert main(["verify", "--shards", "shards"]) == 0
    assert f"{out / '20-ata'}: 3/3 shards intact" in capsys.readouterr().out
    fs_mem = "memory://verify-sets"  # a URL with a scheme keeps it
    mem = fsspec.filesystem("memory")
    for p in sorted((out / "20-ata").iterdir()):
        mem.pipe(f"/verify-sets/20-ata/{p.name}", p.read_bytes())
    assert main(["verify", "--shards", fs_mem]) == 0
    assert "memory:///verify-sets/20-ata: 3/3 shards intact" in capsys.readouterr().out


def test_corrupt_unreadable_and_mismatched_entries_are_dead_letters(tmp_path, capsys):
    from schemas import cache_layout as L

    cache, manifest, raw = build_cache(tmp_path)
    attrs = json.loads((Path(cache) / L.metadata_key(L.entry_path("vid.a", "q1"))).read_text())["attributes"]
    shard = Path(cache) / L.candidates_shard_key("vid.a", "q1", 0, attrs["version"])
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x40  # a candidates byte of segment 0
    shard.write_bytes(bytes(data))
    (Path(cache) / L.metadata_key(L.entry_path("c", "q1"))).write_text("{torn")
    lines = [json.loads(x) for x in Path(manifest).read_text().splitlines()]
    lines[1]["queries"][0]["text"] = "Colour now?"  # differs from what vid/b/q1 was computed for
    Path(manifest).write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "shards"
    assert run_cli("--cache", cache, "--manifest", manifest, "--budgets", "200", "--out", str(out)) == 1
    letters = [json.loads(x) for x in (tmp_path / "shards.deadletter.jsonl").read_text().splitlines()]
    by_code = sorted((d["video_id"], d["code"]) for d in letters)
    assert by_code == [("vid.a", "cache_corrupt"), ("vid/b", "entry_inputs_mismatch"), ("videos/c/queries/q1", "cache_corrupt")]
    summary = json.loads((tmp_path / "shards.summary.json").read_text())
    assert summary["counts"]["unreadable"] == 1 and summary["failures"] == 3
    assert read_index(str(out / "200-ata"))["total_samples"] == 0  # nothing corrupt reaches a shard




def test_sigterm_ends_tempo_shards_with_an_interrupted_summary_and_the_rerun_completes(tmp_path):
    """SIGTERM while shards are written: exit 143, one line, a partial summary; the re-run keeps the
    shard that landed, writes the rest, and the sets equal an uninterrupted run's, byte for byte."""
    from tests.test_job_signals import _run_until, slow_after_first_call

    cache, manifest, _ = build_cache(tmp_path)
    common = ["--cache", cache, "--manifest", manifest, "--budgets", "20", "--shard-size-mb", "0.0001"]
    assert run_cli(*common, "--out", str(tmp_path / "ref")) == 0
    out = tmp_path / "shards"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TEMPO_PROGRESS_INTERVAL_S="0", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-c", slow_after_first_call("pipelines.build_shards", "write_shard"), "shards", *common, "--out", str(out), "--local_workers", "1"]
    rc, err = _run_until(cmd, "shards 1/", signal.SIGTERM, env)
    assert rc == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "tempo shards: interrupted by SIGTERM; completed work is kept, re-run to resume"
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    landed = sorted(p.name for p in (out / "20-ata").glob("*.tar"))
    assert len(landed) == 1 and not (out / "20-ata" / "index.json").exists()

    assert run_cli(*common, "--out", str(out)) == 0
    done = json.loads(Path(f"{out}.summary.json").read_text())
    assert done["status"] == "complete"
    ref = {p.name: p.read_bytes() for p in sorted((tmp_path / "ref" / "20-ata").iterdir())}
    got = {p.name: p.read_bytes() for p in sorted((out / "20-ata").iterdir())}
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref if k.endswith(".tar"))
    assert subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", "--shards", str(out)], cwd=repo, env=env).returncode == 0
