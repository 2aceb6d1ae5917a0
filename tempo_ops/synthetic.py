"""Synthetic test videos with identifiable frames (tests, demo, benchmarks).

Every frame written by :func:`write_test_video` carries its frame number in a 5 x 4 grid of
large flat cells (the grid spans the whole frame, so it survives lossy compression): four
corner cells are orientation markers (top-left bright, the other three dark) and the other
16 cells hold the frame number's bits (most significant first, row-major). Bright cells
are luma ~208, dark ones ~48; the ``"gradient"`` pattern adds a gentle colour gradient on
top (texture for the encoder) that never crosses the 128 threshold.
:func:`read_frame_number` decodes a frame back to its number, or None when the markers do
not match (e.g. the frame is rotated or mirrored relative to how it was written).

Rotation metadata follows :class:`tempo_ops.video.VideoInfo`: ``rotation`` is the
clockwise angle (0/90/180/270) a player turns the coded picture to show it upright, i.e.
the legacy ffmpeg ``rotate`` tag. It is stored as the container's display matrix.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import fsspec
import numpy as np

GRID_COLS = 5
GRID_ROWS = 4
_MARKERS = {0: 1, GRID_COLS - 1: 0, (GRID_ROWS - 1) * GRID_COLS: 0, GRID_ROWS * GRID_COLS - 1: 0}
_DATA_CELLS = [k for k in range(GRID_ROWS * GRID_COLS) if k not in _MARKERS]
MAX_FRAME_NUMBER = 2 ** len(_DATA_CELLS) - 1  # 65535
_BRIGHT, _DARK = 208, 48
_PATTERNS = ("gradient", "blocks", "texture")
_CODECS = {"h264": "libx264", "libx264": "libx264", "mpeg4": "mpeg4", "hevc": "libx265", "vp9": "libvpx-vp9"}
_CONTAINERS = ("mp4", "avi")
_VOP_START = b"\x00\x00\x01\xb6"  # MPEG-4 Part 2 start code of a picture (VOP)
_DIVX_PACKED_USER_DATA = b"\x00\x00\x01\xb2DivX503b1393p"  # user data that flags packed B-frames


def _cell_edges(size: int, parts: int) -> list[int]:
    return [round(i * size / parts) for i in range(parts + 1)]


def frame_bits(frame_number: int) -> list[int]:
    """The 20 cell values (0/1, row-major) that encode ``frame_number`` (0..65535)."""
    if not 0 <= frame_number <= MAX_FRAME_NUMBER:
        raise ValueError(f"frame number {frame_number} outside 0..{MAX_FRAME_NUMBER}")
    bits = [0] * (GRID_ROWS * GRID_COLS)
    for k, v in _MARKERS.items():
        bits[k] = v
    for j, k in enumerate(_DATA_CELLS):
        bits[k] = (frame_number >> (len(_DATA_CELLS) - 1 - j)) & 1
    return bits


@functools.lru_cache(maxsize=4)
def _texture(width: int, height: int) -> np.ndarray:
    """Smooth-ish random texture ``(height, width) int16`` in [-40, 40] (seeded)."""
    rng = np.random.default_rng(width * 100003 + height)
    small = rng.integers(-40, 41, size=(max(1, height // 4) + 1, max(1, width // 4) + 1)).astype(np.int16)
    return np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)[:height, :width]


def make_frame(frame_number: int, width: int, height: int, pattern: str = "gradient") -> np.ndarray:
    """One RGB frame ``(height, width, 3) uint8`` encoding ``frame_number``."""
    bits = frame_bits(frame_number)
    xs, ys = _cell_edges(width, GRID_COLS), _cell_edges(height, GRID_ROWS)
    img = np.empty((height, width, 3), np.int16)
    for r in range(GRID_ROWS):
        for c in range(GRID_COLS):
            img[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = _BRIGHT if bits[r * GRID_COLS + c] else _DARK
    if pattern == "gradient":
        gx = np.linspace(-24, 24, width, dtype=np.float32)[None, :]
        gy = np.linspace(-24, 24, height, dtype=np.float32)[:, None]
        img[..., 0] += gx.astype(np.int16)
        img[..., 2] += gy.astype(np.int16)
    elif pattern == "texture":
        # A panning noise texture (2 px per frame): realistic decoding cost for benchmarks.
        tex = _texture(width, height)
        img += np.roll(tex, shift=2 * frame_number, axis=1)[..., None]
    elif pattern != "blocks":
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {_PATTERNS}")
    return np.clip(img, 0, 255).astype(np.uint8)


def read_frame_number(rgb: np.ndarray) -> int | None:
    """Decode the frame number from an RGB frame ``(H, W, 3) uint8`` in written orientation.

    Works on resized frames too (the grid is proportional). Returns None when the
    orientation markers do not match or the frame is too small to hold the grid.
    """
    h, w = rgb.shape[:2]
    if h < GRID_ROWS or w < GRID_COLS:
        return None
    xs, ys = _cell_edges(w, GRID_COLS), _cell_edges(h, GRID_ROWS)
    luma = rgb.astype(np.float32).mean(axis=2)
    bits = []
    for r in range(GRID_ROWS):
        for c in range(GRID_COLS):
            y0, y1, x0, x1 = ys[r], ys[r + 1], xs[c], xs[c + 1]
            # Read the cell's centre half: edges blur under compression and resizing.
            cy0, cy1 = y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4
            cx0, cx1 = x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4
            cell = luma[cy0 : max(cy1, cy0 + 1), cx0 : max(cx1, cx0 + 1)]
            bits.append(1 if float(cell.mean()) > 128 else 0)
    if any(bits[k] != v for k, v in _MARKERS.items()):
        return None
    value = 0
    for k in _DATA_CELLS:
        value = (value << 1) | bits[k]
    return value


def vfr_times(n_frames: int, fps: float) -> list[float]:
    """Irregular presentation times (s) for a variable-frame-rate video of mean rate ~``fps``.

    Frame durations cycle through 1.5, 1.5, 0.5, 0.5, 1.0 nominal periods (mean 1.0), so
    frame k is usually *not* the frame shown at time k / fps.
    """
    pattern = (1.5, 1.5, 0.5, 0.5, 1.0)
    times, t = [], 0.0
    for i in range(n_frames):
        times.append(round(t, 3))
        t += pattern[i % len(pattern)] / fps
    return times


def _sink(url: str) -> io.BytesIO | str:
    """Where PyAV writes: the path itself when local, else a buffer flushed by ``_flush_sink``."""
    return url if "://" not in url else io.BytesIO()


def _encode_all(container, stream, frames) -> None:
    """Encode every frame of ``frames`` into ``stream``, flush the encoder, and mux all packets."""
    for frame in frames:
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _flush_sink(url: str, sink: io.BytesIO | str) -> None:
    """Upload a buffered video to its fsspec URL (no-op for local paths)."""
    if isinstance(sink, io.BytesIO):
        with fsspec.open(url, "wb") as fh:
            fh.write(sink.getvalue())


def write_test_video(
    path: str | os.PathLike,
    *,
    n_frames: int,
    fps: float,
    width: int,
    height: int,
    codec: str = "h264",
    gop: int | None = None,
    rotation: int = 0,
    vfr: bool = False,
    pattern: str = "gradient",
    audio_only: bool = False,
    preset: str | None = None,
    bit_rate: int | None = None,
    faststart: bool = False,
    container: str = "mp4",
    bframes: int | None = None,
    packed_bframes: bool = False,
    frame_source: Callable[[int], np.ndarray] | None = None,
) -> str:
    """Write a video (MP4 or AVI) whose frame ``i`` shows the number ``i`` (see module docstring).

    Args:
        path: local path or fsspec URL (e.g. ``memory://v/a.mp4``).
        n_frames: number of frames (1..65536); fps: nominal frame rate (frames/s).
        width, height: coded size in px. Odd sizes are written as yuv444p (H.264 only);
            even sizes as yuv420p.
        codec: ``"h264"`` (libx264) or ``"mpeg4"`` (also ``"hevc"``, ``"vp9"``).
        gop: key-frame interval in frames (None: encoder default).
        rotation: clockwise display rotation, 0/90/180/270 (display-matrix metadata).
        vfr: irregular presentation times (:func:`vfr_times`), time base 1/1000 s.
        pattern: ``"gradient"``, ``"blocks"`` (flat cells) or ``"texture"`` (panning noise on
            top of the cells: costlier to encode and decode, used by the benchmark).
        audio_only: write an audio-only file instead (see :func:`write_audio_only`).
        preset: x264 preset (e.g. ``"ultrafast"`` for long benchmark videos).
        bit_rate: target bit rate in bit/s (None: encoder default / quality mode).
        faststart: put the MP4 index before the data (as streaming uploads do); local paths only.
        container: ``"mp4"`` or ``"avi"``.
        bframes: most consecutive B-frames (None: encoder default). For ``"mpeg4"`` this also
            makes closed GOPs (as Xvid/DivX write them).
        packed_bframes: ``"mpeg4"`` in ``"avi"`` with B-frames only: store them the way
            DivX 5 / Xvid "packed bitstream" files do (:func:`pack_bframes`), a real archive
            format whose decoded frames carry out-of-order timestamps.
        frame_source: ``i -> (height, width, 3) uint8`` frame to write instead of the
            numbered grid (``pattern`` is then ignored); used by :func:`write_learnable_corpus`.

    Returns:
        ``str(path)``.
    """
    if audio_only:
        return write_audio_only(path, duration_s=n_frames / fps)
    import av  # local import: keeps `import tempo_ops` light

    if codec not in _CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(_CODECS)}")
    if not 1 <= n_frames <= MAX_FRAME_NUMBER + 1:
        raise ValueError(f"n_frames must be in 1..{MAX_FRAME_NUMBER + 1}, got {n_frames}")
    if rotation % 90 or rotation % 360 not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    if pattern not in _PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {_PATTERNS}")
    encoder = _CODECS[codec]
    odd = width % 2 or height % 2
    if odd and encoder != "libx264":
        raise ValueError(f"{codec} needs even width and height, got {width}x{height}")
    pix_fmt = "yuv444p" if odd else "yuv420p"
    if container not in _CONTAINERS:
        raise ValueError(f"unknown container {container!r}; expected one of {_CONTAINERS}")
    if packed_bframes and (encoder != "mpeg4" or container != "avi" or not bframes or vfr):
        raise ValueError("packed_bframes needs codec='mpeg4', container='avi', bframes >= 1 and a constant frame rate")

    url = os.fspath(path)
    local = "://" not in url
    sink = _sink(url)
    rate = Fraction(fps).limit_denominator(1001)
    if faststart and not local:
        raise ValueError("faststart needs a local path")
    out = av.open(sink, "w", format=container, options={"movflags": "faststart"} if faststart else None)
    try:
        stream = out.add_stream(encoder, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = int(gop)
        options: dict[str, str] = {}
        if encoder == "libx264":
            if preset:
                options["preset"] = preset
            if gop is not None:
                # Fixed key-frame interval: no scene-cut key frames in between.
                options["x264-params"] = f"keyint={int(gop)}:min-keyint={int(gop)}:scenecut=0"
        if bframes is not None:
            stream.codec_context.max_b_frames = int(bframes)
            if encoder == "mpeg4" and bframes:
                # Closed GOPs (FFmpeg allows them only without scene-change key frames).
                options.update({"flags": "+cgop", "sc_threshold": "1000000000"})
        if options:
            stream.codec_context.options = options
        if bit_rate is not None:
            stream.bit_rate = int(bit_rate)
        if rotation % 360:
            # PyAV's angle is counter-clockwise; ours (like the `rotate` tag) is clockwise.
            stream.set_display_rotation(-(rotation % 360))
        if vfr:
            tb = Fraction(1, 1000)
            stream.codec_context.time_base = tb
            stream.time_base = tb
            pts_list = [round(t * 1000) for t in vfr_times(n_frames, fps)]
        else:
            tb = 1 / rate
            pts_list = list(range(n_frames))
        def frames():
            for i in range(n_frames):
                rgb = frame_source(i) if frame_source is not None else make_frame(i, width, height, pattern)
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = pts_list[i]
                frame.time_base = tb
                yield frame

        if packed_bframes:
            _mux_packed(out, stream, frames(), rate)
        else:
            _encode_all(out, stream, frames())
    finally:
        out.close()
    _flush_sink(url, sink)
    return url


def _vop_type(data: bytes) -> str:
    """``"I"``, ``"P"``, ``"B"`` or ``"S"``: the coding type of the first VOP in ``data``."""
    at = data.find(_VOP_START)
    if at < 0 or at + 4 >= len(data):
        raise ValueError("no MPEG-4 picture (VOP) start code in packet")
    return "IPBS"[data[at + 4] >> 6]


def _not_coded_vop(data: bytes, time_increment_bits: int) -> bytes:
    """An N-VOP ("not coded" P picture) with the time fields of the first VOP of ``data``."""
    pos = (data.find(_VOP_START) + 4) * 8

    def bit() -> int:
        nonlocal pos
        value = (data[pos >> 3] >> (7 - (pos & 7))) & 1
        pos += 1
        return value

    bits = [0, 1]  # vop_coding_type P
    bit(), bit()
    while True:  # modulo_time_base: ones, then a zero
        bits.append(bit())
        if bits[-1] == 0:
            break
    bits += [bit() for _ in range(1 + time_increment_bits + 1)]  # marker, vop_time_increment, marker
    bits += [0, 0]  # vop_coded = 0, then stuffing: a zero and ones up to the byte boundary
    bits += [1] * (-len(bits) % 8)
    body = bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))
    return _VOP_START + body


def pack_bframes(packets: list[tuple[bytes, bool]], time_increment_bits: int) -> list[tuple[bytes, bool]]:
    """Re-store MPEG-4 Part 2 packets ``(data, is_key)`` (decode order) as a packed bitstream.

    DivX 5 / Xvid AVI files hold one chunk per displayed frame: a reference picture shares
    its chunk with the first B-picture that follows it in decode order, later B-pictures
    get a chunk each, and an N-VOP (a "not coded" picture) fills the reference's own display
    slot; key chunks carry the ``DivX...p`` user data that tells decoders so. Returns the
    chunks ``(data, is_key)`` in order (as many as there are frames).
    """
    types = [_vop_type(d) for d, _ in packets]
    chunks: list[tuple[bytes, bool]] = []
    j = 0
    while j < len(packets):
        data, key = packets[j]
        if key:
            at = data.find(_VOP_START)
            data = data[:at] + _DIVX_PACKED_USER_DATA + data[at:]
        bs = []
        j += 1
        while j < len(packets) and types[j] == "B":
            bs.append(packets[j][0])
            j += 1
        if not bs:
            chunks.append((data, key))
            continue
        chunks.append((data + bs[0], key))
        chunks.extend((b, False) for b in bs[1:])
        chunks.append((_not_coded_vop(data, time_increment_bits), False))
    return chunks


def _mux_packed(container, stream, frames, rate: Fraction) -> None:
    """Encode ``frames`` and mux them as packed B-frames (:func:`pack_bframes`), one chunk per frame."""
    import av

    packets = [(bytes(p), bool(p.is_keyframe)) for frame in frames for p in stream.encode(frame)]
    packets += [(bytes(p), bool(p.is_keyframe)) for p in stream.encode()]
    # The encoder's vop_time_increment field is just wide enough for its time base denominator.
    bits = max(1, (stream.codec_context.time_base.denominator - 1).bit_length())
    for k, (data, key) in enumerate(pack_bframes(packets, bits)):
        packet = av.Packet(data)
        packet.stream = stream
        packet.time_base = 1 / rate
        packet.pts = packet.dts = k
        packet.is_keyframe = key
        container.mux(packet)


def write_audio_only(path: str | os.PathLike, *, duration_s: float = 1.0, sample_rate: int = 16000) -> str:
    """Write an MP4 holding only an AAC audio stream (a 440 Hz tone) of ``duration_s`` s."""
    import av

    url = os.fspath(path)
    sink = _sink(url)
    container = av.open(sink, "w", format="mp4")
    try:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        chunk = 1024
        total = max(chunk, int(duration_s * sample_rate))

        def frames():
            for start in range(0, total, chunk):
                t = (np.arange(start, start + chunk) / sample_rate).astype(np.float32)
                samples = (0.2 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)[None, :]
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                yield frame

        _encode_all(container, stream, frames())
    finally:
        container.close()
    _flush_sink(url, sink)
    return url


# (name, seconds, fps, width, height, rotation, queries)
_SAMPLE_VIDEOS = [
    (
        "kitchen_short",
        6,
        10,
        320,
        240,
        0,
        [
            {"query_id": "q1", "text": "What is on the counter?"},
            {"query_id": "q2", "text": "How many blocks are bright?", "options": ["A. 1", "B. 4", "C. 9", "D. 16"], "answer": "B"},
        ],
    ),
    (
        "street_walk",
        20,
        8,
        640,
        360,
        0,
        [
            {"query_id": "q1", "text": "When does the pattern change?"},
            {"query_id": "q2", "text": "Is the scene indoors?", "options": ["A. yes", "B. no"], "answer": "A"},
            {"query_id": "q3", "text": "Describe the scene."},
        ],
    ),
    (
        "phone_portrait",
        45,
        4,
        360,
        202,
        90,
        [
            {"query_id": "q1", "text": "What happens at the end?"},
            {"query_id": "q2", "text": "Which colour dominates?", "options": ["A. red", "B. blue", "C. grey"], "answer": "C"},
        ],
    ),
]


def write_sample_corpus(out_dir: str | os.PathLike) -> str:
    """Build the demo corpus under ``out_dir``; return the path of its ``manifest.jsonl``.

    Three videos (6 s 320x240, 20 s 640x360, 45 s 360x202 shown rotated as 202x360), each
    with 2-3 queries (some multiple choice), plus one truncated (corrupt) MP4 entry that
    the pipeline must report and skip. ``uri``s are relative to the manifest.
    """
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, seconds, fps, w, h, rot, queries in _SAMPLE_VIDEOS:
        rel = f"videos/{name}.mp4"
        write_test_video(out / rel, n_frames=seconds * fps, fps=fps, width=w, height=h, rotation=rot, gop=2 * fps, preset="veryfast")
        lines.append({"video_id": name, "uri": rel, "queries": queries, "metadata": {"seconds": seconds, "synthetic": True}})
    # A corrupt entry: a valid MP4 cut in half (its index, written last, is lost).
    whole = out / "videos" / "_whole_for_truncation.mp4"
    write_test_video(whole, n_frames=20, fps=10, width=64, height=48)
    data = whole.read_bytes()
    whole.unlink()
    (out / "videos" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    lines.append({"video_id": "broken_upload", "uri": "videos/truncated.mp4", "queries": [{"query_id": "q1", "text": "What is shown?"}], "metadata": {"note": "deliberately corrupt"}})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return str(manifest)


# --------------------------------------------------------------------------- learnable task
LEARNABLE_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (200, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (50, 70, 210)),
    ("yellow", (220, 200, 50)),
)
"""The four colours of the learnable task, in option order (A, B, C, D)."""
LEARNABLE_QUESTION = "Which colour fills most of the frame?"
LEARNABLE_OPTIONS = [f"{'ABCD'[i]}. {name}" for i, (name, _) in enumerate(LEARNABLE_COLOURS)]


def colour_frame(rgb: tuple[int, int, int], width: int, height: int, *, video_seed: int, frame_number: int) -> np.ndarray:
    """One frame ``(height, width, 3) uint8`` of the learnable task: mostly colour ``rgb``.

    Per video (``video_seed``): the colour's shade is jittered by up to ±30 per channel and a
    grey distractor rectangle (a sixth of the frame) sits at a random place; per frame, noise
    of up to ±20. So no two videos share pixels, and validation videos are new pictures.
    """
    video_rng = np.random.default_rng([video_seed, 0])
    base = np.clip(np.asarray(rgb, np.int16) + video_rng.integers(-30, 31, size=3), 0, 255)
    img = np.empty((height, width, 3), np.int16)
    img[:] = base
    rh, rw = max(1, height // 2), max(1, width // 3)
    y0, x0 = int(video_rng.integers(0, height - rh + 1)), int(video_rng.integers(0, width - rw + 1))
    img[y0 : y0 + rh, x0 : x0 + rw] = int(video_rng.integers(60, 200))
    frame_rng = np.random.default_rng([video_seed, 1 + frame_number])
    img += frame_rng.integers(-20, 21, size=(height, width, 1), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_learnable_corpus(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 32,
    n_val: int = 16,
    seed: int = 0,
    width: int = 64,
    height: int = 64,
    seconds: int = 4,
    fps: int = 4,
) -> dict[str, str]:
    """A small corpus whose video content decides the answer, split by video into train and val.

    Each video is filled with one of :data:`LEARNABLE_COLOURS` (see :func:`colour_frame`);
    its one query asks :data:`LEARNABLE_QUESTION` with the options ``A. red`` ... ``D. yellow``
    and the answer letter of its colour. Colours are balanced within each split (shuffled
    by ``seed``), so chance accuracy is 25%. Videos ``train_NNN`` and ``val_NNN`` never share
    content (each has its own shade, distractor and noise).

    Writes ``videos/*.mp4``, ``manifest.jsonl`` (all videos; compress this one),
    ``train.jsonl`` and ``val.jsonl`` (the splits; cut shards from each). Returns
    ``{"manifest", "train", "val"}`` paths.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need at least one video per split, got n_train={n_train}, n_val={n_val}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines: dict[str, list[dict]] = {"train": [], "val": []}
    for split, count in (("train", n_train), ("val", n_val)):
        colours = rng.permutation(np.arange(count) % len(LEARNABLE_COLOURS))
        for i, c in enumerate(colours):
            name, rgb = LEARNABLE_COLOURS[int(c)]
            video_id = f"{split}_{i:03d}"
            video_seed = int(rng.integers(0, 2**31))
            rel = f"videos/{video_id}.mp4"
            write_test_video(
                out / rel,
                n_frames=seconds * fps,
                fps=fps,
                width=width,
                height=height,
                preset="veryfast",
                frame_source=lambda n, rgb=rgb, s=video_seed: colour_frame(rgb, width, height, video_seed=s, frame_number=n),
            )
            query = {"query_id": "colour", "text": LEARNABLE_QUESTION, "options": list(LEARNABLE_OPTIONS), "answer": "ABCD"[int(c)]}
            lines[split].append({"video_id": video_id, "uri": rel, "queries": [query], "metadata": {"split": split, "colour": name}})
    paths = {}
    for name, rows in (("manifest", lines["train"] + lines["val"]), ("train", lines["train"]), ("val", lines["val"])):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths[name] = str(path)
    return paths
