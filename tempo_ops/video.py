"""Video front end: probe, sample, resize and segment videos (docs/METHOD.md "Sampling" .. "Segments and timestamps").

Rules (exactly the reference's, see docs/METHOD.md "Sampling", "Resize", "Segments and timestamps"):

- ``n = round(duration_s * target_fps)`` (Python ``round``: halves to even), clamped to
  ``[min_frames, max_frames]``; indices ``np.round(linspace(0, N - 1, n))`` (round to
  nearest, halves to even) over the N source frames, clipped to ``[0, N - 1]``;
  ``real_fps = n / duration_s``. A one-frame video yields ``[0]``. When N < n the indices
  repeat (e.g. N=3, n=8 -> ``[0, 0, 1, 1, 1, 1, 2, 2]``) and are kept that way.
- Unknown frame rate: if a video reports no usable rate and none can be derived from its
  frame count and duration, the sampling rule uses ``target_fps`` in its place (as the
  reference does), so ``duration_s = N / target_fps``; decoding then maps frame numbers
  to times at :data:`ASSUMED_FPS` (30 frames/s) where it needs a time at all.
- Resize (:func:`resize_shape`): a frame whose longer *display* side is at most
  ``max_edge`` (512) is not resized at all, whatever its size. A larger one is scaled by
  ``r = max_edge / longer side`` and each side rounded (Python ``round``) to a multiple of
  ``multiple`` (16), at least ``multiple``; there is no "never enlarge" clause
  (530x110 -> 512x112). Bicubic (PIL ``Image.resize(..., BICUBIC)``, as the reference
  resizes PIL images). The version of these rules is :data:`SAMPLING_RULE`, recorded in
  :meth:`SamplingConfig.to_dict` (and so in the cache fingerprint).
- Segments: windows of ``window`` (8) sampled frames, stride 8; a trailing window of
  exactly one frame is padded by repeating it (T = 2); other short tails stay short.
  ``t_i = (8 i + 4) / real_fps`` rendered ``<{t:.1f} seconds>``.

Frame identity. At a constant frame rate, frame ``i`` is the ``i``-th frame, in display
order, of a plain sequential decode of every frame -- in every seek mode. The decoder's
timestamps are not trusted for this: frames are counted (from the start, or after a seek
from the key frame the decoder restarts at, numbered by its own timestamp), because some
real files carry out-of-order timestamps (MPEG-4 Part 2 in AVI with packed B-frames, as
DivX/Xvid write them; H.264 with B-frames in AVI), where picking by timestamp returned
frame ``i - 1`` for a third to half of the indices. Frame ``i`` is reported at time
``start_s + i / fps`` (``start_s``: the first frame's presentation time). In containers that
store no presentation times (:data:`NO_PTS_FORMATS`, e.g. AVI) a key frame's time is the
container index's nearest key-frame time, since the decoder's may be off (a key frame
flushed at the end of the stream). Variable frame rate is sampled by presentation time
instead: frame ``i`` is the last decoded frame whose presentation time is <= ``start_s +
i / fps`` (plus 1/8 of a frame period, to absorb timestamp rounding); a target before the
first frame takes the first frame.

Frame count: the container's frame count (``stream.frames``, exact for MP4/MOV) when
present; otherwise ``round(duration * fps)``; otherwise the video packets are counted.
``duration_s = frame_count / fps`` (the reference's ``len / avg_fps``), falling back to the
stream's or container's duration.

Decoding streams through fsspec (local paths, ``memory://``, ``gs://``...) and keeps at
most two segments' frames (the one yielded and the next, being decoded). Sparse samples do
not decode every frame:

- Seeking: before each wanted frame, if the container's index shows a key frame after the
  current decode position and at or before the wanted time by more than
  :data:`SEEK_MIN_SKIP_S`, we seek to it (``backward=True, any_frame=False``) and decode
  forward; without an index we seek when the gap exceeds ``max(SEEK_GAP_S, observed
  key-frame interval)``. If a seek lands after the wanted time it is retried further back.
- Skipping non-reference pictures (exact mode, H.264/HEVC, constant frame rate, a container
  that stores presentation times): a packet
  whose presentation time is not within one frame period before or two after a wanted time
  is decoded with ``skip_frame="NONREF"``: if it holds a picture no other picture references
  (most B-frames of a typical x264 encode), that picture is never decoded, as no sample can
  show it; reference pictures are still decoded, so every later frame is exact. A pick that
  lands more than two periods before its wanted time (a timestamp gap a skipped picture
  might have filled) is redone from its key frame with nothing skipped. Skipping needs
  timestamps: should a decoded frame's timestamp not follow the previous one's, skipping
  stops for the rest of the video and the pick is redone by counting.

Both give the frames of a sequential decode of every frame (``seek_mode="never"``), which
the tests check. Decoded frames are converted (colour conversion, rotation, bicubic resize)
on :func:`default_convert_threads` threads while the next ones decode (``convert_threads=0``:
inline); the output is identical.

Frame accuracy (``SamplingConfig.frame_accuracy``):

- ``"exact"`` (default): the reference rule above, frame for frame. Sparse samples still
  decode every reference picture from the preceding key frame up to each wanted frame:
  with 1024 samples from a 30-minute video and 5-s GOPs that is 50% of all frames of an
  x264 default-preset encode (non-reference B-pictures skipped) and 85% of an all-P one,
  so on long videos decoding dominates (``bench/results/video.json``: 1.5x and 1.0x faster
  than decoding everything). Frame-level decode threading (``threaded=True``:
  ``thread_type="AUTO"``) returns byte-identical frames but is off by default: it turns
  off non-reference skipping and was slower on the 2-core benchmark machine.
- ``"keyframe"`` (opt-in, approximate): each wanted frame ``i`` is replaced by the last
  *key* frame displayed at or before frame ``i``'s time (if there is none, the first key
  frame), and the decoder runs with ``skip_frame="NONKEY"`` so non-key frames are never
  decoded (only key frames are decoded; frames the decoder returns without the key flag
  are dropped). Trade-off: each returned frame is up to one GOP (key-frame interval)
  earlier than the reference frame; for all-intra video, or wherever the wanted frame is
  itself a key frame, the result is identical to ``"exact"``. Use it to index hour-long
  archives where decoding dominates the cost and a frame a few seconds early is
  acceptable; keep ``"exact"`` to reproduce the reference. The accuracy is part of
  :meth:`SamplingConfig.to_dict` and hence of the cache fingerprint: a cache built with one
  accuracy refuses the other. Reported indices: ``VideoPlan.frame_indices`` stays the
  nominal sampled indices (what the rule asked for) and segment timestamps stay the
  nominal ones (the method's segment timing), while ``Segment.frame_indices`` gives the
  indices of the frames actually returned: ``round((t_key - start_s) * fps)`` clamped to
  ``[0, N - 1]``, where ``t_key`` is the returned key frame's presentation time (for
  constant frame rate, exactly that key frame's number). Seeking works as in exact mode but
  seeks as soon as it would skip decoding at least one key frame. A stream that ends
  before the last key frame its index promises is a :class:`~tempo_ops.errors.CorruptVideo`,
  as in exact mode (without a container index that cannot be judged, and the last key
  frame decoded is returned). In either mode a frame picked for several samples is
  converted and resized once.

Rotation: ``VideoInfo.rotation`` is the clockwise angle (0/90/180/270, the legacy
``rotate`` tag) the coded picture is turned for display; frames are returned upright and
``display_width/height`` are the upright size. Other angles round to the nearest 90.

Limits (:class:`~tempo_ops.errors.AbsurdDimensions`): each side 1..16384 px, at most
64 Mpx, aspect ratio at most 512 (so 4000x16 works). A file that is not a media container
at all (e.g. text renamed ``.mp4``) is a :class:`~tempo_ops.errors.CorruptVideo`;
:class:`~tempo_ops.errors.NoVideoStream` is a valid container without video (audio-only).
"""

