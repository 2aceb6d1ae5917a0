"""Cache v2 integrity: checksums on every read path, missing data, damaged roots, entry identity,
atomic replacement, concurrent writers, storage forms, v1 compatibility and migration."""

from __future__ import annotations

import errno
import json
import os
import shutil
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

from pipelines.cli import main as tempo
from schemas import cache_layout as L
from tempo_ops.cache_maintenance import migrate_cache, verify_cache
from tempo_ops.errors import CacheCorrupt, CacheLayoutError, EntryNotFound, InvalidCacheBlock
from tempo_ops.store import (
    CacheReader,
    CacheWriter,
    cache_summary,
    dequantize_int8,
    from_bf16_bits,
    quantize_int8,
    to_bf16_bits,
)

V1_FIXTURE = Path(__file__).parent / "data" / "cache_v1"


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    url = str(tmp_path / "cache")
    w = open_writer(url)
    write_entry(w, "v", "q")
    write_entry(w, "v", "q2")
    return url


def _shard(url: str, shard: int = 1, video: str = "v", query: str = "q") -> Path:
    return Path(url) / L.candidates_shard_key(video, query, shard, entry_version(url, video, query))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _all_reads(url: str) -> list:
    """Every project read path of entry v/q, as callables."""
    def entry():
        return CacheReader(url).entry("v", "q")

    return [
        lambda: entry().read_all(method="direct"),
        lambda: entry().read_all(method="zarr"),
        lambda: entry().read_token_ranges([(0, K)] * S),
        lambda: verify_or_raise(url),
    ]


def verify_or_raise(url: str) -> None:
    report = verify_cache(url, entries=["v/q"])
    if report["corrupt"]:
        raise CacheCorrupt(report["corrupt"][0]["problems"][0]["reason"], item="v/q")


def test_bit_flip_in_a_chunk_is_detected_by_every_reader(cache: str) -> None:
    shard = _shard(cache)
    _flip(shard, 5 * (C * D * 2 + 4) + 17)  # a data byte of local segment 1 (segment 5), chunk 1
    for read in _all_reads(cache):
        with pytest.raises(CacheCorrupt) as info:
            read()
        assert info.value.code == "cache_corrupt" and info.value.item == "v/q"
    with pytest.raises(CacheCorrupt, match=r"segment 5 token chunk 1 fails its crc32c \[.*candidates/c/1/0/0\]"):
        CacheReader(cache).entry("v", "q").read_all()
    # segments outside the damaged chunk still read; the other entry is untouched
    e = CacheReader(cache).entry("v", "q")
    got = e.read_token_ranges([(0, K)] * 5 + [(0, 0)] * (S - 5))
    np.testing.assert_array_equal(np.stack(got[:5]), block_data("v", "q")[0][:5].astype(np.float16))
    assert verify_cache(cache)["corrupt"][0]["query_id"] == "q" and len(verify_cache(cache)["corrupt"]) == 1
    # plain zarr verifies the crc32c too
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        e.candidates_array()[5]


@pytest.mark.parametrize("where", ["index", "truncate", "delete"])
def test_index_damage_truncation_and_deletion_are_detected(cache: str, where: str) -> None:
    shard = _shard(cache)
    data = shard.read_bytes()
    if where == "index":
        _flip(shard, len(data) - 20)
    elif where == "truncate":
        shard.write_bytes(data[: len(data) - 100])
    else:
        shard.unlink()
    for read in _all_reads(cache):
        with pytest.raises(CacheCorrupt):
            read()
    if where == "delete":  # plain zarr users see NaN (the fill value), never numbers
        arr = CacheReader(cache).entry("v", "q").candidates_array()
        assert np.isnan(arr[4:8]).all() and not np.isnan(arr[0:4]).any()


def test_relevance_damage_never_reads_as_numbers(cache: str) -> None:
    version = entry_version(cache, "v", "q")
    chunk = Path(cache) / L.relevance_chunk_key("v", "q", 0, version)
    _flip(chunk, 2)
    with pytest.raises(CacheCorrupt, match="relevance chunk 0 checksum mismatch"):
        CacheReader(cache).entry("v", "q").relevance()
    chunk.unlink()
    with pytest.raises(CacheCorrupt, match="relevance chunk 0 missing"):
        CacheReader(cache).entry("v", "q").relevance()
    assert np.isnan(zarr.open_array(cache, path=L.relevance_path("v", "q", version), mode="r")[:P]).all()
    report = verify_cache(cache)
    assert [c["query_id"] for c in report["corrupt"]] == ["q"] and not report["clean"]


def test_relevance_outside_unit_interval_is_refused_on_write_and_read(tmp_path: Path) -> None:
    w = open_writer(str(tmp_path / "c"))
    w.write_video("v", make_meta())
    w.begin_entry("v", "q", "?", S)
    cand, rel = block_data("v", "q")
    for bad in (1.5, -0.1, np.nan):
        r = rel[:P].copy()
        r[1] = bad
        with pytest.raises(InvalidCacheBlock, match="segment 1 is not in \\[0, 1\\]"):
            w.write_block("v", "q", 0, cand[:P], r)


