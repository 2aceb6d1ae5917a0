"""The segment index: ``tempo index``, ``tempo compress --from-index``, the index store (tiny models)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli import main as tempo
from tempo_ops.synthetic import write_test_video

REPO = Path(__file__).resolve().parents[1]
CAND_TOL, REL_TOL = 1e-4, 1e-5  # float32 parity: from the index vs from the video


def _jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("index_corpus")
    # 41 frames at 2 fps, all sampled: 5 segments of 8 frames + a trailing one-frame segment.
    write_test_video(root / "a.mp4", n_frames=41, fps=2, width=64, height=48, gop=8)
    write_test_video(root / "b.mp4", n_frames=40, fps=10, width=80, height=64)  # 8 sampled frames: 1 segment
    archive = _jsonl(root / "archive.jsonl", [{"video_id": "a", "uri": "a.mp4"}, {"video_id": "b/c", "uri": "b.mp4"}])
    only_missing = _jsonl(root / "only_missing.jsonl", [{"video_id": "zz", "uri": "b.mp4", "queries": [{"query_id": "q1", "text": "Count the blocks."}]}])
    short = _jsonl(root / "short.jsonl", [{"video_id": "b/c", "uri": "b.mp4"}])
    later = _jsonl(
        root / "later.jsonl",
        [
            {"video_id": "a", "uri": "a.mp4", "queries": [{"query_id": "q1", "text": "What moves?"}, {"query_id": "q2", "text": "Which colour?"}]},
            {"video_id": "b/c", "uri": "b.mp4", "queries": [{"query_id": "q1", "text": "Count the blocks."}]},
            {"video_id": "zz", "uri": "b.mp4", "queries": [{"query_id": "q1", "text": "Count the blocks."}]},  # not indexed
        ],
    )
    return {"root": root, "archive": archive, "later": later, "only_missing": only_missing, "short": short}


def _model_args(models: dict) -> list[str]:
    return ["--svlm", models["svlm"], "--compressor", models["tempo"]]


def _index_args(corpus: dict, models: dict) -> list[str]:
    """Float32 index of the archive in units of 2 segments (video a: 3 units, b/c: 1)."""
    return ["index", "--manifest", str(corpus["archive"]), "--index-dtype", "float32", "--unit-segments", "2", *_model_args(models)]


@pytest.fixture(scope="module")
def indexed(tiny_models, corpus, tmp_path_factory) -> dict:
    """The archive indexed in float32; the later queries compressed from the index and, for
    reference, from the video."""
    out = tmp_path_factory.mktemp("index_runs")
    index = out / "index.zarr"
    rc_index = tempo([*_index_args(corpus, tiny_models), "--index", str(index)])
    from_index, from_video = out / "from_index.zarr", out / "from_video.zarr"
    rc_from_index = tempo(["compress", "--from-index", str(index), "--manifest", str(corpus["later"]), "--cache", str(from_index), *_model_args(tiny_models)])
    rc_from_video = tempo(["compress", "--manifest", str(corpus["later"]), "--cache", str(from_video), *_model_args(tiny_models)])
    return {
        "index": index, "from_index": from_index, "from_video": from_video,
        "rc": (rc_index, rc_from_index, rc_from_video),
    }


def _summary(url: Path) -> dict:
    return json.loads(Path(str(url) + ".summary.json").read_text())


def _dead_letters(url: Path) -> list[dict]:
    path = Path(str(url) + ".deadletter.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_index_job_indexes_every_video(indexed):
    from tempo_ops.index_store import IndexReader

    assert indexed["rc"][0] == 0
    reader = IndexReader(str(indexed["index"]))
    assert reader.video_ids() == ["a", "b/c"]
    assert reader.stored_dtype == "float32"
    a = reader.video("a")
    assert a.n_segments == 6 and a.n_units == 3 and a.timestamp_texts[0] == "<2.0 seconds>"
    feats = a.features()
    assert [f.start_position for f in feats] == [0, 8, 16, 24, 32, 40]
    assert feats[-1].grid.tolist()[0] == 1  # the one-frame segment, padded to 2 frames: one temporal group
    assert all(f.visual.dtype == torch.float32 and f.deepstack.shape[1:] == f.visual.shape for f in feats)
    s = _summary(indexed["index"])
    assert s["job"] == "index" and s["failures"]["items"] == 0
    assert s["counts"]["videos_completed"] == 2 and s["counts"]["segments_encoded"] == 7
    assert s["fingerprint"] == reader.fingerprint


def test_compress_from_index_equals_compress_from_video(indexed):
    from tempo_ops.store import CacheReader

    assert indexed["rc"][1:] == (1, 0)  # the video missing from the index is dead-lettered
    got, ref = CacheReader(str(indexed["from_index"])), CacheReader(str(indexed["from_video"]))
    assert got.fingerprint == ref.fingerprint  # the two paths fill interchangeable caches
    assert got.entries() == [("a", "q1"), ("a", "q2"), ("b/c", "q1")]
    for vid, qid in got.entries():
        e, r = got.entry(vid, qid), ref.entry(vid, qid)
        np.testing.assert_allclose(e.read_all().astype(np.float32), r.read_all().astype(np.float32), atol=CAND_TOL, rtol=0)
        np.testing.assert_allclose(e.relevance(), r.relevance(), atol=REL_TOL, rtol=0)
        assert got.video_meta(vid) == ref.video_meta(vid)
    (letter,) = _dead_letters(indexed["from_index"])
    assert (letter["video_id"], letter["query_id"], letter["stage"], letter["code"]) == ("zz", None, "index", "video_not_indexed")
    counts = _summary(indexed["from_index"])["counts"]
    assert counts.get("segments_decoded", 0) == 0 and counts["segments_read_from_index"] == 7  # no video decoded
    assert counts["videos_from_index"] == 2


def test_parity_in_float32_several_queries_and_a_one_frame_segment(indexed, tiny_models, corpus):
    """The compressor's outputs themselves (no float16 cache in between)."""
    from tempo_ops import video
    from tempo_ops.index_store import IndexReader
    from tempo_ops.svlm.compressor import Compressor

    comp = Compressor.from_pretrained(tiny_models["svlm"], memory_tokens=tiny_models["tempo"], device="cpu")
    queries = ["What moves?", "", "Is the trailing frame red?"]
    segments = list(video.iter_segments(str(corpus["root"] / "a.mp4"), video.SamplingConfig()))
    assert segments[-1].frames.shape[0] == 2 and segments[-1].frame_indices == [40, 40]  # one frame, padded
    stored = IndexReader(str(indexed["index"])).video("a").features()
    for f, g in zip(stored, comp.encode_segments(segments), strict=True):
        assert torch.equal(f.input_ids, g.input_ids) and torch.equal(f.grid, g.grid)
        assert torch.equal(f.visual, g.visual.float()) and torch.equal(f.deepstack, g.deepstack.float())
    direct = comp.compress(segments, queries)
    from_index = comp.compress_from_features(stored, queries)
    assert from_index.candidates.shape == direct.candidates.shape == (3, 6, 128, 64)
    assert np.abs(from_index.candidates - direct.candidates).max() <= CAND_TOL
    assert np.abs(from_index.relevance - direct.relevance).max() <= REL_TOL


