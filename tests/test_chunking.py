"""consecutive_chunks: the one greedy cutter behind cost batching and shard assignment."""

from tempo_ops.chunking import consecutive_chunks


def test_cuts_before_the_item_that_would_exceed_the_cap():
    assert consecutive_chunks([40, 50, 20, 30, 100, 1], 100) == [[0, 1], [2, 3], [4], [5]]


def test_oversized_item_gets_its_own_chunk_and_order_is_kept():
    assert consecutive_chunks([5, 300, 5, 5], 100) == [[0], [1], [2, 3]]


def test_empty_and_exact_fit():
    assert consecutive_chunks([], 10) == []
    assert consecutive_chunks([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