def test_out_of_range_relevance_with_a_valid_checksum_raises(cache: str) -> None:
    """Damage that re-checksums (e.g. a buggy external writer) still never yields values outside [0, 1]."""
    from tempo_ops.store_shard import crc32c_bytes

    chunk = Path(cache) / L.relevance_chunk_key("v", "q", 0, entry_version(cache, "v", "q"))
    vals = np.frombuffer(chunk.read_bytes()[:-4], dtype="<f4").copy()
    vals[2] = 2.16
    chunk.write_bytes(vals.tobytes() + crc32c_bytes(vals.tobytes()))
    with pytest.raises(CacheCorrupt, match="segment 2 is 2.16"):
        CacheReader(cache).entry("v", "q").relevance()


def test_damaged_entry_metadata_is_reported_not_skipped(cache: str) -> None:
    meta = Path(cache) / L.metadata_key(L.entry_path("v", "q"))
    meta.write_text("{ torn")
    r = CacheReader(cache)
    assert r.entries() == [("v", "q2")]
    assert r.unreadable_entries() == [{"key": "videos/v/queries/q", "reason": "entry zarr.json is missing or damaged"}]
    with pytest.raises(CacheCorrupt, match="entry zarr.json is damaged"):
        r.entry("v", "q")
    report = verify_cache(cache)
    assert report["unreadable"] and not report["clean"]
    w = open_writer(cache)
    assert w.entry_status("v", "q", "question q?", S)[0] == "corrupt"


@pytest.mark.parametrize("damage", ["torn", "deleted", "other_layout"])
def test_damaged_root_is_refused_by_readers_and_writers_and_never_rewritten(cache: str, damage: str) -> None:
    root = Path(cache) / "zarr.json"
    if damage == "torn":
        root.write_text(root.read_text()[:50])
    elif damage == "deleted":
        root.unlink()
    else:
        doc = json.loads(root.read_text())
        doc["attributes"]["layout_version"] = 99
        root.write_text(json.dumps(doc))
    before = root.read_bytes() if root.exists() else None
    with pytest.raises(CacheLayoutError):
        CacheReader(cache)
    with pytest.raises(CacheLayoutError):
        open_writer(cache)
    other = make_config(svlm_name="other")
    with pytest.raises(CacheLayoutError):
        CacheWriter.open(cache, other, segments_per_shard=P, token_chunk=C)
    assert (root.read_bytes() if root.exists() else None) == before, "the root is never rewritten implicitly"
    assert tempo(["verify", cache]) == 2