def test_generic_entries_written_in_the_same_pass(tiny_models, corpus, tmp_path):
    from tempo_ops import video
    from tempo_ops.index_store import IndexReader
    from tempo_ops.store import CacheReader
    from tempo_ops.svlm.compressor import Compressor

    index, generic = tmp_path / "index.zarr", tmp_path / "generic.zarr"
    args = ["index", "--manifest", str(corpus["short"]), "--index", str(index), "--cache", str(generic)]
    assert tempo([*args, *_model_args(tiny_models)]) == 0
    assert IndexReader(str(index)).video_ids() == ["b/c"] and IndexReader(str(index)).stored_dtype == "bfloat16"
    cache = CacheReader(str(generic))
    assert cache.entries() == [("b/c", "_generic")]
    comp = Compressor.from_pretrained(tiny_models["svlm"], memory_tokens=tiny_models["tempo"], device="cpu")
    segments = list(video.iter_segments(str(corpus["root"] / "b.mp4"), video.SamplingConfig()))
    direct = comp.compress(segments, [""])
    entry = cache.entry("b/c", "_generic")
    np.testing.assert_allclose(entry.read_all().astype(np.float32), direct.candidates[0], atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(entry.relevance(), direct.relevance[0], atol=REL_TOL)


def test_fallback_video_compresses_what_the_index_lacks(indexed, tiny_models, corpus, tmp_path):
    from tempo_ops.store import CacheReader

    cache = tmp_path / "fallback.zarr"
    args = ["compress", "--from-index", str(indexed["index"]), "--fallback-video", "--manifest", str(corpus["only_missing"]), "--cache", str(cache)]
    assert tempo([*args, *_model_args(tiny_models)]) == 0
    got, ref = CacheReader(str(cache)), CacheReader(str(indexed["from_video"]))
    assert got.entries() == [("zz", "q1")]
    np.testing.assert_array_equal(got.entry("zz", "q1").read_all(), ref.entry("zz", "q1").read_all())
    counts = _summary(cache)["counts"]
    assert counts["segments_decoded"] == 1 and counts.get("segments_read_from_index", 0) == 0


def _entry_attrs(cache: Path, video_id: str, query_id: str) -> dict:
    from schemas import cache_layout as L

    return json.loads((cache / L.metadata_key(L.entry_path(video_id, query_id))).read_text())["attributes"]


def _flip_relevance(cache: Path, video_id: str, query_id: str) -> None:
    """Flip one byte of the entry's first relevance chunk (its crc32c then fails)."""
    from schemas import cache_layout as L

    version = _entry_attrs(cache, video_id, query_id)[L.ENTRY_VERSION]
    path = cache / L.relevance_chunk_key(video_id, query_id, 0, version)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_from_index_entries_carry_identity_checksums_and_repair(indexed, tiny_models, corpus, tmp_path):
    """compress --from-index plans through the cache's v2 planning: entries are versioned and
    record the video identity the index recorded (so a from-video run finds them complete), a
    corrupt one is dead-lettered (cache_corrupt), --repair recomputes it to the same values."""
    import shutil

    from schemas import cache_layout as L
    from schemas.index_layout import split_identity
    from tempo_ops.index_store import IndexReader
    from tempo_ops.store import CacheReader

    cache = tmp_path / "cache.zarr"
    shutil.copytree(indexed["from_index"], cache)
    reader = CacheReader(str(cache))
    assert reader.layout_version == L.LAYOUT_VERSION == 2 and reader.storage_form == "float16"  # float32 model
    _, recorded = split_identity(IndexReader(str(indexed["index"])).video("a").meta)
    assert recorded["size"] == (corpus["root"] / "a.mp4").stat().st_size
    attrs = _entry_attrs(cache, "a", "q1")
    assert attrs[L.ENTRY_INPUTS]["video"] == recorded and attrs[L.ENTRY_INPUTS]["fingerprint"] == reader.fingerprint
    assert (cache / L.data_path("a", "q1", attrs[L.ENTRY_VERSION])).is_dir()
    assert "video_identity" not in reader.video_meta("a")  # the cache's video record is the plain one

    model = _model_args(tiny_models)
    assert tempo(["compress", "--manifest", str(corpus["later"]), "--cache", str(cache), *model]) == 0  # from the video
    c = _summary(cache)["counts"]
    assert (c["queries_skipped_complete"], c["queries_completed"], c.get("queries_stale_recomputed", 0)) == (3, 1, 0)

    before = reader.entry("a", "q1").read_all()
    _flip_relevance(cache, "a", "q1")
    from_index = ["compress", "--from-index", str(indexed["index"]), "--manifest", str(corpus["later"]), "--cache", str(cache), *model]
    assert tempo(from_index) == 1
    (letter,) = [d for d in _dead_letters(cache) if d["code"] == "cache_corrupt"]
    assert (letter["video_id"], letter["query_id"], letter["stage"]) == ("a", "q1", "verify")
    c = _summary(cache)["counts"]
    assert c["queries_corrupt_dead_lettered"] == 1 and c["queries_skipped_complete"] == 3  # zz: complete, not indexed
    assert tempo([*from_index, "--repair"]) == 0
    c = _summary(cache)["counts"]
    assert (c["queries_corrupt_repaired"], c["queries_completed"], c["queries_skipped_complete"]) == (1, 1, 3)
    repaired = CacheReader(str(cache)).entry("a", "q1")
    # The repair computes a/q1 alone, the first run with a/q2 in the same batch: float32 GEMMs may
    # round differently with the batch size on some CPUs, so stored float16 values may differ by an ulp.
    np.testing.assert_allclose(repaired.read_all(), before, rtol=2e-3, atol=1e-3)
    assert repaired.verify(full=True) == []


def test_index_cache_entries_get_storage_forms_and_integrity(tiny_models, corpus, tmp_path, capsys):
    """`tempo index --cache` writes its _generic entries through the same v2 planning:
    --storage-form, identity, corrupt entries dead-lettered on a re-run, --force recomputes."""
    from schemas import cache_layout as L
    from tempo_ops.store import CacheReader

    index, cache = tmp_path / "index.zarr", tmp_path / "generic.zarr"
    args = ["index", "--manifest", str(corpus["short"]), "--index", str(index), "--cache", str(cache), *_model_args(tiny_models)]
    assert tempo([*args, "--storage-form", "bfloat16"]) == 0
    reader = CacheReader(str(cache))
    assert reader.storage_form == "bfloat16" and reader.entries() == [("b/c", "_generic")]
    attrs = _entry_attrs(cache, "b/c", "_generic")
    assert attrs[L.ENTRY_INPUTS]["video"]["size"] == (corpus["root"] / "b.mp4").stat().st_size
    assert reader.entry("b/c", "_generic").verify(full=True) == []

    assert tempo(args) == 0  # complete: index and entry skipped
    assert _summary(index)["counts"]["videos_skipped_complete"] == 1
    _flip_relevance(cache, "b/c", "_generic")
    assert tempo(args) == 1
    (letter,) = _dead_letters(index)
    assert (letter["video_id"], letter["query_id"], letter["stage"], letter["code"]) == ("b/c", "_generic", "verify", "cache_corrupt")
    assert tempo([*args, "--force"]) == 0
    assert CacheReader(str(cache)).entry("b/c", "_generic").verify(full=True) == []
    capsys.readouterr()
    assert tempo([*args, "--storage-form", "int8"]) == 2  # an existing cache keeps its own form
    assert "stores bfloat16" in capsys.readouterr().err


def _index_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _strip_times(doc: bytes) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith("_at") and k != "tempo_ops_version"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(doc))


