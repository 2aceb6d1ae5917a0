"""Packing: head/tail selection against the raw arrays, minimal reads, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from tempo_ops.errors import PackingError
from tempo_ops.packing import format_timestamp, pack, token_ranges


class FakeEntryReader:
    """In-memory stand-in for ``tempo_ops.store.EntryReader`` that records what is read."""

    def __init__(self, data: np.ndarray, video_id: str = "v", query_id: str = "q") -> None:
        self.data = data.astype(np.float16)
        self.n_segments, self.K, self.D = data.shape
        self.video_id, self.query_id = video_id, query_id
        self.timestamps = [(8 * i + 4) / 2.0 for i in range(self.n_segments)]
        self.timestamp_texts = [format_timestamp(t) for t in self.timestamps]
        self.query_text = "what happens?"
        self.calls: list[list[tuple[int, int]]] = []
        self.rows_read = 0

    def relevance(self) -> np.ndarray:
        return np.linspace(0, 1, self.n_segments, dtype=np.float32)

    def read_token_ranges(self, ranges):
        ranges = list(ranges)
        assert len(ranges) == self.n_segments  # one range per segment
        self.calls.append(ranges)
        out = []
        for i, (a, b) in enumerate(ranges):
            assert 0 <= a <= b <= self.K
            self.rows_read += b - a
            out.append(self.data[i, a:b].copy())
        return out

    def read_all(self) -> np.ndarray:
        return self.data.copy()


def make_reader(S=5, K=16, D=6, seed=0) -> FakeEntryReader:
    rng = np.random.default_rng(seed)
    return FakeEntryReader(rng.standard_normal((S, K, D)).astype(np.float16))


def test_pack_head_matches_raw_arrays():
    r = make_reader()
    k = np.array([3, 0, 16, 1, 5])
    p = pack(r, k, r.timestamps)
    expected = np.concatenate([r.data[i, : k[i]] for i in range(5)])
    assert p.tokens.dtype == np.float16 and p.tokens.shape == (25, 6)
    assert np.array_equal(p.tokens, expected)
    assert p.offsets.tolist() == [0, 3, 3, 19, 20, 25]
    assert p.offsets.dtype == np.int64
    assert p.timestamp_texts == ["<2.0 seconds>", "<6.0 seconds>", "<10.0 seconds>", "<14.0 seconds>", "<18.0 seconds>"]
    assert p.allocation.tolist() == k.tolist()
    assert r.rows_read == 25  # only what is kept is read
    assert r.calls == [[(0, 3), (0, 0), (0, 16), (0, 1), (0, 5)]]


def test_pack_tail_matches_raw_arrays():
    r = make_reader()
    k = np.array([3, 0, 16, 1, 5])
    p = pack(r, k, r.timestamp_texts, mode="tail")
    expected = np.concatenate([r.data[i, r.K - k[i] :] for i in range(5) if k[i]])
    assert np.array_equal(p.tokens, expected)
    assert r.calls == [[(13, 16), (0, 0), (0, 16), (15, 16), (11, 16)]]
    for i in range(5):
        seg = p.tokens[p.offsets[i] : p.offsets[i + 1]]
        assert np.array_equal(seg, r.data[i, r.K - k[i] :] if k[i] else r.data[i, :0])


def test_pack_all_zero_reads_nothing():
    r = make_reader()
    p = pack(r, np.zeros(5, dtype=np.int64), r.timestamps)
    assert p.tokens.shape == (0, 6)
    assert p.offsets.tolist() == [0] * 6
    assert r.calls == []


def test_token_ranges():
    assert token_ranges(np.array([2, 0, 4]), 4, "head") == [(0, 2), (0, 0), (0, 4)]
    assert token_ranges(np.array([2, 0, 4]), 4, "tail") == [(2, 4), (0, 0), (0, 4)]


@pytest.mark.parametrize(
    ("alloc", "timestamps", "mode", "needle"),
    [
        ([1, 2, 3], None, "head", "segments"),
        ([1, 2, 3, 4, 17], None, "head", r"\[0, 16\]"),
        ([1, 2, 3, 4, -1], None, "head", r"\[0, 16\]"),
        ([1.5, 2, 3, 4, 1], None, "head", "integer"),
        ([[1, 2, 3, 4, 1]], None, "head", "1-D"),
        ([1, 2, 3, 4, 1], [0.0, 1.0], "head", "timestamps"),
        ([1, 2, 3, 4, 1], None, "middle", "mode"),
    ],
)
def test_pack_rejects_bad_input(alloc, timestamps, mode, needle):
    r = make_reader()
    with pytest.raises(PackingError, match=needle) as info:
        pack(r, alloc, r.timestamps if timestamps is None else timestamps, mode=mode)
    assert "v/q" in str(info.value)


def test_pack_rejects_wrong_block_shape():
    class Broken(FakeEntryReader):
        def read_token_ranges(self, ranges):
            return [np.zeros((1, self.D), np.float16) for _ in ranges]

    r = Broken(np.zeros((2, 4, 3)))
    with pytest.raises(PackingError, match="shape"):
        pack(r, [2, 2], [0.0, 1.0])