def test_stale_entries_are_recomputed_for_changed_inputs(cache: str) -> None:
    w = open_writer(cache)
    ident = {"uri": "file:///videos/v.mp4", "size": 10, "mtime": 1.0}
    assert w.entry_status("v", "q", "question q?", S) == ("complete", None)
    status, why = w.entry_status("v", "q", "a new question", S)
    assert status == "stale" and "query_text" in why
    assert w.entry_status("v", "q", "question q?", S, prompt_template="videomme")[0] == "stale"
    # an entry that records no video identity (written without one, or migrated from v1) is not compared on it
    assert w.entry_status("v", "q", "question q?", S, video_identity=ident)[0] == "complete"
    # recompute with a video identity: recorded, then a changed file (mtime) is stale again
    assert w.begin_entry("v", "q", "question q?", S, video_identity=ident, prompt_template="videomme") is True
    cand, rel = block_data("v", "q")
    for s0 in range(0, S, P):
        w.write_block("v", "q", s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
    w.finalize_entry("v", "q")
    e = CacheReader(cache).entry("v", "q")
    assert e.inputs == {
        "query_text": "question q?",
        "prompt_template": "videomme",
        "video": ident,
        "fingerprint": w.fingerprint,
        "n_segments": S,
    }
    assert e.prompt_template == "videomme"
    assert w.begin_entry("v", "q", "question q?", S, video_identity=ident, prompt_template="videomme") is False
    assert w.entry_status("v", "q", "question q?", S, video_identity=dict(ident, mtime=2.0), prompt_template="videomme")[0] == "stale"


def test_replacement_is_atomic_for_readers(cache: str) -> None:
    """A reader polling during --force sees the old complete entry or the new one at every step."""
    w = open_writer(cache)
    cand, rel = block_data("v", "q")
    seen = []

    def poll() -> None:
        r = CacheReader(cache)
        assert ("v", "q") in r.entries()
        e = r.entry("v", "q")
        full = e.read_all()
        seen.append(bool(np.array_equal(full, (-cand).astype(np.float16))))
        assert seen[-1] or np.array_equal(full, cand.astype(np.float16))

    poll()
    assert w.begin_entry("v", "q", "question q?", S, force=True)
    poll()
    for s0 in range(0, S, P):
        w.write_block("v", "q", s0, -cand[s0 : s0 + P], rel[s0 : s0 + P])
        poll()
    w.finalize_entry("v", "q")
    poll()
    assert seen == [False] * (2 + len(range(0, S, P))) + [True]


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_concurrent_writers_with_different_inputs_never_mix(cache: str, order: str) -> None:
    """Two runs writing the same ids with different texts, interleaved: recorded inputs and tokens agree."""
    wa, wb = open_writer(cache), open_writer(cache)
    cand, rel = block_data("v", "q")
    data = {"A": cand, "B": -cand}
    assert wa.begin_entry("v", "q", "text A", S) and wb.begin_entry("v", "q", "text B", S)
    for s0 in range(0, S, P):  # interleaved block writes of both runs
        wa.write_block("v", "q", s0, data["A"][s0 : s0 + P], rel[s0 : s0 + P])
        wb.write_block("v", "q", s0, data["B"][s0 : s0 + P], rel[s0 : s0 + P])
    writers = [("A", wa), ("B", wb)] if order == "a_first" else [("B", wb), ("A", wa)]
    for _, w in writers:
        w.finalize_entry("v", "q")
    e = CacheReader(cache).entry("v", "q")
    last = writers[-1][0]
    assert e.query_text == f"text {last}"
    np.testing.assert_array_equal(e.read_all(), data[last].astype(np.float16))


# ---------------------------------------------------------------- storage forms
def _form_writer(url: str, form: str) -> CacheWriter:
    cfg = dict(make_config(), stored_dtype=form)
    return CacheWriter.open(url, cfg, segments_per_shard=P, token_chunk=C)


def _write(w: CacheWriter, cand: np.ndarray, rel: np.ndarray) -> None:
    w.write_video("v", make_meta())
    w.begin_entry("v", "q", "?", S)
    for s0 in range(0, S, P):
        w.write_block("v", "q", s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
    w.finalize_entry("v", "q")


def test_bfloat16_form_is_lossless_for_bf16_values_and_plain_zarr_readable(tmp_path: Path) -> None:
    cand, rel = block_data("v", "q")
    raw = cand * 1e4
    raw[0, 0, :4] = [1e-7, -3e-6, 70000.0, 1e30]  # outside float16's exact range
    bf = from_bf16_bits(to_bf16_bits(raw))  # bf16 values
    url = str(tmp_path / "c")
    _write(_form_writer(url, "bfloat16"), bf, rel)
    e = CacheReader(url).entry("v", "q")
    assert e.storage_form == "bfloat16"
    for method in ("direct", "zarr"):
        got = e.read_all(method=method)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, bf)
    stored, scales, exps = e.read_stored([(0, K)] * S)
    assert stored[0].dtype == np.uint16 and scales is None and exps is None
    # plain zarr: uint16 bit patterns + attribute; the documented conversion gives the values back
    arr = e.candidates_array()
    assert arr.dtype == np.uint16 and arr.attrs[L.TEMPO_DTYPE_ATTR] == "bfloat16"
    np.testing.assert_array_equal((arr[:].astype(np.uint32) << 16).view(np.float32), bf)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, as numpy casts
        np.testing.assert_array_equal(e.read_token_ranges([(1, 3)] * S, dtype="float16")[2], bf[2, 1:3].astype(np.float16))
    # rounding of non-bf16 float32 is to nearest even
    assert to_bf16_bits(np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8], dtype=np.float32)).tolist() == [0x3F80, 0x3F82]


def test_int8_form_meets_its_error_and_size_targets(tmp_path: Path) -> None:
    cand, rel = block_data("v", "q")
    urls = {f: str(tmp_path / f) for f in ("int8", "bfloat16")}
    for form, url in urls.items():
        _write(_form_writer(url, form), cand, rel)
    # size target at the real geometry (K = 128, D = 2048: scales, exponents and checksums are the overhead)
    wide_k, wide_d = 128, 2048
    wide = np.random.default_rng(0).standard_normal((S, wide_k, wide_d)).astype(np.float32)
    wide_urls = {f: str(tmp_path / f"wide-{f}") for f in ("int8", "bfloat16")}
    for form, url in wide_urls.items():
        cfg = dict(make_config(hidden_size=wide_d, num_memory_tokens=wide_k), stored_dtype=form)
        _write(CacheWriter.open(url, cfg, segments_per_shard=P, token_chunk=2), wide, rel)
    sizes = {f: sum(p.stat().st_size for p in Path(u).rglob("*") if p.is_file() and "/c/" in str(p)) for f, u in wide_urls.items()}
    assert sizes["int8"] <= 0.52 * sizes["bfloat16"], sizes
    e = CacheReader(urls["int8"]).entry("v", "q")
    got = e.read_all()
    cos = (got * cand).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(cand, axis=-1))
    assert cos.min() >= 0.999
    np.testing.assert_array_equal(e.read_all(method="zarr"), got)
    toks, scales, exps = e.read_stored([(0, K)] * S)
    q, sc, ex = quantize_int8(cand)
    np.testing.assert_array_equal(toks[3], q[3])
    np.testing.assert_array_equal(scales[3], sc[3])
    np.testing.assert_array_equal(exps, ex)
    np.testing.assert_array_equal(dequantize_int8(q, sc, ex), got)
    part = e.read_stored([(1, 3) if i % 2 else (0, 0) for i in range(S)])[2]  # exponents of read segments only
    assert (part[1::2] == ex[1::2]).all() and (part[::2] == L.INT8_MISSING).all()
    # plain zarr: int8 values, per-token float32 scales, per-(segment, channel) power-of-two exponents
    grp = zarr.open_group(urls["int8"], mode="r")[L.data_path("v", "q", e.version)]
    plain = grp["candidates"][:].astype(np.float32) * grp["scales"][:][..., None] * 2.0 ** grp["channel_exponents"][:][:, None, :]
    np.testing.assert_array_equal(plain.astype(np.float32), got)
    assert CacheReader(urls["int8"]).root_attrs[L.ROOT_INT8_SCHEME] == "token_channel"
    assert cache_summary(urls["int8"])["int8_scheme"] == "token_channel" and cache_summary(urls["bfloat16"])["int8_scheme"] is None

    # a damaged scales or exponents chunk is detected by both readers and by verify
    for key_of, what in ((L.scales_shard_key, "scales"), (L.channel_exponents_shard_key, "channel_exponents")):
        shard = Path(urls["int8"]) / key_of("v", "q", 0, e.version)
        saved = shard.read_bytes()
        _flip(shard, 3)
        with pytest.raises(CacheCorrupt, match=f"{what} chunk fails its crc32c"):
            CacheReader(urls["int8"]).entry("v", "q").read_all()
        with pytest.raises(CacheCorrupt, match="unreadable"):
            CacheReader(urls["int8"]).entry("v", "q").read_all(method="zarr")
        assert [c["query_id"] for c in verify_cache(urls["int8"])["corrupt"]] == ["q"]
        shard.unlink()  # deleted: an error, never the fill value read as numbers
        with pytest.raises(CacheCorrupt, match=f"shard 0 is missing.*{what}"):
            CacheReader(urls["int8"]).entry("v", "q").read_all()
        with pytest.raises(CacheCorrupt, match=f"{what} of segment 0 read as the fill value"):
            CacheReader(urls["int8"]).entry("v", "q").read_all(method="zarr")
        shard.write_bytes(saved)
    np.testing.assert_array_equal(CacheReader(urls["int8"]).entry("v", "q").read_all(), got)