def test_sigkill_then_resume_is_exactly_once(indexed, tiny_models, corpus, tmp_path):
    args = _index_args(corpus, tiny_models)
    reference = indexed["index"]  # the uninterrupted run
    index = tmp_path / "index.zarr"
    cmd = [sys.executable, "-m", "pipelines.cli", *args, "--index", str(index)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TEMPO_PROGRESS_INTERVAL_S="0")
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stderr:
            if "units 2/" in line:  # 2 of the 4 units (3 of video a, 1 of b/c) have landed
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed part-way"

    assert tempo([*args, "--index", str(index)]) == 0
    counts = _summary(index)["counts"]
    assert counts["units_skipped_landed"] >= 1  # landed units were not recomputed
    assert counts["units_planned"] + counts["units_skipped_landed"] == 4
    assert counts["videos_completed"] == 2

    ref_files, got_files = _index_files(reference), _index_files(index)
    assert sorted(ref_files) == sorted(got_files)
    for name, data in ref_files.items():
        if name.endswith("zarr.json"):
            assert _strip_times(data) == _strip_times(got_files[name]), name
        else:
            assert data == got_files[name], name  # every unit written once, byte-identical

    # A third run finds everything complete and writes nothing.
    assert tempo([*args, "--index", str(index)]) == 0
    assert _summary(index)["counts"]["videos_skipped_complete"] == 2


