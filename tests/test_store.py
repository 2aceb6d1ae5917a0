"""Token cache: round trip, reads, validation, fingerprint, layout version, keys, interop."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store_support import (
    C,
    D,
    K,
    P,
    S,
    block_data,
    entry_version,
    make_config,
    make_meta,
    open_writer,
    write_entry,
)

from schemas import cache_layout as L
from tempo_ops.errors import (
    CacheLayoutError,
    CacheNotWritable,
    ConfigError,
    EntryIncomplete,
    EntryNotFound,
    FingerprintMismatch,
    Float16Overflow,
    InvalidCacheBlock,
    InvalidTokenRange,
)
from tempo_ops.fs import CountingStore, open_store
from tempo_ops.store import CacheReader, CacheWriter


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def test_round_trip_every_field(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "video-1", "q-a")
    write_entry(w, "video-1", "q-b")
    r = CacheReader(cache)
    assert r.layout_version == L.LAYOUT_VERSION
    assert r.config == make_config()
    assert r.fingerprint == L.config_fingerprint(make_config()) == w.fingerprint
    assert r.segments_per_shard == P == w.segments_per_shard
    assert r.video_ids() == ["video-1"]
    assert r.video_meta("video-1") == make_meta()
    assert r.entries() == [("video-1", "q-a"), ("video-1", "q-b")]
    for q in ("q-a", "q-b"):
        cand, rel = block_data("video-1", q)
        e = r.entry("video-1", q)
        assert (e.video_id, e.query_id, e.query_text) == ("video-1", q, f"question {q}?")
        assert (e.n_segments, e.K, e.D) == (S, K, D)
        assert e.timestamps == make_meta()["timestamps"]
        assert e.timestamp_texts == make_meta()["timestamp_texts"]
        assert e.timestamp_texts[1] == "<6.0 seconds>"  # (8*1+4)/2 fps
        np.testing.assert_array_equal(e.relevance(), rel)
        assert e.relevance().dtype == np.float32
        full = e.read_all()
        assert full.dtype == np.float16 and full.shape == (S, K, D)
        np.testing.assert_array_equal(full, _f16(cand))
        np.testing.assert_array_equal(e.read_all(method="zarr"), _f16(cand))
        assert e.direct


def test_read_token_ranges_direct_matches_zarr_and_reference(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "v", "q")
    cand, _ = block_data("v", "q")
    e = CacheReader(cache).entry("v", "q")
    rng = np.random.default_rng(1)
    for _ in range(5):
        starts = rng.integers(0, K + 1, S)
        stops = [int(rng.integers(a, K + 1)) for a in starts]
        ranges = list(zip(starts.tolist(), stops))
        direct = e.read_token_ranges(ranges, method="direct")
        plain = e.read_token_ranges(ranges, method="zarr")
        assert len(direct) == S
        for i, (a, b) in enumerate(ranges):
            assert direct[i].shape == (b - a, D) and direct[i].dtype == np.float16
            np.testing.assert_array_equal(direct[i], _f16(cand[i, a:b]))
            np.testing.assert_array_equal(plain[i], direct[i])
    heads = e.read_token_ranges([(0, k) for k in (0, 1, 3, 4, 5, 8, 16, 2, 0, 7)])
    assert heads[0].shape == (0, D) and heads[8].shape == (0, D)
    np.testing.assert_array_equal(heads[6], _f16(cand[6]))


def test_direct_read_touches_only_selected_bytes(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "v", "q")
    counting = CountingStore(open_store(cache, read_only=True), keep_log=True)
    e = CacheReader(cache, store=counting).entry("v", "q")
    counting.reset()
    ks = [1, 2, 3, 4, 5, 6, 7, 9, 11, 16]
    e.read_token_ranges([(0, k) for k in ks])
    # whole inner chunks (data + crc32c) holding the selected tokens: verifiable, nothing more
    selected = sum(-(-k // C) for k in ks) * (C * D * 2 + 4)
    index_bytes = 3 * L.shard_index_nbytes(P, K, C)
    assert counting.get_bytes == selected + index_bytes
    # one index read per shard plus at most one range per segment
    assert counting.get_requests <= 3 + S
    counting.reset()
    e.read_token_ranges([(0, k) for k in ks])  # shard indexes are cached
    assert counting.get_bytes == selected


def test_bad_token_ranges(cache: str) -> None:
    write_entry(open_writer(cache), "v", "q")
    e = CacheReader(cache).entry("v", "q")
    with pytest.raises(InvalidTokenRange, match="3 ranges given for 10"):
        e.read_token_ranges([(0, 1)] * 3)
    with pytest.raises(InvalidTokenRange, match="outside"):
        e.read_token_ranges([(0, K + 1)] * S)
    with pytest.raises(InvalidTokenRange, match="outside"):
        e.read_token_ranges([(3, 2)] * S)
    with pytest.raises(InvalidTokenRange, match="not a"):
        e.read_token_ranges([None] * S)
    with pytest.raises(InvalidTokenRange, match="method"):
        e.read_token_ranges([(0, 1)] * S, method="mmap")


def test_float16_overflow_rejected_before_writing(cache: str) -> None:
    w = open_writer(cache)
    w.write_video("v", make_meta())
    w.begin_entry("v", "q", "?", S)
    cand, rel = block_data("v", "q")
    # 65510 and -65519 round to ±65504 yet lie beyond it: refused too; float64 goes through numpy's cast
    for bad, dtype in [(70000.0, np.float32), (-65600.0, np.float32), (np.inf, np.float32), (np.nan, np.float32),
                       (65510.0, np.float32), (-65519.0, np.float32), (65510.0, np.float64), (-np.inf, np.float64)]:
        block = cand[:P].astype(dtype)
        block[2, 5, 7] = bad
        with pytest.raises(Float16Overflow, match="segment 2, token 5, channel 7") as info:
            w.write_block("v", "q", 0, block, rel[:P])
        assert info.value.item == "v/q" and info.value.code == "float16_overflow"
    ok = cand[:P].copy()
    ok[0, 0, 0] = 65504.0  # the largest float16 is fine
    ok[0, 0, 1] = -65504.0
    f16 = cand[:P].astype(np.float16)
    f16[1, 1, 1] = np.float16(np.inf)
    with pytest.raises(Float16Overflow):
        w.write_block("v", "q", 0, f16, rel[:P])
    shard_key = L.candidates_shard_key("v", "q", 0, w.pending_version("v", "q"))
    assert not (Path(cache) / shard_key).exists(), "nothing may be written for a rejected block"
    w.write_block("v", "q", 0, ok, rel[:P])
    assert (Path(cache) / shard_key).exists()


def test_invalid_blocks(cache: str) -> None:
    w = open_writer(cache)
    w.write_video("v", make_meta())
    w.begin_entry("v", "q", "?", S)
    cand, rel = block_data("v", "q")
    with pytest.raises(InvalidCacheBlock, match="whole shards"):
        w.write_block("v", "q", 1, cand[1:5], rel[1:5])  # misaligned start
    with pytest.raises(InvalidCacheBlock, match="whole shards"):
        w.write_block("v", "q", 0, cand[:3], rel[:3])  # short block that does not end the entry
    with pytest.raises(InvalidCacheBlock, match="whole shards"):
        w.write_block("v", "q", 8, np.concatenate([cand[8:], cand[:2]]), np.ones(4, np.float32))  # past the end
    with pytest.raises(InvalidCacheBlock, match="shape"):
        w.write_block("v", "q", 0, cand[:P, :, :8], rel[:P])
    with pytest.raises(InvalidCacheBlock, match="dtype"):
        w.write_block("v", "q", 0, cand[:P].astype(np.int32), rel[:P])
    with pytest.raises(InvalidCacheBlock, match="relevance shape"):
        w.write_block("v", "q", 0, cand[:P], rel[:3])
    bad_rel = rel[:P].copy()
    bad_rel[1] = np.nan
    with pytest.raises(InvalidCacheBlock, match="relevance of segment 1"):
        w.write_block("v", "q", 0, cand[:P], bad_rel)
    with pytest.raises(EntryNotFound, match="begin_entry"):
        w.write_block("v", "other", 0, cand[:P], rel[:P])
    with pytest.raises(EntryNotFound, match="write_video"):
        w.begin_entry("nope", "q", "?", S)
    with pytest.raises(InvalidCacheBlock, match="n_segments 3"):
        w.begin_entry("v", "q2", "?", 3)
    with pytest.raises(InvalidCacheBlock, match="timestamps"):
        w.write_video("v2", {"uri": "x", "timestamps": [1.0], "timestamp_texts": []})
    with pytest.raises(InvalidCacheBlock, match="lacks uri"):
        w.write_video("v2", {"timestamps": [1.0], "timestamp_texts": ["a"]})
    with pytest.raises(InvalidCacheBlock, match="not finite"):
        w.write_video("v2", {**make_meta(), "real_fps": float("nan")})


def test_incomplete_entry_invisible_and_finalize_refuses(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "v", "q", units=[0, 8])  # shard 1 (segments 4..7) missing
    assert not w.is_complete("v", "q")
    assert w.missing_segments("v", "q") == [(4, 8)]
    with pytest.raises(EntryIncomplete, match=r"\(4, 8\)"):
        w.finalize_entry("v", "q")
    r = CacheReader(cache)
    assert r.entries() == []
    assert r.entries(complete_only=False) == [("v", "q")]
    with pytest.raises(EntryNotFound):
        r.entry("v", "q")
    cand, rel = block_data("v", "q")
    w.write_block("v", "q", 4, cand[4:8], rel[4:8])
    w.finalize_entry("v", "q")
    assert w.is_complete("v", "q") and CacheReader(cache).entries() == [("v", "q")]


def test_finalize_detects_truncated_and_corrupt_shards(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "v", "q", units=[0, 4, 8])
    shard = Path(cache) / L.candidates_shard_key("v", "q", 1, w.pending_version("v", "q"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a torn shard (relevance says the block landed)
    with pytest.raises(EntryIncomplete, match="shard 1"):
        w.finalize_entry("v", "q")
    corrupt = bytearray(data)
    corrupt[-10] ^= 0xFF  # flip a bit inside the index
    shard.write_bytes(bytes(corrupt))
    with pytest.raises(EntryIncomplete, match="checksum"):
        w.finalize_entry("v", "q")
    shard.unlink()
    with pytest.raises(EntryIncomplete, match="shard 1 is missing"):
        w.finalize_entry("v", "q")
    assert not w.is_complete("v", "q")


def test_begin_entry_skip_recreate_and_force(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "v", "q")
    old = entry_version(cache, "v", "q")
    assert w.begin_entry("v", "q", "question q?", S) is False  # complete: skip
    assert w.is_complete("v", "q")
    # a changed query text means the stored result is stale: recompute, beside the old version
    assert w.begin_entry("v", "q", "another question", S) is True
    new = w.pending_version("v", "q")
    assert new != old
    assert w.is_complete("v", "q"), "the old complete version stays readable until the switch"
    e = CacheReader(cache).entry("v", "q")
    assert e.query_text == "question q?" and e.version == old
    assert np.isnan(zarr.open_array(cache, path=L.relevance_path("v", "q", new), mode="r")[:]).all()
    cand, rel = block_data("v", "q")
    for s0 in range(0, S, P):
        w.write_block("v", "q", s0, -cand[s0 : s0 + P], rel[s0 : s0 + P])
    w.finalize_entry("v", "q")
    e = CacheReader(cache).entry("v", "q")
    assert e.query_text == "another question" and e.version == new and e.inputs["query_text"] == "another question"
    np.testing.assert_array_equal(e.read_all(), _f16(-cand))
    assert not (Path(cache) / L.data_path("v", "q", old)).exists(), "the superseded version is deleted after the switch"
    # force: a new version even with the same inputs
    assert w.begin_entry("v", "q", "another question", S, force=True) is True
    assert w.pending_version("v", "q") != new and w.is_complete("v", "q")
    write_entry(w, "v", "q")
    np.testing.assert_array_equal(CacheReader(cache).entry("v", "q").read_all(), _f16(block_data("v", "q")[0]))


def test_prompt_template_is_stored_and_part_of_the_entry_identity(cache: str) -> None:
    from tempo_ops.query_text import render_query

    w = open_writer(cache)
    write_entry(w, "v", "q")  # default template
    assert CacheReader(cache).entry("v", "q").prompt_template == "plain"
    text = render_query("What is added?", ["salt", "oil"], "videomme")
    cand, rel = block_data("v", "q")
    assert w.begin_entry("v", "q", text, S, prompt_template="videomme") is True  # another template: recompute
    w.write_block("v", "q", 0, cand[:P], rel[:P])
    w.write_block("v", "q", P, cand[P:], rel[P:])
    w.finalize_entry("v", "q")
    e = CacheReader(cache).entry("v", "q")
    assert (e.query_text, e.prompt_template) == (text, "videomme")
    assert e.attrs[L.ENTRY_PROMPT_TEMPLATE] == "videomme"
    assert w.begin_entry("v", "q", text, S, prompt_template="videomme") is False  # same text + template: reuse
    assert w.is_complete("v", "q", query_text=text, prompt_template="videomme")
    assert not w.is_complete("v", "q", query_text=text, prompt_template="plain")  # stale for another template
    assert not w.is_complete("v", "q", query_text="other", prompt_template="videomme")
    # the same rendered text recorded under another template name is another entry too
    assert w.begin_entry("v", "q", text, S, prompt_template="lvbench") is True
    assert CacheReader(cache).entry("v", "q").prompt_template == "videomme"  # readable until the new version lands
    for bad in ("nope", None, 3):
        with pytest.raises(InvalidCacheBlock, match="prompt_template"):
            w.begin_entry("v", "q", text, S, prompt_template=bad)


def test_fingerprint_mismatch_names_fields(cache: str) -> None:
    open_writer(cache)
    other = make_config(memory_tokens_sha256="f" * 64)
    with pytest.raises(FingerprintMismatch, match=r"compressor\.memory_tokens_sha256") as info:
        CacheWriter.open(cache, other)
    assert info.value.details["fields"] == ["compressor.memory_tokens_sha256"]
    cfg = make_config()
    cfg["sampling"]["target_fps"] = 1.0
    cfg["sampling"]["max_frames"] = 2048
    with pytest.raises(FingerprintMismatch) as info:
        CacheWriter.open(cache, cfg)
    assert info.value.details["fields"] == ["sampling.max_frames", "sampling.target_fps"]
    # an integral float and an int are the same value
    same = make_config()
    same["sampling"]["target_fps"] = 2
    assert CacheWriter.open(cache, same).fingerprint == L.config_fingerprint(make_config())
    # geometry of an existing cache wins over the arguments
    assert CacheWriter.open(cache, make_config(), segments_per_shard=32).segments_per_shard == P


def test_config_validation(cache: str) -> None:
    cfg = make_config()
    del cfg["compressor"]["prompt_sha256"]
    with pytest.raises(ConfigError, match="compressor.prompt_sha256"):
        CacheWriter.open(cache, cfg)
    with pytest.raises(ConfigError, match="stored_dtype"):
        CacheWriter.open(cache, {**make_config(), "stored_dtype": "float32"})
    with pytest.raises(ConfigError, match="sampling"):
        CacheWriter.open(cache, {k: v for k, v in make_config().items() if k != "sampling"})
    with pytest.raises(CacheLayoutError, match="token_chunk"):
        CacheWriter.open(cache, make_config(), token_chunk=5)
    assert not os.listdir(cache)


def test_layout_version_checked_by_every_reader(cache: str) -> None:
    write_entry(open_writer(cache), "v", "q")
    root = Path(cache) / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["layout_version"] = 99
    root.write_text(json.dumps(doc))
    with pytest.raises(CacheLayoutError, match="layout_version 99"):
        CacheReader(cache)
    with pytest.raises(CacheLayoutError, match="layout_version 99"):
        CacheWriter.open(cache, make_config())
    del doc["attributes"]["layout_version"]
    root.write_text(json.dumps(doc))
    with pytest.raises(CacheLayoutError, match="missing"):
        CacheReader(cache)
    with pytest.raises(CacheLayoutError, match="no Tempo token cache"):
        CacheReader(str(Path(cache).parent / "absent"))


def test_refuses_non_empty_non_cache_directory(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("precious")
    with pytest.raises(CacheLayoutError, match="not empty"):
        CacheWriter.open(str(tmp_path), make_config())
    assert (tmp_path / "data.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "video_id,query_id",
    [
        ("../../etc/passwd", "../q"),
        ("a/b", "c/d/../../e"),
        ("vidéo ☃ 東京", "¿qué?"),
        ("x" * 10_000, "y" * 10_000),
        ("_zarr", ".hidden"),
        ("/abs/path", "zarr.json"),
    ],
)
def test_hostile_ids_stay_inside_the_cache(tmp_path: Path, video_id: str, query_id: str) -> None:
    cache = tmp_path / "inner" / "cache"
    w = open_writer(str(cache))
    write_entry(w, video_id, query_id)
    for p in tmp_path.rglob("*"):
        assert cache in p.parents or p == cache or p in cache.parents, f"written outside the cache: {p}"
        assert len(p.name) <= 130
    r = CacheReader(str(cache))
    assert r.entries() == [(video_id, query_id)]
    assert r.video_ids() == [video_id]
    e = r.entry(video_id, query_id)
    assert (e.video_id, e.query_id) == (video_id, query_id)
    np.testing.assert_array_equal(e.read_all(), _f16(block_data(video_id, query_id)[0]))


def test_ids_that_sanitise_alike_do_not_collide(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "a/b", "q")
    write_entry(w, "a~2fb", "q")
    r = CacheReader(cache)
    assert r.entries() == [("a/b", "q"), ("a~2fb", "q")]
    np.testing.assert_array_equal(r.entry("a/b", "q").read_all(), _f16(block_data("a/b", "q")[0]))


def test_memory_url_round_trip() -> None:
    url = f"memory://tempo-test-{uuid.uuid4().hex}/cache"
    w = open_writer(url)
    write_entry(w, "v", "q")
    write_entry(w, "v", "q2", units=[0])
    r = CacheReader(url)
    assert r.entries() == [("v", "q")]
    assert r.entries(complete_only=False) == [("v", "q"), ("v", "q2")]
    e = r.entry("v", "q")
    cand, rel = block_data("v", "q")
    np.testing.assert_array_equal(e.read_all(), _f16(cand))
    np.testing.assert_array_equal(e.relevance(), rel)


def test_writer_pickles_and_reopens(cache: str) -> None:
    w = open_writer(cache)
    clone = pickle.loads(pickle.dumps(w))  # noqa: S301 - our own object, round trip test
    assert clone.fingerprint == w.fingerprint and clone.segments_per_shard == P
    write_entry(clone, "v", "q")
    assert w.is_complete("v", "q")


def test_plain_zarr_and_xarray_can_read(cache: str) -> None:
    write_entry(open_writer(cache), "v/1", "q")
    cand, rel = block_data("v/1", "q")
    root = zarr.open_group(cache, mode="r")
    assert root.attrs["layout_version"] == L.LAYOUT_VERSION
    vkey = list(root["videos"].group_keys())[0]
    assert root[f"videos/{vkey}"].attrs["video_id"] == "v/1"
    group = root[f"videos/{vkey}/queries/q"]
    assert group.attrs["complete"] is True
    version = group.attrs["version"]
    entry = group[version]
    arr = entry["candidates"]
    assert arr.dtype == np.float16 and arr.shape == (S, K, D)
    assert arr.shards == (P, K, D) and arr.chunks == (1, C, D)
    np.testing.assert_array_equal(arr[:], _f16(cand))
    np.testing.assert_array_equal(arr[3, :5], _f16(cand[3, :5]))
    np.testing.assert_array_equal(entry["relevance"][:], rel)
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(cache, group=f"videos/{vkey}/queries/q/{version}", consolidated=False, zarr_format=3)
    assert ds["candidates"].dims == ("segment", "token", "channel")
    np.testing.assert_array_equal(ds["candidates"].values, _f16(cand))
    np.testing.assert_array_equal(ds["relevance"].values, rel)
    assert ds.attrs["query_id"] == "q"


def test_direct_read_follows_the_index_for_zarr_written_shards(cache: str) -> None:
    """Shards rewritten by zarr itself (Morton chunk order) still read right through the index."""
    write_entry(open_writer(cache), "v", "q")
    arr = zarr.open_array(cache, path=L.candidates_path("v", "q", entry_version(cache, "v", "q")), mode="r+")
    new = np.random.default_rng(5).standard_normal((S, K, D)).astype(np.float16)
    arr[:] = new
    e = CacheReader(cache).entry("v", "q")
    assert e.direct
    ranges = [(i % 3, K - (i % 5)) for i in range(S)]
    for i, got in enumerate(e.read_token_ranges(ranges, method="direct")):
        np.testing.assert_array_equal(got, new[i, ranges[i][0] : ranges[i][1]])
    np.testing.assert_array_equal(e.read_all(), new)


def test_resume_keeps_landed_blocks_and_reports_damaged_ones(cache: str) -> None:
    w = open_writer(cache)
    write_entry(w, "v", "q", units=[0, 8])  # a crashed run: shard 1 never landed
    version = w.pending_version("v", "q")
    shard0 = Path(cache) / L.candidates_shard_key("v", "q", 0, version)
    before = shard0.stat().st_mtime_ns
    w2 = open_writer(cache)  # the re-run's writer
    assert w2.begin_entry("v", "q", "question q?", S, resume=True) is True
    assert shard0.stat().st_mtime_ns == before, "landed blocks are kept"
    assert w2.missing_segments("v", "q") == [(4, 8)]
    # a torn shard whose relevance chunk landed counts as missing too
    assert w2.pending_version("v", "q") == version
    shard2 = Path(cache) / L.candidates_shard_key("v", "q", 2, version)
    shard2.write_bytes(shard2.read_bytes()[:100])
    assert w2.missing_segments("v", "q") == [(4, 10)]
    cand, rel = block_data("v", "q")
    for s0 in (4, 8):
        w2.write_block("v", "q", s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
    assert w2.missing_segments("v", "q") == []
    w2.finalize_entry("v", "q")
    np.testing.assert_array_equal(CacheReader(cache).entry("v", "q").read_all(), _f16(cand))
    # resume never resurrects a complete entry, and a changed text still recomputes (in a new version)
    assert w2.begin_entry("v", "q", "question q?", S, resume=True) is False
    assert w2.begin_entry("v", "q", "changed", S, resume=True) is True
    assert w2.pending_version("v", "q") != version and w2.missing_segments("v", "q") == [(0, S)]
    assert shard0.exists() and CacheReader(cache).entry("v", "q").query_text == "question q?"


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheNotWritable, match="cannot open for writing"):
        CacheWriter.open(str(blocker / "cache"), make_config())
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # (root ignores permissions: nothing to check then)
            with pytest.raises(CacheNotWritable):
                CacheWriter.open(str(ro / "cache"), make_config())
    finally:
        ro.chmod(0o700)
