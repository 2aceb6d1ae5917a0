"""Pipelined local writes: ``put_local_files(write_behind=n)``, the encoders' buffer ring, and the
calling-thread torch thread limit the cache writer runs its casts under."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_store_support import C, P, S, block_data, make_config, make_meta

import tempo_ops.fs as fs_mod
import tempo_ops.store as store_mod
import tempo_ops.store_shard as shard_mod
from schemas import cache_layout as L
from tempo_ops.fs import put_local_files
from tempo_ops.store import CacheReader, CacheWriter, quantize_int8, to_bf16_bits
from tempo_ops.store_shard import encode_shard
from tempo_ops.torch_threads import this_thread_torch_threads

WRITER_THREAD = "tempo-put-local-files"


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WRITER_THREAD]


def _slow_writes(monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.002) -> None:
    """Every piece write waits first: a producer that ran ahead of the writer would overwrite
    buffers not yet written."""
    real = fs_mod._write_piece

    def slow(fd: int, piece: object) -> None:
        time.sleep(delay_s)
        real(fd, piece)

    monkeypatch.setattr(fs_mod, "_write_piece", slow)


@pytest.mark.parametrize("write_behind", [1, 3])
def test_a_producer_cycling_through_n_plus_1_buffers_is_paced_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_behind: int
) -> None:
    _slow_writes(monkeypatch)
    ring = [np.zeros(256, dtype=np.uint8) for _ in range(write_behind + 1)]
    made = [0]  # one turn through the ring across both files, as the cache encoders take it
    threads: set[str] = set()

    def pieces(first: int, count: int):
        for value in range(first, first + count):
            buf = ring[made[0] % len(ring)]
            made[0] += 1
            buf[:] = value
            if value % 2:  # a finishing callable runs on the writer thread, just before its write
                def finish(b=buf):
                    threads.add(threading.current_thread().name)
                    return b
                yield finish
            else:
                yield buf

    a, b = tmp_path / "a" / "x", tmp_path / "b"
    put_local_files([(str(a), pieces(0, 12)), (str(b), pieces(100, 9))], write_behind=write_behind)
    assert a.read_bytes() == b"".join(bytes([v]) * 256 for v in range(12))
    assert b.read_bytes() == b"".join(bytes([v]) * 256 for v in range(100, 109))
    assert threads == {WRITER_THREAD}
    assert not _writer_threads() and sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b", "x"]


def test_inline_writes_finish_callables_in_the_calling_thread(tmp_path: Path) -> None:
    seen: list[str] = []

    def finish() -> bytes:
        seen.append(threading.current_thread().name)
        return b"abc"

    put_local_files([(str(tmp_path / "f"), [finish, b"def"])])
    assert (tmp_path / "f").read_bytes() == b"abcdef" and seen == [threading.current_thread().name]


@pytest.mark.parametrize("write_behind", [0, 2])
def test_a_failing_producer_leaves_every_target_unchanged(tmp_path: Path, write_behind: int) -> None:
    (tmp_path / "b").write_bytes(b"old b")

    def failing():
        for _ in range(5):
            yield np.ones(1000, dtype=np.uint8)
        raise RuntimeError("value check failed")

    with pytest.raises(RuntimeError, match="value check failed"):
        put_local_files([(str(tmp_path / "a"), [b"new a"]), (str(tmp_path / "b"), failing())], write_behind=write_behind)
    assert (tmp_path / "b").read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no target, no temporary
    assert not _writer_threads()


@pytest.mark.parametrize("fail_in", ["finish", "write"])
def test_a_failed_write_on_the_writer_thread_is_raised_in_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    (tmp_path / "b").write_bytes(b"old b")
    asked = [0]
    behind = 2
    if fail_in == "write":
        real = fs_mod._write_piece
        writes = [0]

        def failing_write(fd: int, piece: object) -> None:
            writes[0] += 1
            if writes[0] == 3:
                raise OSError(errno.EIO, "I/O error")
            real(fd, piece)

        monkeypatch.setattr(fs_mod, "_write_piece", failing_write)

    def pieces():
        for i in range(50):
            asked[0] += 1
            if fail_in == "finish" and i == 2:
                def broken():
                    raise OSError(errno.EIO, "I/O error")
                yield broken
            else:
                yield b"x" * 100
            time.sleep(0.001)

    with pytest.raises(OSError) as info:
        put_local_files([(str(tmp_path / "b"), pieces())], write_behind=behind)
    assert info.value.errno == errno.EIO  # the original error, so the retry helpers classify it
    assert asked[0] < 50  # the producer stopped soon after, not at the end
    assert (tmp_path / "b").read_bytes() == b"old b" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert not _writer_threads()


def test_this_thread_torch_threads_changes_the_calling_thread_only() -> None:
    import torch

    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("one intra-op thread already: nothing to limit")
    other: list[int] = []
    with this_thread_torch_threads(1) as applied:
        assert applied  # the pinned torch build uses OpenMP
        assert torch.get_num_threads() == 1
        t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        t.start()
        t.join()
        x = torch.arange(100_000, dtype=torch.float32) % 2048  # exact in float16
        assert torch.equal(x.half().float(), x)  # ops run (on one thread)
    assert other == [before] and torch.get_num_threads() == before


def test_without_openmp_the_limit_is_not_applied_and_the_writer_writes_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempo_ops.torch_threads as tt

    monkeypatch.setattr(tt, "_openmp", lambda: None)
    with this_thread_torch_threads(1) as applied:
        assert not applied
    calls: list[int] = []
    real = fs_mod.put_local_files

    def spy(items, **kwargs):
        calls.append(kwargs.get("write_behind", 0))
        return real(items, **kwargs)

    monkeypatch.setattr(fs_mod, "put_local_files", spy)
    w = CacheWriter.open(str(tmp_path / "c"), make_config(), segments_per_shard=P, token_chunk=C)
    w.write_video("v", make_meta())
    cand, rel = block_data("v", "q")
    w.begin_entry("v", "q", "question q?", S)
    w.write_block("v", "q", 0, cand[:P], rel[:P])
    assert calls and set(calls) == {0}
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(fs_mod, "put_local_files", spy)
    w.write_block("v", "q", P, cand[P : 2 * P], rel[P : 2 * P])
    assert calls[0] == store_mod._WRITE_BEHIND > 0  # candidates pipelined where the limit applies


@pytest.mark.parametrize("form", ["float16", "bfloat16", "int8"])
def test_pipelined_shards_with_small_pieces_and_a_slow_writer_equal_encode_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Many pieces per shard, several shards in one put, a writer that lags:
    every shard's bytes still equal the zarr-compatible encoding, and the entry reads back."""
    monkeypatch.setattr(shard_mod, "PIECE_NBYTES", 1)  # one segment per piece: 4 pieces per shard
    _slow_writes(monkeypatch, 0.0005)
    cand, rel = block_data("v", "q")
    cand = cand * 3.7
    url = str(tmp_path / form)
    config = make_config()
    config["stored_dtype"] = form
    w = CacheWriter.open(url, config, segments_per_shard=P, token_chunk=C)
    w.write_video("v", make_meta())
    w.begin_entry("v", "q", "question q?", S)
    w.write_block("v", "q", 0, cand, rel)  # every shard of the entry in one block: one put
    w.finalize_entry("v", "q")
    version = CacheReader(url).entry("v", "q").version
    for shard in range(-(-S // P)):
        block = cand[shard * P : (shard + 1) * P]
        stored = {"float16": lambda b: b.astype("<f2"), "bfloat16": to_bf16_bits}.get(form, lambda b: quantize_int8(b)[0])(block)
        want = encode_shard(stored, P, C).tobytes()
        assert (Path(url) / L.candidates_shard_key("v", "q", shard, version)).read_bytes() == want, shard
    got = CacheReader(url).entry("v", "q").read_all()
    if form == "float16":
        np.testing.assert_array_equal(np.stack(got), cand.astype(np.float16))
    assert not _writer_threads()


def test_a_piece_ring_hands_out_its_buffers_in_turn_and_grows_them_when_one_is_too_small() -> None:
    ring = shard_mod.PieceRing(3)
    first = [ring.take(100) for _ in range(3)]
    assert len({a.__array_interface__["data"][0] for a in first}) == 3  # three distinct buffers
    again = ring.take(60)  # the 4th take is the 1st buffer again, viewed shorter
    assert again.nbytes == 60 and np.shares_memory(again, first[0])
    again[:] = 7
    grown = ring.take(200)  # the 2nd buffer is too small: all are replaced, none overrun
    assert grown.nbytes == 200 and not any(np.shares_memory(grown, a) for a in first)
    grown[:] = 9
    assert (again == 7).all()  # a piece handed out before the growth keeps its memory
    third = ring.take(150)  # the new 3rd buffer fits 150
    assert not any(np.shares_memory(third, a) for a in [*first, grown])
    assert not np.shares_memory(ring.take(10), again)  # the 1st was replaced too, though 10 bytes fit it
    with pytest.raises(ValueError):
        shard_mod.PieceRing(0)


def test_a_piece_ring_lays_its_buffers_side_by_side_from_a_huge_page_boundary() -> None:
    """One allocation, 2 MiB-aligned, buffers page-aligned: numpy offers an allocation this large
    to the kernel for transparent huge pages (fewer TLB misses per piece)."""
    ring = shard_mod.PieceRing(4)
    nbytes = (1 << 21) + 256  # a 2 MiB piece and its chunks' crc32c
    bufs = [ring.take(nbytes) for _ in range(4)]
    addrs = [b.__array_interface__["data"][0] for b in bufs]
    assert addrs[0] % (1 << 21) == 0
    assert all(a % 4096 == 0 for a in addrs)
    assert [b - a for a, b in zip(addrs, addrs[1:])] == [(1 << 21) + 4096] * 3
    assert all(b.base is bufs[0].base for b in bufs) and all(b.nbytes == nbytes for b in bufs)


def test_each_thread_keeps_one_ring_across_puts() -> None:
    ring = shard_mod.thread_piece_ring(4)
    assert shard_mod.thread_piece_ring(4) is ring
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(shard_mod.thread_piece_ring(4)))
    t.start()
    t.join()
    assert other[0] is not ring  # a writer shared by threads never shares buffers between them
    assert len(shard_mod.thread_piece_ring(1).buffers) == 1  # another size: a new ring for this thread


@pytest.mark.parametrize("form", ["float16", "bfloat16"])
def test_consecutive_puts_reuse_the_thread_ring_without_new_memory_and_stay_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Blocks of two caches with different chunk sizes, written alternately by one thread through a
    lagging writer: every shard equals the zarr-compatible encoding, and after the first blocks
    the ring hands out the same memory (no fresh pages per put)."""
    with this_thread_torch_threads(1) as pipelined:  # the writer's ring: write_behind + 1 buffers
        count = store_mod._WRITE_BEHIND + 1 if pipelined else 1
    monkeypatch.setattr(shard_mod, "PIECE_NBYTES", 1)  # one segment per piece
    _slow_writes(monkeypatch, 0.0005)
    writers, data = {}, {}
    for width in (32, 48):  # chunk rows of 4 * 32 * 2 and 4 * 48 * 2 bytes (+ crc)
        config = make_config(hidden_size=width)
        config["stored_dtype"] = form
        url = str(tmp_path / f"{form}-{width}")
        w = CacheWriter.open(url, config, segments_per_shard=P, token_chunk=C)
        w.write_video("v", make_meta())
        w.begin_entry("v", "q", "question q?", S)
        rng = np.random.default_rng(width)
        data[width] = ((rng.standard_normal((S, 16, width)) * 5).astype(np.float32), rng.random(S).astype(np.float32))
        writers[width] = (url, w)
    takers: list[shard_mod.PieceRing] = []
    real_take = shard_mod.PieceRing.take

    def take(self: shard_mod.PieceRing, nbytes: int) -> np.ndarray:
        takers.append(self)
        return real_take(self, nbytes)

    monkeypatch.setattr(shard_mod.PieceRing, "take", take)
    seen: list[set[int]] = []
    for s0 in range(0, S, P):
        for width, (_, w) in writers.items():
            cand, rel = data[width]
            w.write_block("v", "q", s0, cand[s0 : s0 + P], rel[s0 : s0 + P])
        ring = shard_mod.thread_piece_ring(count)
        seen.append({b.__array_interface__["data"][0] for b in ring.buffers if b is not None})
    assert takers and all(r is ring for r in takers)  # every piece of every put came from this thread's ring
    assert seen[1] == seen[-1]  # the wider cache's first block sized the buffers; later puts reuse them
    for width, (url, w) in writers.items():
        w.finalize_entry("v", "q")
        cand, _ = data[width]
        version = CacheReader(url).entry("v", "q").version
        for shard in range(-(-S // P)):
            block = cand[shard * P : (shard + 1) * P]
            stored = block.astype("<f2") if form == "float16" else to_bf16_bits(block)
            got = (Path(url) / L.candidates_shard_key("v", "q", shard, version)).read_bytes()
            assert got == encode_shard(stored, P, C).tobytes(), (width, shard)
    assert not _writer_threads()