from __future__ import annotations

import bisect
import errno
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np

from tempo_ops.errors import (
    AbsurdDimensions,
    ConfigError,
    CorruptVideo,
    EmptyVideoFile,
    NoVideoStream,
    TempoError,
    UnsupportedCodec,
    VideoError,
    VideoNotFound,
    VideoReadError,
    VideoTooShort,
)

ASSUMED_FPS = 30.0
MAX_SIDE = 16384
MAX_PIXELS = 64 * 1024 * 1024
MAX_ASPECT = 512.0
SEEK_GAP_S = 2.0
SEEK_MIN_SKIP_S = 0.5
_IO_BUFFER = 1 << 20
FRAME_ACCURACIES = ("exact", "keyframe")
# Version of the sampling / resize / frame-identity rules (part of the cache fingerprint, so
# a cache written under other rules refuses to mix). 2: round-to-nearest indices, no resize
# at <= max_edge, no "never enlarge", frame i = the i-th frame in display order.
SAMPLING_RULE = 2


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SamplingConfig:
    """How frames are sampled, resized and grouped (docs/METHOD.md "Sampling", "Resize").

    target_fps: sampling rate in frames/s; min_frames/max_frames: clamp of the frame count;
    max_edge: frames whose longer side is at most this (px) keep their size, larger ones are
    scaled so the longer side becomes max_edge; multiple: the sides of a scaled frame are
    multiples of it (max_edge must be one too);
    window: sampled frames per segment; frame_accuracy: ``"exact"`` (the reference rule)
    or ``"keyframe"`` (the last key frame at or before each wanted frame; see the module
    docstring).
    """

    target_fps: float = 2.0
    min_frames: int = 8
    max_frames: int = 1024
    max_edge: int = 512
    multiple: int = 16
    window: int = 8
    frame_accuracy: str = "exact"

    def __post_init__(self) -> None:
        if not (isinstance(self.target_fps, (int, float)) and math.isfinite(self.target_fps) and self.target_fps > 0):
            raise ConfigError(f"target_fps must be a positive number, got {self.target_fps!r}", item="sampling")
        for name in ("min_frames", "max_frames", "max_edge", "multiple", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", item="sampling")
        if self.min_frames > self.max_frames:
            raise ConfigError(f"min_frames ({self.min_frames}) > max_frames ({self.max_frames})", item="sampling")
        if self.max_edge % self.multiple:
            raise ConfigError(f"max_edge ({self.max_edge}) must be a multiple of multiple ({self.multiple})", item="sampling")
        if not isinstance(self.frame_accuracy, str) or self.frame_accuracy not in FRAME_ACCURACIES:
            raise ConfigError(
                f"frame_accuracy must be one of {', '.join(FRAME_ACCURACIES)}, got {self.frame_accuracy!r}", item="sampling"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields plus ``sampling_rule`` (part of the cache fingerprint)."""
        return {**asdict(self), "target_fps": float(self.target_fps), "sampling_rule": SAMPLING_RULE}


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a video.

    duration_s: seconds; fps: average frame rate (frames/s) or None when unknown;
    frame_count: source frames N; width/height: coded size in px; rotation: clockwise
    display rotation (0/90/180/270); display_width/height: upright size; start_s: the
    first frame's presentation time in seconds.
    """

    uri: str
    duration_s: float
    fps: float | None
    frame_count: int
    width: int
    height: int
    rotation: int
    codec: str
    display_width: int
    display_height: int
    variable_frame_rate: bool = False
    start_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- pure rules
def sample_frame_indices(
    total_frames: int,
    source_fps: float | None,
    target_fps: float = 2.0,
    min_frames: int = 8,
    max_frames: int = 1024,
) -> list[int]:
    """Source frame indices to sample (sorted, may repeat when N < n).

    ``n = round(N / fps * target_fps)`` clamped to ``[min_frames, max_frames]``;
    ``np.round(linspace(0, N - 1, n))`` (halves to even), clipped to ``[0, N - 1]``.
    One-frame video -> ``[0]``. ``source_fps`` None or not positive -> ``target_fps`` (the
    reference's stand-in for an unknown rate, so every frame is sampled up to max_frames).
    """
    if not isinstance(total_frames, (int, np.integer)) or total_frames < 1:
        raise VideoTooShort(f"no frames to sample (total_frames={total_frames!r})", item="sample_frame_indices")
    total = int(total_frames)
    if total == 1:
        return [0]
    fps = _usable_fps(source_fps) or float(target_fps)
    duration = total / fps
    n = min(max(int(round(duration * target_fps)), min_frames), max_frames)
    return [int(i) for i in np.clip(np.round(np.linspace(0, total - 1, n)), 0, total - 1)]


def resize_shape(width: int, height: int, max_edge: int = 512, multiple: int = 16) -> tuple[int, int]:
    """Output ``(w, h)`` in px for a ``width x height`` (display) frame; rules in module docstring.

    A frame whose longer side is at most ``max_edge`` keeps its size (75x41 -> (75, 41)).
    Otherwise ``r = max_edge / longer side`` and each side becomes
    ``round(side * r / multiple) * multiple`` (Python ``round``), at least ``multiple``;
    the short side may round up past its source: 640x360 -> (512, 288),
    530x110 -> (512, 112), 4000x16 -> (512, 16).
    """
    if width < 1 or height < 1:
        raise AbsurdDimensions(f"frame size must be positive, got {width}x{height}", item="resize_shape")
    longer = max(width, height)
    if longer <= max_edge:
        return width, height
    ratio = max_edge / longer

    def side(src: int) -> int:
        return max(multiple, int(round(src * ratio / multiple)) * multiple)

    return side(width), side(height)


def segment_bounds(n_frames: int, window: int = 8) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` positions in the sampled list (end exclusive), stride ``window``."""
    if n_frames < 0 or window < 1:
        raise ConfigError(f"invalid segment request n_frames={n_frames}, window={window}", item="segment_bounds")
    return [(s, min(s + window, n_frames)) for s in range(0, n_frames, window)]


def segment_timestamp(i: int, real_fps: float, window: int = 8) -> float:
    """Centre of segment ``i`` in seconds: ``(window * i + window / 2) / real_fps``."""
    return (window * i + window / 2) / real_fps


def format_timestamp(t: float) -> str:
    """``"<{t:.1f} seconds>"``."""
    return f"<{t:.1f} seconds>"


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class VideoPlan:
    """Everything decided before decoding: which frames, which segments, what size.

    frame_indices: sampled source indices (n,); bounds: per-segment (start, end) positions
    in the sampled list; timestamps: segment centres in s; frame_width/height: output px.
    """

    info: VideoInfo
    config: SamplingConfig
    frame_indices: list[int]
    real_fps: float
    bounds: list[tuple[int, int]]
    timestamps: list[float]
    timestamp_texts: list[str]
    frame_width: int
    frame_height: int
    n_segments: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_segments", len(self.bounds))

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": self.info.to_dict(),
            "config": self.config.to_dict(),
            "frame_indices": list(self.frame_indices),
            "real_fps": self.real_fps,
            "bounds": [list(b) for b in self.bounds],
            "timestamps": list(self.timestamps),
            "timestamp_texts": list(self.timestamp_texts),
            "frame_width": self.frame_width,
            "frame_height": self.frame_height,
            "n_segments": self.n_segments,
        }


def plan_video(
    uri_or_info: str | os.PathLike | VideoInfo,
    config: SamplingConfig | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> VideoPlan:
    """Probe (if given a URI) and decide the sampled frames, segments and output size."""
    config = config or SamplingConfig()
    info = uri_or_info if isinstance(uri_or_info, VideoInfo) else probe_video(uri_or_info, storage_options=storage_options)
    indices = sample_frame_indices(info.frame_count, info.fps, config.target_fps, config.min_frames, config.max_frames)
    duration = info.frame_count / (info.fps or config.target_fps)  # the reference's len / avg_fps
    real_fps = len(indices) / duration
    bounds = segment_bounds(len(indices), config.window)
    timestamps = [segment_timestamp(i, real_fps, config.window) for i in range(len(bounds))]
    w, h = resize_shape(info.display_width, info.display_height, config.max_edge, config.multiple)
    return VideoPlan(
        info=info,
        config=config,
        frame_indices=indices,
        real_fps=real_fps,
        bounds=bounds,
        timestamps=timestamps,
        timestamp_texts=[format_timestamp(t) for t in timestamps],
        frame_width=w,
        frame_height=h,
    )


# --------------------------------------------------------------------------- opening
def _usable_fps(value: Any) -> float | None:
    try:
        fps = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return fps if math.isfinite(fps) and fps > 0 else None


def _uri_str(uri: str | os.PathLike) -> str:
    return os.fspath(uri) if not isinstance(uri, str) else uri


@contextmanager
def _open_container(uri: str, storage_options: dict[str, Any] | None = None):
    """Open ``uri`` through fsspec and PyAV; yield ``(container, video_stream)``.

    Maps storage and container errors to typed errors naming ``uri``.
    """
    import av

    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        details = fs.info(path)
    except FileNotFoundError as exc:
        # fsspec's HTTP filesystem reports *any* failure as "not found": say what happened.
        connection = _connection_failure(exc)
        if connection is not None:
            raise VideoReadError(f"cannot connect: {connection}", item=uri) from None
        raise VideoNotFound("no such file", item=uri) from None
    except (ValueError, ImportError) as exc:  # unknown protocol / malformed URL
        raise VideoNotFound(f"cannot resolve location: {exc}", item=uri) from None
    except OSError as exc:
        raise VideoReadError(f"cannot read: {exc}", item=uri) from None
    if details.get("type") == "directory":
        raise VideoNotFound("is a directory, not a video file", item=uri)
    if (details.get("size") or 0) == 0:
        raise EmptyVideoFile("file is empty (0 bytes)", item=uri)
    try:
        fh = fs.open(path, "rb")
    except FileNotFoundError:
        raise VideoNotFound("no such file", item=uri) from None
    except OSError as exc:
        raise VideoReadError(f"cannot open: {exc}", item=uri) from None
    container = None
    try:
        try:
            container = av.open(fh, "r", buffer_size=_IO_BUFFER)
        except av.error.PyAVCallbackError as exc:
            raise VideoReadError(f"read failed: {exc}", item=uri) from None
        except av.error.FFmpegError as exc:
            _check_header_dimensions(fh, uri)  # ffmpeg reports an absurd size as an unrelated errno
            raise CorruptVideo(f"not a readable media container ({_ff_reason(exc)})", item=uri) from None
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise NoVideoStream(f"no video stream (streams: {', '.join(kinds)})", item=uri)
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise UnsupportedCodec(f"no decoder available for the video stream's codec ({_codec_tag(stream)})", item=uri)
        yield container, stream
    finally:
        if container is not None:
            container.close()
        fh.close()


def _codec_tag(stream: Any) -> str:
    try:
        return f"tag {stream.codec_tag!r}"
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown codec"


def _ff_reason(exc: Exception) -> str:
    reason = str(getattr(exc, "strerror", None) or exc).strip() or type(exc).__name__
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number in errno.errorcode and number not in (errno.EIO, errno.EINVAL, errno.ENOMEM):
        # ffmpeg reuses POSIX codes for its own failures ("Device or resource busy" for a bad
        # stream header): it is the demuxer's verdict, not a device or file-system problem.
        return f"ffmpeg refused the stream: error {errno.errorcode[number]} ({reason})"
    return reason


def _connection_failure(exc: BaseException) -> str | None:
    """The connection error behind ``exc`` (refused, unreachable, DNS), as text; None when there is none."""
    seen = set()
    cur: BaseException | None = exc.__cause__ or exc.__context__
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError)) or type(cur).__name__.startswith("ClientConnector"):
            return str(cur) or type(cur).__name__
        cur = cur.__cause__ or cur.__context__
    return None


def _check_header_dimensions(fh: Any, uri: str) -> None:
    """AbsurdDimensions when a YUV4MPEG2 header declares a frame size we refuse (read from the header)."""
    try:
        fh.seek(0)
        head = fh.read(256)
    except Exception:  # noqa: BLE001 - only refines the message
        return
    if not head.startswith(b"YUV4MPEG2 "):
        return
    fields = head.split(b"\n", 1)[0].split()
    size = {f[:1]: f[1:] for f in fields[1:] if f[:1] in (b"W", b"H")}
    try:
        width, height = int(size[b"W"]), int(size[b"H"])
    except (KeyError, ValueError):
        return
    check_dimensions(uri, width, height)


def check_dimensions(uri: str, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise AbsurdDimensions(f"frame size {width}x{height} has a side < 1 px", item=uri)
    if width > MAX_SIDE or height > MAX_SIDE:
        raise AbsurdDimensions(f"frame size {width}x{height} has a side > {MAX_SIDE} px", item=uri)
    if width * height > MAX_PIXELS:
        raise AbsurdDimensions(f"frame size {width}x{height} exceeds {MAX_PIXELS // (1024 * 1024)} Mpx", item=uri)
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise AbsurdDimensions(f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT:g}", item=uri)


def _frame_time(frame: Any) -> float | None:
    t = frame.time
    return float(t) if t is not None else None


def _decode_iter(container: Any, stream: Any, uri: str, needed: Any = None) -> Iterator[Any]:
    """Decoded frames of ``stream`` from the current position; errors mapped to typed ones.

    ``needed(packet) -> bool``: when given, packets it rejects are decoded with
    ``skip_frame="NONREF"`` (a non-reference picture in them is discarded unread; reference
    pictures are still decoded, so every later frame stays exact).
    """
    import av

    try:
        if needed is None:
            yield from container.decode(stream)
            return
        ctx = stream.codec_context
        mode = ctx.skip_frame
        for packet in container.demux(stream):
            want = "DEFAULT" if needed(packet) else "NONREF"
            if want != mode:
                ctx.skip_frame = mode = want
            yield from packet.decode()
    except av.error.PyAVCallbackError as exc:
        raise VideoReadError(f"read failed while decoding: {exc}", item=uri) from None
    except av.error.FFmpegError as exc:
        raise CorruptVideo(f"undecodable data ({_ff_reason(exc)})", item=uri) from None


def probe_video(uri: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> VideoInfo:
    """Read a video's metadata and decode its first frame (to check it and read rotation).

    ``storage_options`` go to fsspec (e.g. gcsfs credentials / endpoint). Raises
    VideoNotFound, EmptyVideoFile, CorruptVideo, NoVideoStream, UnsupportedCodec,
    VideoTooShort, AbsurdDimensions, VideoReadError -- each naming ``uri``.
    """
    uri = _uri_str(uri)
    try:
        return _probe(uri, storage_options)
    except TempoError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - no raw traceback reaches the user
        raise VideoError(f"probing failed: {type(exc).__name__}: {exc}", item=uri) from exc


def _probe(uri: str, storage_options: dict[str, Any] | None) -> VideoInfo:
    with _open_container(uri, storage_options) as (container, stream):
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        check_dimensions(uri, width, height)
        first = next(_decode_iter(container, stream, uri), None)
        if first is None:
            raise VideoTooShort("no decodable video frame", item=uri)
        rotation = int(round(-float(first.rotation or 0) / 90.0)) * 90 % 360
        start_s = _frame_time(first) or 0.0
        fps = _usable_fps(stream.average_rate) or _usable_fps(stream.guessed_rate)
        tb = stream.time_base
        stream_dur = float(stream.duration * tb) if stream.duration and tb else None
        container_dur = container.duration / 1e6 if container.duration and container.duration > 0 else None
        known_dur = stream_dur or container_dur
        frames = int(stream.frames or 0)
        if frames <= 0 and known_dur and fps:
            frames = max(1, int(round(known_dur * fps)))
        if frames <= 0:
            frames = _count_packets(container, stream, uri)
        if fps is None and known_dur:
            fps = frames / known_dur if frames > 1 else None
        duration = frames / fps if fps else (known_dur or frames / ASSUMED_FPS)
        base = _usable_fps(stream.base_rate)
        vfr = bool(fps and base and abs(base - fps) > 0.01 * fps)
        codec = getattr(ctx, "name", None) or "unknown"
    disp_w, disp_h = (height, width) if rotation in (90, 270) else (width, height)
    return VideoInfo(
        uri=uri,
        duration_s=float(duration),
        fps=fps,
        frame_count=frames,
        width=width,
        height=height,
        rotation=rotation,
        codec=codec,
        display_width=disp_w,
        display_height=disp_h,
        variable_frame_rate=vfr,
        start_s=float(start_s),
    )


def _count_packets(container: Any, stream: Any, uri: str) -> int:
    import av

    container.seek(0)
    n = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                n += 1
    except av.error.FFmpegError as exc:
        raise CorruptVideo(f"unreadable packets ({_ff_reason(exc)})", item=uri) from None
    if n == 0:
        raise VideoTooShort("no video packets", item=uri)
    return n


# --------------------------------------------------------------------------- decoding
@dataclass
class Segment:
    """One segment ready for the SVLM.

    frames: ``(T, H, W, 3) uint8`` upright, resized; frame_indices: absolute source frame
    indices (T,) with padding repeated; start_position: first sampled position
    (``bounds[index][0]``); timestamp: centre in s; real_fps: sampled frames per second.
    """

    index: int
    frames: np.ndarray
    frame_indices: list[int]
    start_position: int
    timestamp: float
    timestamp_text: str
    real_fps: float


class _FramePicker:
    """Yields, for ascending target times, the frame displayed at each (rules in module doc).

    With ``keyframes_only`` the decoder must be set to ``skip_frame="NONKEY"``; frames
    without the key flag are dropped, so each pick is the last *key* frame at or before the
    target (or the first key frame).

    With ``targets`` (every target time the run will ask for, ascending; exact mode only),
    packets whose presentation time is not within one frame period before or two after some
    target are decoded with ``skip_frame="NONREF"``: a non-reference picture there can never
    be the frame displayed at a target, so it is not decoded at all. Should a pick still land
    more than two periods before its target (a gap in the stream, which a skipped picture
    might have filled), that pick is redone from the preceding key frame with nothing
    skipped, so the frames are exactly those of a full decode.

    Frame numbers (exact mode, constant frame rate, not skipping): a decoded frame's number is
    counted, not read from its timestamp: 0 for the first frame of the stream, and after a
    seek the frame the decoder restarts at (a key frame, whose timestamp is reliable) is
    numbered ``round((t - start_s) * fps)`` and each later frame one more. So frame ``i`` is
    the ``i``-th frame of a plain sequential decode even where the decoder's timestamps run
    out of order (MPEG-4 Part 2 in AVI with packed B-frames); its time is reported as
    ``start_s + i / fps``. While skipping, timestamps are needed; should one run backwards,
    skipping stops for good and the pick is redone by counting.
    """

    def __init__(
        self,
        container: Any,
        stream: Any,
        info: VideoInfo,
        seek_mode: str,
        keyframes_only: bool = False,
        targets: list[float] | None = None,
    ) -> None:
        self.container, self.stream, self.info, self.uri = container, stream, info, info.uri
        self.seek_mode = seek_mode
        self.keyframes_only = keyframes_only
        self.period = 1.0 / (info.fps or ASSUMED_FPS)
        self.tol = self.period / 8
        self.tb = float(stream.time_base) if stream.time_base else None
        self.keyframes = self._index_keyframes()
        # Where the container stores no presentation times, the decoder's are guesses (a key
        # frame flushed at the end of the stream may carry the last packet's): a key frame's
        # time is then the container index's key-frame time nearest to it.
        self.snap_keys = bool(
            self.keyframes and not info.variable_frame_rate and set(container.format.name.split(",")) & NO_PTS_FORMATS
        )
        self.targets = sorted(targets) if targets and self.tb is not None and seek_mode != "never" else []
        self.skipping = bool(self.targets)
        self.counting = not keyframes_only and not info.variable_frame_rate and not self.skipping
        self.next_number: int | None = 0  # number of the next decoded frame (None: from its timestamp)
        self.gop_s = 0.0  # largest key-frame interval seen while decoding
        self._last_key: float | None = None
        self.frames = self._decode()
        self.prev: Any = None
        self.pending: Any = None
        self.last_time: float | None = None
        self.seeks = 0
        self.decoded = 0
        self.redone = 0

    def _decode(self) -> Iterator[Any]:
        return _decode_iter(self.container, self.stream, self.uri, self._packet_needed if self.targets else None)

    def _packet_needed(self, packet: Any) -> bool:
        """False only for a packet no target can show (see the class docstring)."""
        if not self.skipping or packet.pts is None:
            return True
        t = packet.pts * self.tb
        k = bisect.bisect_left(self.targets, t - self.period - self.tol)
        return k < len(self.targets) and self.targets[k] < t + 2 * self.period

    def _index_keyframes(self) -> list[float]:
        """Approximate key-frame times (s) from the container index (empty if none)."""
        if self.tb is None:
            return []
        try:
            entries = self.stream.index_entries
            stamps = [e.timestamp for e in entries if e.is_keyframe]
            first = entries[0].timestamp if len(entries) else None
        except Exception:  # noqa: BLE001 - an index is an optimisation only
            return []
        if not stamps or first is None:
            return []
        # Index timestamps are decode times; shift so the first entry is the first frame.
        shift = self.info.start_s - first * self.tb
        return sorted(s * self.tb + shift for s in stamps)

    def _next_frame(self) -> tuple[Any, float] | None:
        """Next decoded ``(frame, time_s)`` or None at the end of the stream."""
        while True:
            frame = next(self.frames, None)
            if frame is None:
                return None
            self.decoded += 1
            if not self.keyframes_only or frame.key_frame:
                break
            # A decoder that ignores skip_frame still returns non-key frames: drop them.
        t = _frame_time(frame)
        if t is not None and frame.key_frame and self.snap_keys:
            k = bisect.bisect_left(self.keyframes, t)
            t = min(self.keyframes[max(k - 1, 0) : k + 1], key=lambda key: abs(key - t))
        if self.counting:
            number = self.next_number
            if number is None:  # first frame after a seek: a key frame, numbered by its timestamp
                number = _returned_index(t, self.info) if t is not None else 0
            self.next_number = number + 1
            t = self.info.start_s + number * self.period
        elif t is None:  # no timestamp: assume the nominal period after the previous frame
            t = (self.last_time + self.period) if self.last_time is not None else self.info.start_s
        elif self.skipping and self.last_time is not None and t <= self.last_time:
            raise _TimestampsOutOfOrder
        if frame.key_frame:
            if self._last_key is not None and t > self._last_key:
                self.gop_s = max(self.gop_s, t - self._last_key)
            self._last_key = t
        self.last_time = t
        return frame, t

    def _should_seek(self, target: float) -> bool:
        if self.seek_mode == "never" or self.tb is None:
            return False
        cur = self.last_time
        if cur is None:
            cur = self.info.start_s
        if target <= cur + self.tol:
            return False
        if self.seek_mode == "always":
            return target - cur > 1.5 * self.period
        if self.keyframes:
            k = bisect.bisect_right(self.keyframes, target + self.tol) - 1
            if self.keyframes_only:
                # Decoding forward would decode every key frame after ``cur`` up to the
                # wanted one; a seek decodes only the wanted one.
                return k - bisect.bisect_right(self.keyframes, cur + self.tol) >= 1
            return k >= 0 and self.keyframes[k] - cur > max(SEEK_MIN_SKIP_S, 2 * self.period)
        return target - cur > max(SEEK_GAP_S, self.gop_s)

    def _seek(self, target: float) -> None:
        """Seek so the next decoded frame is at or before ``target`` (retrying further back)."""
        import av

        back = 0.0  # first try the target itself; on overshoot retry 1, 4, 16... periods back
        while True:
            pos = target + self.tol - back
            ts = int(math.floor(pos / self.tb)) if self.tb else None
            try:
                self.container.seek(max(ts, 0) if pos > 0 else 0, backward=True, any_frame=False, stream=self.stream)
            except av.error.FFmpegError as exc:
                raise CorruptVideo(f"seek failed ({_ff_reason(exc)})", item=self.uri) from None
            self.seeks += 1
            self.frames = self._decode()
            self.prev, self.last_time, self.next_number = None, None, None
            first = self._next_frame()
            if pos <= 0 or (first is not None and first[1] <= target + self.tol):
                self.pending = first
                return
            back = back * 4 if back else self.period

    def _shortfall(self, target: float, last: float) -> float | None:
        """How far (s) the stream's last frame at ``last`` falls short of what ``target`` needs.

        None when that cannot be judged (key frames only and no container index).
        """
        if not self.keyframes_only:
            return target - last
        if not self.keyframes:
            return None
        k = bisect.bisect_right(self.keyframes, target + self.tol) - 1
        return (self.keyframes[k] - last) if k >= 0 else 0.0

    def pick(self, target: float) -> tuple[Any, float]:
        """``(frame, time_s)`` displayed at ``target`` s (the previous pick is no longer valid)."""
        try:
            return self._pick(target)
        except _TimestampsOutOfOrder:
            # Timestamps cannot tell skipped pictures apart here: decode everything from the
            # key frame before the target on, numbering frames by counting.
            self.skipping, self.counting = False, not self.info.variable_frame_rate
            self.redone += 1
            self._seek(target)
            return self._advance(target)

    def _pick(self, target: float) -> tuple[Any, float]:
        if self._should_seek(target):
            self._seek(target)
        frame, t = self._advance(target)
        if self.skipping and t < target - 2 * self.period + self.tol:
            # A skipped non-reference picture may lie between the pick and the target:
            # decode that stretch again from its key frame, skipping nothing.
            self.skipping = False
            try:
                self.redone += 1
                self._seek(target)
                frame, t = self._advance(target)
            finally:
                self.skipping = True
        return frame, t

    def _advance(self, target: float) -> tuple[Any, float]:
        """Decode forward to the last frame at or before ``target`` and return it."""
        while True:
            if self.pending is not None:
                item, self.pending = self.pending, None
            else:
                item = self._next_frame()
            if item is None:  # end of stream
                if self.prev is None:
                    raise VideoTooShort("no decodable frame at or before the wanted time", item=self.uri)
                # A constant-rate stream that ends well before a wanted frame lost data; a
                # variable-rate one may legitimately show its last frame for a long time.
                # (While skipping, the true last frame may have been skipped: pick() redoes
                # such a pick with nothing skipped and judges then.)
                shortfall = self._shortfall(target, self.prev[1])
                limit = max(2 * self.period, 0.02 * self.info.duration_s)
                if not (self.skipping or self.info.variable_frame_rate) and shortfall is not None and shortfall > limit:
                    raise CorruptVideo(
                        f"stream ends at {self.prev[1]:.3f} s, before the frame wanted at {target:.3f} s (truncated?)",
                        item=self.uri,
                    )
                self.pending = None
                self.frames = iter(())
                return self.prev
            if item[1] <= target + self.tol:
                self.prev = item
                continue
            self.pending = item
            if self.prev is None:  # target precedes the first frame: take the first frame
                self.prev = item
            return self.prev


class _TimestampsOutOfOrder(Exception):
    """Internal: a decoded frame's timestamp is not after the previous one's (see _FramePicker)."""


def _to_output(frame: Any, rotation: int, width: int, height: int) -> np.ndarray:
    """Decoded frame -> upright, resized ``(height, width, 3) uint8`` (PIL bicubic)."""
    from PIL import Image

    rgb = frame.to_ndarray(format="rgb24")
    if rotation:
        rgb = np.rot90(rgb, k=-(rotation // 90))  # clockwise turn
    if rgb.shape[1] != width or rgb.shape[0] != height:
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(rgb)


# Decoders whose ``skip_frame="NONREF"`` discards exactly the pictures no other picture
# references (H.264 nal_ref_idc 0, HEVC sub-layer non-reference pictures).
NONREF_SKIP_CODECS = frozenset({"h264", "hevc"})
# Containers that store no presentation times (the demuxer guesses them): skipping, which
# relies on timestamps, is off there.
NO_PTS_FORMATS = frozenset({"avi", "h264", "hevc", "m4v"})


def _target_time(info: VideoInfo, index: int) -> float:
    """Presentation time (s) at which source frame ``index`` is wanted."""
    return info.start_s + index / (info.fps or ASSUMED_FPS)


def _open_picker(
    container: Any, stream: Any, plan: VideoPlan, seek_mode: str, threaded: bool, positions: list[int]
) -> _FramePicker:
    """Set up the (not yet opened) decoder and a picker for the sampled ``positions`` of ``plan``.

    Key-frame mode: ``skip_frame="NONKEY"`` and PyAV's default threads (with nearly every
    packet discarded, frame threads only add hand-off cost). Exact mode with ``threaded``:
    frame + slice threads (``thread_type="AUTO"``; FFmpeg's frame threads return the same
    frames in the same order). Exact mode otherwise: non-reference pictures no target can
    show are skipped (:class:`_FramePicker`) for codecs in :data:`NONREF_SKIP_CODECS` at a
    constant frame rate in containers that store presentation times (not
    :data:`NO_PTS_FORMATS`), unless ``seek_mode="never"`` (decode every frame).
    """
    info = plan.info
    accuracy = plan.config.frame_accuracy
    ctx = stream.codec_context
    targets = None
    if accuracy == "keyframe":
        ctx.skip_frame = "NONKEY"  # non-key frames are dropped before decoding
    elif threaded:
        ctx.thread_type = "AUTO"
    elif (
        info.codec in NONREF_SKIP_CODECS
        and info.fps
        and not info.variable_frame_rate
        and not set(container.format.name.split(",")) & NO_PTS_FORMATS
    ):
        targets = [_target_time(info, plan.frame_indices[p]) for p in positions]
    return _FramePicker(container, stream, info, seek_mode, keyframes_only=accuracy == "keyframe", targets=targets)


def _returned_index(t: float, info: VideoInfo) -> int:
    """Source frame index of a frame presented at ``t`` s: ``round((t - start_s) * fps)``, in [0, N-1]."""
    fps = info.fps or ASSUMED_FPS
    return min(max(int(round((t - info.start_s) * fps)), 0), max(info.frame_count - 1, 0))


def default_convert_threads() -> int:
    """Conversion threads by default: the usable CPUs, at most 4 (one decoder feeds them);
    0 (inline) with a single CPU, where a pool thread could only add hand-offs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus) if cpus > 1 else 0


class _Done:
    """An already computed result with the ``Future.result()`` interface."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


@contextmanager
def _frame_converter(threads: int):
    """Yield ``convert(frame, rotation, width, height) -> future of _to_output(...)``.

    With ``threads`` >= 1 conversions run on a pool of that many threads (swscale and PIL
    release the GIL), overlapping decoding; with 0, inline.
    """
    if threads <= 0:
        yield lambda *args: _Done(_to_output(*args))
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tempo-convert")
    try:
        yield lambda *args: pool.submit(_to_output, *args)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _make_segment(plan: VideoPlan, seg: int, outputs: list[Any], returned: list[int]) -> Segment:
    """Segment ``seg`` from its converted frames (futures) and the returned frames' indices."""
    start, end = plan.bounds[seg]
    frames = [out.result() for out in outputs]
    idx = returned if plan.config.frame_accuracy == "keyframe" else list(plan.frame_indices[start:end])
    if len(idx) == 1:  # a one-frame tail is padded (the video processor needs >= 2)
        frames.append(frames[0])
        idx = idx * 2
    return Segment(
        index=seg,
        frames=np.stack(frames),
        frame_indices=list(idx),
        start_position=start,
        timestamp=plan.timestamps[seg],
        timestamp_text=plan.timestamp_texts[seg],
        real_fps=plan.real_fps,
    )


def iter_segments(
    uri: str | os.PathLike,
    config: SamplingConfig | None = None,
    *,
    plan: VideoPlan | None = None,
    segments: range | None = None,
    seek_mode: str = "auto",
    storage_options: dict[str, Any] | None = None,
    threaded: bool = False,
    convert_threads: int | None = None,
) -> Iterator[Segment]:
    """Decode and yield the video's segments one at a time (bounded memory).

    The frame accuracy is the plan's ``config.frame_accuracy`` (see the module docstring):
    in ``"keyframe"`` mode ``Segment.frame_indices`` are the returned key frames' indices,
    while ``plan.frame_indices`` and the timestamps stay nominal. At most two segments'
    frames are held at a time (the one being yielded and, with conversion threads, the
    next one being decoded).

    Args:
        uri: local path or fsspec URL.
        config: sampling configuration (ignored when ``plan`` is given).
        plan: a plan from :func:`plan_video` (avoids probing again).
        segments: only these segment indices (ascending range), e.g. a work unit;
            only the frames they need are decoded.
        seek_mode: ``"auto"`` (seek past key frames and skip non-reference pictures when
            that saves decoding), ``"never"`` (decode every frame sequentially) or
            ``"always"`` (seek for every gap; for tests). All give identical frames.
        storage_options: fsspec options for ``uri`` (credentials, endpoint).
        threaded: exact mode: decode with FFmpeg frame threads too (byte-identical frames,
            but no non-reference skipping; off by default, as it was slower on 2 cores --
            try it on many-core workers).
        convert_threads: threads converting decoded frames (colour conversion, rotation,
            bicubic resize) while decoding goes on; None: :func:`default_convert_threads`;
            0: convert inline, in the decoding thread. The frames are identical either way.
    """
    uri = _uri_str(uri)
    if plan is None:
        plan = plan_video(uri, config or SamplingConfig(), storage_options=storage_options)
    if seek_mode not in ("auto", "never", "always"):
        raise ConfigError(f"seek_mode must be auto, never or always, got {seek_mode!r}", item=uri)
    threads = default_convert_threads() if convert_threads is None else convert_threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"convert_threads must be an integer >= 0, got {convert_threads!r}", item=uri)
    wanted = range(plan.n_segments) if segments is None else segments
    if not isinstance(wanted, range) or wanted.step < 1:
        raise ConfigError(f"segments must be an ascending range, got {wanted!r}", item=uri)
    if len(wanted) and (wanted[0] < 0 or wanted[-1] >= plan.n_segments):
        raise ConfigError(f"segments {wanted!r} outside 0..{plan.n_segments - 1}", item=uri)
    if not len(wanted):
        return
    info = plan.info
    lookahead = 1 if threads > 0 else 0  # segments decoded ahead while earlier ones convert
    with _open_container(uri, storage_options) as (container, stream), _frame_converter(threads) as convert:
        positions = [p for seg in wanted for p in range(*plan.bounds[seg])]
        picker = _open_picker(container, stream, plan, seek_mode, threaded, positions)
        queued: deque[tuple[int, list[Any], list[int]]] = deque()
        last_frame: Any = None
        last_out: Any = None
        try:
            for seg in wanted:
                start, end = plan.bounds[seg]
                outputs, returned = [], []
                for i in plan.frame_indices[start:end]:
                    frame, t = picker.pick(_target_time(info, i))
                    if frame is not last_frame:  # the same frame picked again is converted once
                        last_frame = frame
                        last_out = convert(frame, info.rotation, plan.frame_width, plan.frame_height)
                    outputs.append(last_out)
                    returned.append(_returned_index(t, info))
                queued.append((seg, outputs, returned))
                if len(queued) > lookahead:
                    yield _make_segment(plan, *queued.popleft())
            while queued:
                yield _make_segment(plan, *queued.popleft())
        except TempoError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else from the decoder is unusable data
            raise VideoError(f"decoding failed: {type(exc).__name__}: {exc}", item=uri) from exc


def count_decoded_frames(
    uri: str | os.PathLike, plan: VideoPlan, seek_mode: str = "auto", *, threaded: bool = False
) -> dict[str, int]:
    """Decode a plan's frames without converting them; return ``{"decoded", "seeks", "redone"}``.

    Diagnostics for benchmarks and tests: how many frames the decoder produced (with the
    plan's ``frame_accuracy``; skipped non-key / non-reference pictures do not count), how
    many seeks it took, and how many picks were redone with nothing skipped.
    """
    uri = _uri_str(uri)
    info = plan.info
    with _open_container(uri) as (container, stream):
        positions = list(range(len(plan.frame_indices)))
        picker = _open_picker(container, stream, plan, seek_mode, threaded, positions)
        for i in plan.frame_indices:
            picker.pick(_target_time(info, i))
        return {"decoded": picker.decoded, "seeks": picker.seeks, "redone": picker.redone}