def test_bfloat16_storage_is_lossless_for_bf16_values():
    from tempo_ops.index_store import from_stored, to_stored

    x = torch.randn(5, 7, dtype=torch.float32)
    bits = to_stored(x.to(torch.bfloat16), "bfloat16")
    assert bits.dtype == np.uint16 and bits.shape == (5, 7)
    assert torch.equal(from_stored(bits, "bfloat16"), x.to(torch.bfloat16))
    assert torch.equal(from_stored(to_stored(x, "bfloat16"), "bfloat16"), x.to(torch.bfloat16))  # round to nearest even
    assert torch.equal(from_stored(to_stored(x, "float32"), "float32"), x)


def test_layout_version_fingerprint_and_svlm_checks(indexed, tmp_path):
    from pipelines.compress import index_sampling
    from schemas import index_layout
    from tempo_ops.errors import CacheLayoutError, FingerprintMismatch, IndexMismatch, VideoNotIndexed
    from tempo_ops.index_store import IndexReader, IndexWriter

    with pytest.raises(CacheLayoutError, match="not a Tempo segment index"):
        IndexReader(str(indexed["from_video"]))  # a token cache is not an index
    with pytest.raises(CacheLayoutError):
        IndexReader(str(tmp_path / "nothing.zarr"))
    reader = IndexReader(str(indexed["index"]))
    with pytest.raises(VideoNotIndexed) as info:
        reader.video("zz")
    assert info.value.code == "video_not_indexed"
    other = dict(reader.config, stored_dtype="bfloat16")
    with pytest.raises(FingerprintMismatch) as mismatch:
        IndexWriter.open(str(indexed["index"]), other, deepstack_layers=1)
    assert mismatch.value.details["fields"] == ["stored_dtype"]

    fp = {**reader.config["svlm"], "memory_tokens_sha256": "any"}  # memory tokens do not matter
    assert index_sampling(str(indexed["index"]), fp).to_dict() == reader.config["sampling"]
    with pytest.raises(IndexMismatch, match="svlm_weights_sha256"):
        index_sampling(str(indexed["index"]), {**fp, "svlm_weights_sha256": "0" * 64})

    # A newer layout is refused by every reader.
    root = json.loads((indexed["index"] / "zarr.json").read_text())
    root["attributes"]["layout_version"] = index_layout.LAYOUT_VERSION + 1
    copy = tmp_path / "future.zarr"
    copy.mkdir()
    (copy / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(CacheLayoutError, match="layout_version"):
        IndexReader(str(copy))


def test_index_root_checks_are_the_caches(indexed, tmp_path):
    """The index shares the cache's root opener and check: a damaged root is refused and never
    rewritten, a root lost beside indexed videos is not recreated, only its own version is read."""
    import shutil

    from schemas import cache_layout, index_layout
    from tempo_ops.errors import CacheLayoutError
    from tempo_ops.index_store import IndexReader, IndexWriter

    reader = IndexReader(str(indexed["index"]))
    copy = tmp_path / "copy.zarr"
    shutil.copytree(indexed["index"], copy)
    root = copy / "zarr.json"
    good = root.read_text()
    root.write_text(good[:40])
    with pytest.raises(CacheLayoutError, match="damaged"):
        IndexWriter.open(str(copy), reader.config, deepstack_layers=1)
    assert root.read_text() == good[:40]
    root.unlink()
    with pytest.raises(CacheLayoutError, match="holds videos"):
        IndexWriter.open(str(copy), reader.config, deepstack_layers=1)
    assert not root.exists()

    attrs = json.loads(good)["attributes"]
    assert index_layout.check_layout(attrs, "i")[index_layout.ROOT_LAYOUT_VERSION] == 2
    assert index_layout.check_layout({**attrs, "layout_version": 1}, "i")[index_layout.ROOT_LAYOUT_VERSION] == 1
    with pytest.raises(CacheLayoutError, match=r"this code reads \[1, 2\]"):
        index_layout.check_layout({**attrs, "layout_version": 3}, "i")
    cache_root = json.loads((indexed["from_index"] / "zarr.json").read_text())["attributes"]
    assert cache_layout.check_layout(cache_root, "c")["storage_form"] == "float16"
    with pytest.raises(CacheLayoutError, match="'storage_form' is missing"):
        cache_layout.check_layout({k: v for k, v in cache_root.items() if k != "storage_form"}, "c")
    v1 = {k: v for k, v in cache_root.items() if k != "storage_form"}
    assert cache_layout.storage_form(cache_layout.check_layout({**v1, "layout_version": 1}, "c")) == "float16"


def test_incomplete_video_is_not_served(indexed, tmp_path):
    import shutil

    from tempo_ops.errors import VideoNotIndexed
    from tempo_ops.index_store import IndexReader

    copy = tmp_path / "copy.zarr"
    shutil.copytree(indexed["index"], copy)
    meta = copy / "videos" / "a" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["complete"]
    meta.write_text(json.dumps(doc))
    reader = IndexReader(str(copy))
    assert reader.video_ids() == ["b/c"]
    with pytest.raises(VideoNotIndexed, match="incomplete"):
        reader.video("a")


def test_ask_on_the_demo_corpus(tiny_models, tmp_path, capsys):
    """Index the demo corpus's first video, then ask a new multiple-choice question twice."""
    from tempo_ops.allocation import allocate
    from tempo_ops.ask import ask_query_id
    from tempo_ops.index_store import IndexReader
    from tempo_ops.query_text import render_query
    from tempo_ops.store import CacheReader
    from tempo_ops.synthetic import write_sample_corpus

    manifest = write_sample_corpus(tmp_path / "corpus")
    index, cache = tmp_path / "index.zarr", tmp_path / "cache.zarr"
    assert tempo(["index", "--manifest", manifest, "--limit", "1", "--index", str(index), "--cache", str(cache), *_model_args(tiny_models)]) == 0
    indexed = IndexReader(str(index)).video("kitchen_short")
    question, options = "Which colour is the largest block?", ["A. red", "B. green", "C. blue"]
    ask = [
        "ask", "--index", str(index), "--cache", str(cache), "--video", "kitchen_short", "--question", question,
        "--options", *options, "--prompt-template", "videomme", "--llm", tiny_models["tempo"], "--svlm", tiny_models["svlm"],
        "--budget", "64", "--json",
    ]
    capsys.readouterr()
    assert tempo(ask) == 0
    first = json.loads(capsys.readouterr().out)
    context = render_query(question, options, "videomme")
    assert first["context"] == context and first["query_id"] == ask_query_id(context)
    assert first["compressed_from_index"] is True
    entry = CacheReader(str(cache)).entry("kitchen_short", first["query_id"])  # written for reuse
    assert entry.query_text == context and entry.n_segments == indexed.n_segments == first["n_segments"]
    assert entry.verify(full=True) == []  # the v2 writer: every chunk has its crc32c
    inputs = _entry_attrs(cache, "kitchen_short", first["query_id"])["inputs"]
    assert inputs["query_text"] == context and inputs["video"] == indexed.meta["video_identity"]
    assert first["allocation"] == allocate(entry.relevance(), 64, policy="ata").tolist()
    assert first["tokens_allocated"] == sum(first["allocation"]) <= 64
    assert first["parsed"] is None or first["parsed"] in "ABC"
    assert first["rule"] == "mc" and isinstance(first["answer"], str)
    tops = first["top_segments"]
    assert tops and [t["tokens"] for t in tops] == sorted((t["tokens"] for t in tops), reverse=True)
    assert all(t["timestamp_s"] == indexed.timestamps[t["segment"]] for t in tops)

    assert tempo(ask) == 0  # the same question again: the cached entry is reused, same answer
    second = json.loads(capsys.readouterr().out)
    assert second["compressed_from_index"] is False
    assert {k: second[k] for k in ("answer", "parsed", "allocation")} == {k: first[k] for k in ("answer", "parsed", "allocation")}

    text = [a for a in ask if a != "--json"]
    assert tempo(text) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "\nparsed option: " in out and "top segments by allocated tokens:" in out
    assert indexed.timestamp_texts[tops[0]["segment"]] in out.split("top segments by allocated tokens:")[1]

    missing = [*ask]
    missing[missing.index("kitchen_short")] = "street_walk"  # not indexed (--limit 1)
    assert tempo(missing) == 2
    assert "error [video_not_indexed]" in capsys.readouterr().err


def test_index_job_shares_compress_job_behaviour(tiny_models, corpus, tmp_path, capsys):
    """Leases (a unit another live run holds is left to it), --limit, run history: the
    skeleton in pipelines/units.py gives `tempo index` what `tempo compress` does."""
    import socket
    import time

    from tempo_ops import leases
    from tempo_ops.index_store import IndexReader

    index = tmp_path / "index.zarr"
    url = Path(leases.lease_url(str(index), "b/c", 0))
    url.parent.mkdir(parents=True)
    other = {"run_id": "other-run", "host": socket.gethostname(), "pid": os.getpid(), "expires_at": time.time() + 600}
    url.write_text(json.dumps(other))
    args = [*_index_args(corpus, tiny_models), "--index", str(index)]
    assert tempo(args) == 0  # nothing failed: b/c's only unit is the other run's
    err = capsys.readouterr().err
    assert "[index] another run (other-run" in err and "1 video(s) are left for it" in err
    s = _summary(index)
    c = s["counts"]
    assert (c["units_held_elsewhere"], c["videos_left_to_other_run"], c["videos_completed"]) == (1, 1, 1)
    assert s["status"] == "complete" and (tmp_path / "index.zarr.runs" / f"{s['run_id']}.summary.json").exists()
    assert IndexReader(str(index)).video_ids() == ["a"]
    assert [p.name for p in Path(str(index) + ".leases").rglob("*.json")] == ["000000.json"]  # ours released

    url.write_text(json.dumps(dict(other, pid=2**22 + 12345)))  # beyond pid_max: a dead run's lease is taken over
    assert tempo([*args, "--limit", "1"]) == 0  # only the first entry (a, complete) is read: b/c stays left
    assert _summary(index)["counts"]["videos_skipped_complete"] == 1 and IndexReader(str(index)).video_ids() == ["a"]
    assert tempo(args) == 0
    c = _summary(index)["counts"]
    assert (c.get("units_held_elsewhere", 0), c["videos_completed"], c["videos_skipped_complete"]) == (0, 1, 1)
    assert IndexReader(str(index)).video_ids() == ["a", "b/c"]
    assert not Path(str(index) + ".leases").exists()


def test_index_chunks_are_checksummed_and_damage_becomes_a_dead_letter(indexed, tiny_models, corpus, tmp_path):
    """Layout 2: a flipped byte or a deleted chunk of a unit raises CacheCorrupt naming the unit
    (never zeros or wrong features); compress --from-index dead-letters that video and goes on."""
    import shutil

    import zarr

    from schemas import index_layout as IL
    from tempo_ops.errors import CacheCorrupt
    from tempo_ops.index_store import IndexReader

    copy = tmp_path / "damaged.zarr"
    shutil.copytree(indexed["index"], copy)
    assert IndexReader(str(copy)).root_attrs["layout_version"] == IL.LAYOUT_VERSION == 2
    unit0 = IL.unit_path("a", 0)
    codecs = json.loads((copy / unit0 / "visual" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs][-1] == "crc32c"  # plain zarr verifies it too
    good = IndexReader(str(copy)).video("a").features()
    chunk = copy / unit0 / "visual" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CacheCorrupt, match="crc32c") as info:
        IndexReader(str(copy)).video("a").features()
    assert info.value.item == "a unit 0" and info.value.code == "cache_corrupt"
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(str(copy), mode="r")[f"{unit0}/visual"][1]
    # segments of other units are still served, and equal what was written
    later = IndexReader(str(copy)).video("a").features(2, 4)
    assert all(torch.equal(x.visual, y.visual) for x, y in zip(later, good[2:4]))
    (copy / IL.unit_path("a", 1) / "deepstack" / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(CacheCorrupt, match="missing") as info:
        IndexReader(str(copy)).video("a").features(2, 4)
    assert info.value.item == "a unit 1"

    cache = tmp_path / "from_damaged.zarr"
    rc = tempo(["compress", "--from-index", str(copy), "--manifest", str(corpus["later"]), "--cache", str(cache), *_model_args(tiny_models)])
    assert rc != 0
    letters = _dead_letters(cache)
    assert {d["video_id"] for d in letters if d.get("code") == "cache_corrupt"} == {"a"}, letters
    from tempo_ops.store import CacheReader

    assert ("b/c", "q1") in CacheReader(str(cache)).entries()  # the rest of the job completed
