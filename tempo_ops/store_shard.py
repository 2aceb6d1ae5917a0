"""Zarr v3 ``sharding_indexed`` shards of the cache arrays: encode, decode the index, verify, plan reads.

Layout v2 appends a crc32c to every inner chunk (inner codecs ``[bytes, crc32c]``), so an inner
chunk is ``C·D·itemsize + 4`` bytes and a read must fetch whole chunks to verify them
(``chunk_crc_ok``, ``chunk_rows_crc_ok``). Layout v1 (below) had no per-chunk checksum; its reads are byte-exact.

A candidates shard holds ``P`` segments × ``K`` tokens × ``D`` channels float16 as inner
chunks of shape ``(1, C, D)`` (``C`` = token chunk), codec ``bytes`` (little endian, no
compression), followed by the shard index (``index_location: end``): an array of shape
``(P, K // C, 1, 2)`` uint64 little endian holding (offset, nbytes) per inner chunk, C order,
``2**64 - 1`` for an absent chunk, then the crc32c of those index bytes (uint32 LE). That is
exactly what zarr writes and reads for the array metadata the cache declares.

Our writer lays the chunks out in C order (segment-major, token-minor) — zarr itself uses
Morton order, which the format allows because the index gives every chunk's place. So the
first ``k`` tokens of a segment are one contiguous byte run, and a budget read needs one
range request per segment (fewer after merging neighbours) with no bytes wasted.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import google_crc32c
import numpy as np

from tempo_ops.errors import CacheCorrupt, EntryIncomplete

EMPTY = np.uint64(2**64 - 1)
CRC_NBYTES = 4


def crc32c_bytes(data: bytes | memoryview | np.ndarray) -> bytes:
    """crc32c of ``data`` as 4 little-endian bytes (what zarr's ``crc32c`` codec appends)."""
    # google_crc32c's C path takes bytes only (numpy rows go through a slow path, memoryviews fail)
    return int(google_crc32c.value(data if isinstance(data, bytes) else bytes(data))).to_bytes(4, "little")


def chunk_crc_ok(chunk: bytes | memoryview) -> bool:
    """True when a v2 chunk (data + 4-byte crc32c) is intact."""
    view = memoryview(chunk)
    return len(view) >= CRC_NBYTES and crc32c_bytes(view[:-CRC_NBYTES]) == bytes(view[-CRC_NBYTES:])


def crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """crc32c of each row of ``rows`` ``(n, nbytes)`` uint8 (rows contiguous, may be strided): ``(n,)`` ``<u4``."""
    # google_crc32c takes each contiguous ndarray row as a buffer: no copy
    return np.fromiter(map(google_crc32c.value, rows), dtype="<u4", count=len(rows))


def encode_index(index: np.ndarray) -> bytes:
    """Index array ``(..., 2)`` uint64 → index bytes + crc32c (LE)."""
    raw = np.ascontiguousarray(index, dtype="<u8").tobytes()
    return raw + crc32c_bytes(raw)


PIECE_NBYTES = 1 << 21  # bytes of chunks encoded per step (four 128 x 2048 bf16 segments): see tempo_ops.store._WRITE_BEHIND


class PieceRing:
    """``count`` reused flat uint8 buffers, handed out in turn by ``take``: a buffer comes back
    ``count`` takes later, so its piece must be finished and written by then.

    Reusing the same memory across shards and blocks matters: a fresh 2 MiB buffer costs 512
    page faults on first touch. On the 2-core VM, converting a 64 MiB entry into fresh buffers
    took ~6 ms longer than into reused ones, and keeping one ring per thread took a bfloat16
    entry write from ~45 to ~37 ms (``bench.bench_store``). The buffers lie side by side in one
    allocation aligned to 2 MiB, which numpy (for an allocation of >= 4 MiB) offers the kernel
    for transparent huge pages: fewer TLB misses in the conversion, the crc32c and the kernel's
    copy of every piece (per 64 MiB entry, alone: cast 13.0 → 11.8 ms, crc32c 12.6 → 11.6 ms,
    write 6.2 → 5.3 ms; in ``bench.bench_store``, the fastest bfloat16 entry 37–41 → 32 ms).
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"a ring needs at least one buffer, got {count}")
        self.buffers: list[np.ndarray | None] = [None] * count
        self.next = 0

    def take(self, nbytes: int) -> np.ndarray:
        """The next buffer's first ``nbytes`` (uint8); all buffers are replaced by larger ones
        when it is smaller (pieces already handed out keep their old memory)."""
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        buf = self.buffers[i]
        if buf is None or buf.nbytes < nbytes:
            self.buffers = _side_by_side(len(self.buffers), nbytes)
            buf = self.buffers[i]
        return buf[:nbytes]


_HUGE_PAGE = 1 << 21
_PAGE = 1 << 12


def _side_by_side(count: int, nbytes: int) -> list[np.ndarray | None]:
    """``count`` flat uint8 buffers of ``nbytes``, page-aligned, in one allocation aligned to 2 MiB."""
    stride = -(-nbytes // _PAGE) * _PAGE
    raw = np.empty(count * stride + _HUGE_PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % _HUGE_PAGE
    return [raw[start + i * stride :][:nbytes] for i in range(count)]


_THREAD_RINGS = threading.local()


def thread_piece_ring(count: int) -> PieceRing:
    """This thread's ring of ``count`` buffers, kept for the thread's lifetime (``count`` x ~2 MiB).

    One thread writes one put at a time (``tempo_ops.fs.put_local_files`` returns only once its
    writer thread is joined), so consecutive puts of a thread can share the ring.
    """
    ring = getattr(_THREAD_RINGS, "ring", None)
    if ring is None or len(ring.buffers) != count:
        ring = _THREAD_RINGS.ring = PieceRing(count)
    return ring


class ShardEncoder:
    """One shard object, encoded segment by segment: chunk data, then each chunk's crc32c
    (layout v2), then the index (with its crc32c).

    ``n`` segments of ``tokens`` tokens of ``width`` values (``dtype``) are present (n <= P);
    chunks are ``(1, token_chunk, width)``, C order, segment-major. A caller's ``fill(dst, s0)``
    converts or copies segments ``[s0, s0 + m)`` straight into ``dst``, a view
    ``(m, tokens // token_chunk, token_chunk, width)`` of the stored dtype (a source
    ``(m, tokens, width)`` reshapes to it for free), so values are written once, into one of a
    few reused buffers of ~2 MiB; ``fill`` may raise to abandon the shard.
    """

    def __init__(
        self,
        n: int,
        tokens: int,
        width: int,
        dtype: np.dtype | str,
        segments_per_shard: int,
        token_chunk: int,
        *,
        checksum: bool = True,
    ) -> None:
        self.dtype = np.dtype(dtype)
        if n > segments_per_shard or tokens % token_chunk:
            raise ValueError(f"({n}, {tokens}, {width}) does not fit a shard of {segments_per_shard} x {tokens}/{token_chunk}")
        self.n, self.tokens, self.width, self.token_chunk = n, tokens, width, token_chunk
        self.checksum = checksum
        self.chunks_per_segment = tokens // token_chunk
        self.data_nbytes = token_chunk * width * self.dtype.itemsize
        self.chunk_nbytes = self.data_nbytes + (CRC_NBYTES if checksum else 0)
        index = np.full((segments_per_shard, self.chunks_per_segment, 1, 2), EMPTY, dtype=np.uint64)
        offsets = np.arange(n * self.chunks_per_segment, dtype=np.uint64) * np.uint64(self.chunk_nbytes)
        index[:n, :, 0, 0] = offsets.reshape(n, self.chunks_per_segment)
        index[:n, :, 0, 1] = self.chunk_nbytes
        self.index_bytes = encode_index(index)
        self.nbytes = n * self.chunks_per_segment * self.chunk_nbytes + len(self.index_bytes)

    def pieces(
        self,
        fill: Callable[[np.ndarray, int], None],
        piece_nbytes: int | None = None,
        *,
        out: np.ndarray | None = None,
        ring: PieceRing | None = None,
    ) -> Iterator[Callable[[], np.ndarray]]:
        """The shard object as consecutive pieces of about ``piece_nbytes`` (default
        ``PIECE_NBYTES``), the last one the index: each a zero-argument callable that finishes
        the piece (its chunks' crc32c) and returns it, uint8.

        ``fill`` runs when a piece is asked for; finishing may run later and on another thread
        (``tempo_ops.fs.put_local_files`` with ``write_behind=len(ring.buffers) - 1`` finishes
        and writes on its writer thread). Every piece but the index is a view of a buffer of ``ring``
        (default: a new ring of one buffer); encoders may share a ring: finish and consume
        (write) a piece before ``ring`` has handed out ``len(ring.buffers)`` more. With ``out``
        (``nbytes`` uint8) the pieces are encoded in place into it instead, so that once all
        are finished it holds the whole object.
        """
        cps = self.chunks_per_segment
        piece_nbytes = PIECE_NBYTES if piece_nbytes is None else piece_nbytes
        per_piece = max(1, min(self.n, piece_nbytes // (cps * self.chunk_nbytes)))
        ring = PieceRing(1) if ring is None and out is None else ring
        for s0 in range(0, self.n, per_piece):
            m = min(per_piece, self.n - s0)
            span = m * cps * self.chunk_nbytes
            flat = out[s0 * cps * self.chunk_nbytes :][:span] if out is not None else ring.take(span)
            body = flat.reshape(m * cps, self.chunk_nbytes)
            # splits axes only, so always a view of the buffer (merging chunk rows would copy: the crcs lie between)
            fill(body[:, : self.data_nbytes].view(self.dtype).reshape(m, cps, self.token_chunk, self.width), s0)
            yield functools.partial(self._finish, body)
        index = np.frombuffer(self.index_bytes, dtype=np.uint8)
        if out is not None:
            out[self.nbytes - len(index) :] = index
        yield functools.partial(np.asarray, index)

    def _finish(self, body: np.ndarray) -> np.ndarray:
        """A filled piece ``(rows, chunk_nbytes)`` uint8 with its chunks' crc32c written: flat uint8."""
        if self.checksum:
            body[:, self.data_nbytes :] = crc32c_rows(body[:, : self.data_nbytes]).view(np.uint8).reshape(-1, CRC_NBYTES)
        return body.reshape(-1)

    def encode(self, fill: Callable[[np.ndarray, int], None]) -> np.ndarray:
        """The whole shard object (uint8 array), for stores that take one object per put."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        for finish in self.pieces(fill, out=out):
            finish()
        return out


def encode_shard(block: np.ndarray, segments_per_shard: int, token_chunk: int, *, checksum: bool = True) -> np.ndarray:
    """Encode ``block`` ``(n, T, W)`` (n <= P; little-endian values) as one shard object (uint8 array).

    Inner chunks are ``(1, token_chunk, W)`` in C order; with ``checksum`` (layout v2) each
    is followed by its crc32c. Segments ``n..P-1`` (past the end of the array) are absent in
    the index.
    """
    n, k, w = block.shape

    def fill(dst: np.ndarray, s0: int) -> None:
        dst[...] = block[s0 : s0 + len(dst)].reshape(dst.shape)

    return ShardEncoder(n, k, w, block.dtype, segments_per_shard, token_chunk, checksum=checksum).encode(fill)


def decode_index(raw: bytes, segments_per_shard: int, chunks_per_segment: int, *, item: str) -> np.ndarray:
    """Index bytes (with crc32c) → ``(P, K//C, 2)`` uint64. CacheCorrupt if short or damaged."""
    expected = segments_per_shard * chunks_per_segment * 16 + 4
    if len(raw) != expected:
        raise CacheCorrupt(f"shard index has {len(raw)} bytes, expected {expected} (truncated shard)", item=item)
    body, crc = raw[:-4], raw[-4:]
    if crc32c_bytes(body) != crc:
        raise CacheCorrupt("shard index checksum mismatch (damaged or partial shard)", item=item)
    return np.frombuffer(body, dtype="<u8").reshape(segments_per_shard, chunks_per_segment, 2)


def chunk_rows_crc_ok(rows: np.ndarray) -> np.ndarray:
    """Which v2 chunks of ``rows`` ``(n, chunk_nbytes)`` uint8 (chunks back to back: data, then
    its 4-byte crc32c) are intact: ``(n,)`` bool, without copying the data."""
    return crc32c_rows(rows[:, :-CRC_NBYTES]) == np.ascontiguousarray(rows[:, -CRC_NBYTES:]).view("<u4").reshape(-1)


def check_shard(
    index: np.ndarray, n_segments_in_shard: int, chunk_nbytes: int, data_nbytes: int, *, item: str
) -> None:
    """Verify every in-bounds chunk is present, has ``chunk_nbytes`` and lies inside the data."""
    used = index[:n_segments_in_shard]
    if np.any(used[..., 0] == EMPTY):
        missing = sorted({int(s) for s in np.nonzero(used[..., 0] == EMPTY)[0]})
        raise EntryIncomplete(f"shard lacks chunks of local segments {missing[:10]}", item=item)
    if np.any(used[..., 1] != chunk_nbytes):
        raise EntryIncomplete(f"shard chunks are not {chunk_nbytes} bytes (compressed or damaged)", item=item)
    if int((used[..., 0] + used[..., 1]).max()) > data_nbytes:
        raise EntryIncomplete("shard chunk offsets point past the shard's data (truncated shard)", item=item)


@dataclass(frozen=True)
class Piece:
    """``nbytes`` bytes at ``offset`` in a shard → ``out`` rows starting at ``out_row`` (token rows)."""

    offset: int
    nbytes: int
    out_row: int


def plan_segment(
    index: np.ndarray, local_segment: int, start: int, stop: int, token_chunk: int, token_nbytes: int, out_row: int
) -> list[Piece]:
    """Byte pieces of tokens ``[start, stop)`` of one segment, merged where chunks are contiguous.

    Reads exactly ``(stop - start) * token_nbytes`` bytes (chunks are uncompressed).
    """
    pieces: list[Piece] = []
    tok = start
    while tok < stop:
        c = tok // token_chunk
        chunk_off = int(index[local_segment, c, 0])
        if chunk_off == int(EMPTY):
            raise EntryIncomplete(f"chunk {c} of local segment {local_segment} is absent", item="shard")
        end_tok = min(stop, (c + 1) * token_chunk)
        offset = chunk_off + (tok - c * token_chunk) * token_nbytes
        nbytes = (end_tok - tok) * token_nbytes
        if pieces and pieces[-1].offset + pieces[-1].nbytes == offset:
            last = pieces[-1]
            pieces[-1] = Piece(last.offset, last.nbytes + nbytes, last.out_row)
        else:
            pieces.append(Piece(offset, nbytes, out_row + (tok - start)))
        tok = end_tok
    return pieces


def merge_pieces(pieces: list[Piece], token_nbytes: int) -> list[tuple[int, int, list[Piece]]]:
    """Group byte-adjacent pieces (in offset order) into requests ``(offset, nbytes, pieces)``.

    Only pieces whose output rows are also consecutive are merged, so a request's bytes
    land in one contiguous slice of the output.
    """
    requests: list[tuple[int, int, list[Piece]]] = []
    for p in sorted(pieces, key=lambda p: p.offset):
        if requests:
            off, n, group = requests[-1]
            last = group[-1]
            if off + n == p.offset and last.out_row + last.nbytes // token_nbytes == p.out_row:
                requests[-1] = (off, n + p.nbytes, [*group, p])
                continue
        requests.append((p.offset, p.nbytes, [p]))
    return requests