def _outlier_segments(rng: np.random.Generator, kind: str, s: int = 4, k: int = 32, d: int = 512) -> np.ndarray:
    """Activations with the outliers transformer hidden states show (the int8 form's hard case)."""
    x = rng.standard_normal((s, k, d)).astype(np.float32)
    if kind == "outlier_channels":  # 1% of channels 20x larger in every token
        x[..., rng.choice(d, d // 100, replace=False)] *= 20
    elif kind == "few_huge_channels":  # 4 channels 100x larger
        x[..., :4] *= 100
    elif kind == "sink_token":  # one token with a huge norm, and outlier channels
        x[:, 0] *= 50
        x[..., : d // 100] *= 20
    elif kind == "lognormal_channels":  # channel magnitudes spread over orders of magnitude
        x *= rng.lognormal(0.0, 1.0, d).astype(np.float32)
    elif kind == "heavy_tailed_elements":  # Student-t (3 dof) values: spikes anywhere
        x = rng.standard_t(3, (s, k, d)).astype(np.float32)
    return x


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


@pytest.mark.parametrize(
    "kind", ["gaussian", "outlier_channels", "few_huge_channels", "sink_token", "lognormal_channels", "heavy_tailed_elements"]
)
def test_int8_cosine_target_holds_for_every_token_with_outlier_channels(kind: str) -> None:
    x = _outlier_segments(np.random.default_rng(7), kind)
    cos = _cosine(dequantize_int8(*quantize_int8(x)), x)
    assert cos.min() >= 0.999, (kind, float(cos.min()))
    if kind in ("outlier_channels", "few_huge_channels", "sink_token"):  # what the channel pre-scale is for
        q, sc, _ = quantize_int8(x, channel_scaled=False)
        assert _cosine(dequantize_int8(q, sc), x).min() < 0.999


def test_int8_channel_exponents_edge_cases() -> None:
    x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    x[0, :, 3] = 0.0  # an all-zero channel: exponent 0
    x[0, 2] = 0.0  # an all-zero token: scale 0, values 0
    x[1] *= np.float32(1e-30)  # tiny and huge magnitudes keep their relative precision
    x[1, :, 0] = 1e30
    q, sc, ex = quantize_int8(x)
    assert ex.dtype == np.int8 and ex[0, 3] == 0 and sc[0, 2] == 0 and (q[0, 2] == 0).all()
    a1 = np.abs(x[1, :, 1]).astype(np.float64)  # 1e-30 squared underflows float32: sum the logs
    assert ex[1, 0] == round(0.75 * np.log2(1e30)) and ex[1, 1] == round(0.375 * np.log2(a1.max() * a1.mean()))
    back = dequantize_int8(q, sc, ex)
    assert (back[0, 2] == 0).all() and (back[0, :, 3] == 0).all()
    np.testing.assert_allclose(back[1, :, 0], x[1, :, 0], rtol=1e-2)
    with pytest.raises(ValueError, match=r"\(S, K, D\)"):
        quantize_int8(x[0])


def test_int8_cache_of_the_first_scheme_still_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 caches written before channel exponents (no ``int8_scheme`` in the root) read as before."""
    cand, rel = block_data("v", "q")
    url = str(tmp_path / "token-only")
    monkeypatch.setattr(L, "INT8_SCHEME", "token")
    _write(_form_writer(url, "int8"), cand, rel)
    root = Path(url) / "zarr.json"
    doc = json.loads(root.read_text())
    del doc["attributes"][L.ROOT_INT8_SCHEME]  # exactly what the first int8 caches hold
    root.write_text(json.dumps(doc))
    e = CacheReader(url).entry("v", "q")
    assert not (Path(url) / L.channel_exponents_path("v", "q", e.version)).exists()
    q, sc, ex = quantize_int8(cand, channel_scaled=False)
    assert ex is None
    for method in ("direct", "zarr"):
        np.testing.assert_array_equal(e.read_all(method=method), dequantize_int8(q, sc))
    assert e.read_stored([(0, K)] * S)[2] is None
    assert verify_cache(url)["corrupt"] == [] and cache_summary(url)["int8_scheme"] == "token"
    doc["attributes"][L.ROOT_INT8_SCHEME] = "per_tensor"
    root.write_text(json.dumps(doc))
    with pytest.raises(CacheLayoutError, match="unknown int8 scheme"):
        CacheReader(url)


def test_values_are_converted_straight_into_the_shard_bytes_of_the_separate_steps(tmp_path: Path) -> None:
    """The writer converts into each shard's buffer; the objects equal encode_shard of the converted values."""
    from tempo_ops import store as store_mod
    from tempo_ops.store_shard import encode_shard

    cand, rel = block_data("v", "q")
    cand = cand * 3.7
    for form in ("float16", "bfloat16", "int8"):
        url = str(tmp_path / form)
        _write(_form_writer(url, form), cand, rel)
        version = CacheReader(url).entry("v", "q").version
        for shard in range(S // P):
            block = cand[shard * P : (shard + 1) * P]
            if form == "float16":
                stored = block.astype("<f2")
            elif form == "bfloat16":
                stored = to_bf16_bits(block)
            else:
                stored, _, _ = quantize_int8(block)
            want = encode_shard(stored, P, C).tobytes()
            got = (Path(url) / L.candidates_shard_key("v", "q", shard, version)).read_bytes()
            assert got == want, (form, shard)
    # the torch conversion and the numpy fallback round alike (nearest even), into strided rows too
    x = np.random.default_rng(3).standard_normal((6, 40), dtype=np.float32) * 1e3
    x[0, :3] = [np.inf, -np.inf, np.nan]
    torch_bits = to_bf16_bits(x)
    real = store_mod._torch
    store_mod._torch = lambda: None
    try:
        strided = np.zeros((6, 44), dtype="<u2")[:, :40]
        store_mod._bf16_bits_into(strided, x)
    finally:
        store_mod._torch = real
    np.testing.assert_array_equal(torch_bits[:, 3:], strided[:, 3:])
    assert (torch_bits[0, :2] == [0x7F80, 0xFF80]).all() and (torch_bits[0, 2] & 0x7FFF) > 0x7F80


@pytest.mark.parametrize("form", ["float16", "bfloat16", "int8"])
def test_streamed_local_shards_equal_the_whole_objects_put_to_an_object_store(tmp_path: Path, form: str) -> None:
    """Locally each shard is streamed to disk piece by piece; elsewhere it is one object: same bytes."""
    import fsspec

    cand, rel = block_data("v", "q")
    cand = cand * 3.7
    local, remote = str(tmp_path / form), f"memory://streamed-{form}"
    for url in (local, remote):
        _write(_form_writer(url, form), cand, rel)
    mem = fsspec.filesystem("memory")
    lv, rv = CacheReader(local).entry("v", "q").version, CacheReader(remote).entry("v", "q").version
    keys = [L.candidates_shard_key, L.relevance_chunk_key]
    keys += [L.scales_shard_key, L.channel_exponents_shard_key] if form == "int8" else []
    for key_of in keys:
        for shard in range(-(-S // P)):
            got = (Path(local) / key_of("v", "q", shard, lv)).read_bytes()
            assert got == mem.cat(f"/streamed-{form}/{key_of('v', 'q', shard, rv)}"), (key_of.__name__, shard)
    mem.rm(f"/streamed-{form}", recursive=True)


def _begun_writer(tmp_path: Path, form: str) -> tuple[str, CacheWriter]:
    """A ``form`` cache under ``tmp_path`` with video "v" written and entry ("v", "q") begun."""
    url = str(tmp_path / form)
    w = _form_writer(url, form)
    w.write_video("v", make_meta())
    w.begin_entry("v", "q", "?", S)
    return url, w


@pytest.mark.parametrize("form", ["bfloat16", "int8"])
def test_values_the_form_cannot_hold_are_refused_before_writing(tmp_path: Path, form: str) -> None:
    from tempo_ops.errors import Float16Overflow

    url, w = _begun_writer(tmp_path, form)
    cand, rel = block_data("v", "q")
    bads = (np.inf, -np.inf, np.nan) + ((3.4e38,) if form == "bfloat16" else ())  # 3.4e38 rounds to bf16 inf
    for bad in bads:
        block = cand[:P].copy()
        block[2, 5, 7] = bad
        with pytest.raises(Float16Overflow, match="segment 2, token 5, channel 7") as info:
            w.write_block("v", "q", 0, block, rel[:P])
        assert info.value.item == "v/q"
    assert not (Path(url) / L.candidates_shard_key("v", "q", 0, w.pending_version("v", "q"))).exists()
    ok = cand[:P].copy()
    ok[0, 0, 0] = 3.38e38 if form == "bfloat16" else 1e30  # large but representable
    w.write_block("v", "q", 0, ok, rel[:P])


@pytest.mark.parametrize("form", ["float16", "bfloat16", "int8"])
def test_a_bad_value_in_a_later_shard_of_a_block_writes_no_shard_and_leaves_no_temporary(tmp_path: Path, form: str) -> None:
    """Shards are streamed to temporaries and renamed together: a check failing in the last shard leaves nothing."""
    from tempo_ops.errors import Float16Overflow

    url, w = _begun_writer(tmp_path, form)
    cand, rel = block_data("v", "q")
    block = cand.copy()
    block[2 * P + 1, 1, 2] = np.nan  # in the last (short) shard
    with pytest.raises(Float16Overflow, match=f"segment {2 * P + 1}, token 1, channel 2"):
        w.write_block("v", "q", 0, block, rel)
    version_dir = Path(url) / L.data_path("v", "q", w.pending_version("v", "q"))
    files = [f.relative_to(version_dir).as_posix() for f in version_dir.rglob("*") if f.is_file()]
    assert all(f.endswith("zarr.json") for f in files), files  # array metadata only: no shard, no .partial
    assert w.missing_segments("v", "q") == [(0, S)]
    w.write_block("v", "q", 0, cand, rel)
    w.finalize_entry("v", "q")
    assert CacheReader(url).entry("v", "q").verify() == []


def test_float16_conversion_rounds_as_numpy_does() -> None:
    """The writer's float32 (vectorised) and float64 → float16 casts equal numpy's: nearest even, subnormals, overflow."""
    from tempo_ops import store as store_mod

    rng = np.random.default_rng(5)
    edge = np.array([65504.0, 65519.99, 65520.0, -65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 1e-9, -0.0, np.inf, np.nan], dtype=np.float32)
    for dtype in (np.float32, np.float64):
        x = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 5, 5000), edge]).astype(dtype)
        got = np.zeros((2, len(x) + 3), dtype="<f2")[:, :-3]  # strided rows, like a shard's chunks
        with np.errstate(over="ignore"):  # 65520 and beyond become inf, as they should
            store_mod._f16_into(got, np.stack([x, -x]))
            want = np.stack([x, -x]).astype(np.float16)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_bfloat16_and_int8_decoding_are_exact() -> None:
    """Reads decode bf16 (torch's vectorised widening) and int8 exactly as the definitions say:
    every one of the 65536 bf16 patterns (NaN payloads, subnormals, -0) widens to ``bits << 16``,
    from any byte order and layout; int8 is ``q · scale · 2**e``."""
    bits = np.arange(2**16, dtype=np.uint32)
    want = (bits << np.uint32(16)).view(np.float32)
    for given in (bits.astype("<u2"), bits.astype(">u2"), bits.astype("<u2").reshape(256, 256).T):
        got = from_bf16_bits(given)
        assert got.dtype == np.float32 and got.shape == given.shape
        np.testing.assert_array_equal(got.view(np.uint32).reshape(-1), (np.asarray(given, dtype=np.uint32) << 16).reshape(-1))
    np.testing.assert_array_equal(from_bf16_bits(bits.astype("<u2")).view(np.uint32), want.view(np.uint32))
    one = from_bf16_bits(np.uint16(0x3F80))
    assert one.shape == () and one == np.float32(1.0) and from_bf16_bits(np.zeros(0, np.uint16)).shape == (0,)

    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, (3, 5, 7)).astype(np.int8)
    scale = rng.random((3, 5)).astype(np.float32)
    e = rng.integers(-20, 20, (3, 7)).astype(np.int8)
    want8 = q.astype(np.float64) * scale[..., None].astype(np.float64) * np.exp2(e.astype(np.float64))[:, None, :]
    np.testing.assert_array_equal(dequantize_int8(q, scale, e), want8.astype(np.float32))


def test_chunk_rows_crc_ok_names_each_damaged_row() -> None:
    from tempo_ops.store_shard import chunk_rows_crc_ok, crc32c_bytes

    data = [bytes([i]) * 64 for i in range(5)]
    rows = np.frombuffer(b"".join(d + crc32c_bytes(d) for d in data), dtype=np.uint8).reshape(5, 68).copy()
    assert chunk_rows_crc_ok(rows).all()
    rows[1, 3] ^= 1  # a data byte
    rows[4, -1] ^= 0x80  # a checksum byte
    np.testing.assert_array_equal(chunk_rows_crc_ok(rows), [True, False, True, True, False])


def test_put_local_files_renames_all_or_none(tmp_path: Path) -> None:
    from tempo_ops.fs import put_local_files

    (tmp_path / "b").write_bytes(b"old b")

    def failing():
        yield b"half"
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError):
        put_local_files([(str(tmp_path / "a" / "x"), [b"new a"]), (str(tmp_path / "b"), failing())])
    assert (tmp_path / "b").read_bytes() == b"old b" and not (tmp_path / "a" / "x").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b"]  # no temporary left
    buf = np.zeros(4, dtype=np.uint8)

    def reused():  # one buffer rewritten between pieces: each piece is written before the next is made
        for v in (1, 2, 3):
            buf[:] = v
            yield buf

    put_local_files([(str(tmp_path / "a" / "x"), reused()), (str(tmp_path / "b"), [memoryview(b"new b")])])
    assert (tmp_path / "a" / "x").read_bytes() == bytes([1] * 4 + [2] * 4 + [3] * 4)
    assert (tmp_path / "b").read_bytes() == b"new b"


# ---------------------------------------------------------------- v1 compatibility and migration
def _v1_copy(tmp_path: Path) -> str:
    url = str(tmp_path / "v1cache")
    shutil.copytree(V1_FIXTURE, url)
    return url


def test_v1_cache_reads_back_unchanged(tmp_path: Path) -> None:
    url = _v1_copy(tmp_path)
    r = CacheReader(url)
    assert r.layout_version == 1 and r.storage_form == "float16"
    assert r.entries() == [("video-1", "q-a"), ("video-1", "q-b"), ("video/2", "q a")]
    for v, q in r.entries():
        cand, rel = block_data(v, q)
        e = r.entry(v, q)
        assert e.version is None and e.inputs is None and e.query_text == f"question {q}?"
        for method in ("direct", "zarr"):
            np.testing.assert_array_equal(e.read_all(method=method), cand.astype(np.float16))
        np.testing.assert_array_equal(e.relevance(), rel)
        heads = e.read_token_ranges([(0, k % K + 1) for k in range(S)])
        for i, h in enumerate(heads):
            np.testing.assert_array_equal(h, cand[i, : i % K + 1].astype(np.float16))
    assert verify_cache(url)["corrupt"] == []
    with pytest.raises(CacheLayoutError, match="tempo migrate"):
        open_writer(url)


def test_v1_damage_is_still_detected_where_it_can_be(tmp_path: Path) -> None:
    url = _v1_copy(tmp_path)
    shard = Path(url) / L.candidates_shard_key("video-1", "q-a", 0)
    _flip(shard, len(shard.read_bytes()) - 30)  # the v1 shard index has a crc32c
    with pytest.raises(CacheCorrupt, match="checksum"):
        CacheReader(url).entry("video-1", "q-a").read_all()
    rel = Path(url) / L.relevance_chunk_key("video-1", "q-b", 0)
    rel.unlink()
    with pytest.raises(CacheCorrupt, match="relevance chunk 0 missing"):
        CacheReader(url).entry("video-1", "q-b").relevance()


def test_migrate_converts_v1_in_place_safely(tmp_path: Path) -> None:
    url = _v1_copy(tmp_path)
    result = migrate_cache(url)
    assert result["counts"] == {"videos": 3, "entries": 3, "skipped_incomplete": 1}
    assert Path(result["backup"]).exists() and CacheReader(result["backup"]).layout_version == 1
    r = CacheReader(url)
    assert r.layout_version == 2 and r.fingerprint == L.config_fingerprint(make_config())
    for v, q in r.entries():
        np.testing.assert_array_equal(r.entry(v, q).read_all(), block_data(v, q)[0].astype(np.float16))
    assert verify_cache(url)["clean"] and CacheReader(url).entries(complete_only=False) == r.entries()  # incomplete: not carried
    # a compression re-run with the same config recognises the migrated entries (video identity unknown in v1)
    w = open_writer(url)
    ident = {"uri": "file:///videos/v.mp4", "size": 1, "mtime": 1.0}
    assert w.entry_status("video-1", "q-a", "question q-a?", S, video_identity=ident)[0] == "complete"
    assert tempo(["migrate", url]) == 2  # already v2: a typed error


def test_verify_cli_lists_problems_and_exit_status(cache: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert tempo(["verify", cache]) == 0
    assert "2/2 entries intact" in capsys.readouterr().out
    _flip(_shard(cache, 0, query="q2"), 40)
    assert tempo(["verify", cache, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(c["video_id"], c["query_id"]) for c in doc["corrupt"]] == [("v", "q2")]
    assert "segment 0 token chunk 0 fails its crc32c" in doc["corrupt"][0]["problems"][0]["reason"]
    assert tempo(["verify", cache, "--entries", "v/q"]) == 0
    assert tempo(["verify", cache, "--entries", "v/nope"]) == 1
    assert "MISSING v/nope" in capsys.readouterr().out
    assert tempo(["verify", cache, "--quick"]) == 0  # a data chunk is beyond the quick check
    with pytest.raises(EntryNotFound):
        CacheReader(cache).entry("v", "nope")


def test_verify_reports_and_prunes_what_crashed_writes_left(cache: str, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from tempo_ops.fs import LocalObjectStore

    cand, rel = block_data("v", "q")
    superseded = entry_version(cache, "v", "q")
    # 1. a --force run that died between the switch and deleting the superseded version
    w = open_writer(cache)
    w.begin_entry("v", "q", "question q?", S, force=True)
    for s0 in range(0, S, P):
        w.write_block("v", "q", s0, cand[s0 : s0 + P], rel[s0 : s0 + P])

    async def died_before_deleting(self, prefix):
        return None

    with monkeypatch.context() as m:
        m.setattr(LocalObjectStore, "delete_dir", died_before_deleting)
        w.finalize_entry("v", "q")
    # 2. a --force run that died before switching (beside the complete q2)
    w.begin_entry("v", "q2", "question q2?", S, force=True)
    cand2, rel2 = block_data("v", "q2")
    w.write_block("v", "q2", 0, cand2[:P], rel2[:P])
    dead_force = w.pending_version("v", "q2")
    # 3. an interrupted put's temporary, two days old
    partial = _shard(cache, 0, query="q2").with_name("0.0123456789abcdef.partial")
    partial.write_bytes(b"x" * 100)
    os.utime(partial, (partial.stat().st_mtime - 48 * 3600,) * 2)
    # 4. an unfinished entry: its pending version is referenced (resumable), never a leftover
    write_entry(w, "v", "q3", units=[0])
    pending = entry_version(cache, "v", "q3", "pending_version")

    assert tempo(["verify", cache, "--json"]) == 1  # q3 is incomplete; leftovers alone do not fail it
    doc = json.loads(capsys.readouterr().out)
    entry = f"{L.VIDEOS}/v/{L.QUERIES}"
    assert [(x["kind"], x["key"]) for x in doc["leftovers"]] == sorted(
        [
            ("unreferenced_version", f"{entry}/q/{superseded}"),
            ("unreferenced_version", f"{entry}/q2/{dead_force}"),
            ("partial_file", partial.relative_to(cache).as_posix()),
        ],
        key=lambda kv: kv[1],
    )
    assert all(x["nbytes"] > 0 for x in doc["leftovers"])
    ages = {x["kind"]: x["age_s"] for x in doc["leftovers"]}
    assert 0 <= ages["unreferenced_version"] < 3600 and ages["partial_file"] > 47 * 3600
    assert tempo(["verify", cache, "--prune-leftovers"]) == 1  # default: older than 24 h, i.e. the partial file only
    out = capsys.readouterr().out
    assert "pruned 1 leftover(s) older than 24 h" in out and "kept 2 younger" in out
    assert out.count("LEFTOVER unreferenced version") == 2 and not partial.exists()
    assert tempo(["verify", cache, "--prune-leftovers", "--older-than", "0"]) == 1
    assert "pruned 2 leftover(s)" in capsys.readouterr().out
    assert not (Path(cache) / entry / "q" / superseded).exists() and not (Path(cache) / entry / "q2" / dead_force).exists()
    assert (Path(cache) / entry / "q3" / pending).exists()
    assert tempo(["verify", cache, "--entries", "v/q", "v/q2"]) == 0  # both still read, intact
    np.testing.assert_array_equal(CacheReader(cache).entry("v", "q").read_all(), cand.astype(np.float16))
    assert tempo(["verify", cache, "--prune-leftovers", "--older-than", "-1"]) == 2
    nowhere = Path(cache).parent / "no-such-cache"
    assert tempo(["verify", str(nowhere), "--prune-leftovers"]) == 2 and not nowhere.exists()  # refused, not created


def test_v1_cache_is_shardable_without_conversion(tmp_path: Path) -> None:
    from tempo_ops.shards import shard_dataset

    url = _v1_copy(tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    rows = [
        {"video_id": "video-1", "uri": "a.mp4", "queries": [
            {"query_id": "q-a", "text": "question q-a?", "answer": "A"}, {"query_id": "q-b", "text": "question q-b?", "answer": "B"}]},
        {"video_id": "video/2", "uri": "b.mp4", "queries": [{"query_id": "q a", "text": "question q a?", "answer": "C"}]},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    assert tempo(["shards", "--cache", url, "--manifest", str(manifest), "--budgets", "40", "--out", str(out)]) == 0
    samples = list(shard_dataset(str(out / "40-ata")))
    assert sorted(s["meta"]["query_id"] for s in samples) == ["q a", "q-a", "q-b"]
    for s in samples:
        cand, _ = block_data(s["meta"]["video_id"], s["meta"]["query_id"])
        k = s["alloc"]
        np.testing.assert_array_equal(s["tokens"], np.concatenate([cand[i, :n].astype(np.float16) for i, n in enumerate(k)]))


# ---------------------------------------------------------------- fatal storage errors in the v2 write paths
@pytest.mark.parametrize(("err", "code"), [(errno.ENOSPC, "disk_full"), (errno.EROFS, "cache_not_writable")])
def test_fatal_storage_errors_stop_v2_writes_at_once(cache: str, monkeypatch, err: int, code: str) -> None:
    from tempo_ops import fs as fs_mod
    from tempo_ops.errors import TempoError

    w = open_writer(cache)
    cand, rel = block_data("v", "q")
    w.begin_entry("v", "q", "question q?", S, force=True)  # a new version beside the complete one
    calls = [0]

    def failing_put(items, **kwargs):
        calls[0] += 1
        raise OSError(err, os.strerror(err), items[0][0])

    monkeypatch.setattr(fs_mod, "put_local_files", failing_put)
    with pytest.raises(TempoError) as info:
        w.write_block("v", "q", 0, cand[:P], rel[:P])
    assert info.value.code == code and info.value.fatal
    assert calls[0] <= 2  # candidates and relevance puts run together; neither is retried
    monkeypatch.undo()
    e = CacheReader(cache).entry("v", "q")  # the previous complete version still reads, unchanged
    np.testing.assert_array_equal(np.stack(e.read_all()), block_data("v", "q")[0].astype(np.float16))
