"""Typed errors of the Tempo pipeline.

Every error carries a stable machine-readable ``code`` (used in dead-letter records and
run summaries; never change an existing one) and names the item it concerns (a video id,
a URI, a manifest line, a checkpoint path). Messages are meant for users: they say what is
wrong and with what, never a traceback.
"""

from __future__ import annotations

from typing import Any


class TempoError(Exception):
    """Base of all expected, user-facing errors.

    Attributes:
        code: stable identifier, e.g. ``"video_not_found"``.
        item: what the error is about (URI, video id, path...), or None.
        reason: the human-readable reason without the item prefix.
        transient: True when retrying the same operation may succeed (I/O hiccups).
    """

    code: str = "tempo_error"
    transient: bool = False
    # True when no later item can succeed either (full disk, read-only store): jobs stop at
    # once instead of recording a dead letter per item (pipelines/beam_support.py).
    fatal: bool = False

    def __init__(self, reason: str, *, item: str | None = None, **details: Any) -> None:
        self.reason = reason
        self.item = item
        self.details = details
        super().__init__(f"{item}: {reason}" if item else reason)

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable description (code, item, message, details)."""
        return {
            "code": self.code,
            "item": self.item,
            "message": str(self),
            "details": {k: _jsonable(v) for k, v in self.details.items()},
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


# --------------------------------------------------------------------------- inputs
class InputError(TempoError):
    """A user input (video, manifest, query) is unusable."""

    code = "input_error"


class VideoError(InputError):
    """A video cannot be used."""

    code = "video_error"


class VideoNotFound(VideoError):
    code = "video_not_found"


class EmptyVideoFile(VideoError):
    code = "empty_file"


class CorruptVideo(VideoError):
    """Truncated or corrupt container, or undecodable stream data."""

    code = "corrupt_container"


class NoVideoStream(VideoError):
    """The file has no video stream (audio-only, not a media file)."""

    code = "no_video_stream"


class UnsupportedCodec(VideoError):
    code = "unsupported_codec"


class VideoTooShort(VideoError):
    """No decodable frame at all."""

    code = "video_too_short"


class AbsurdDimensions(VideoError):
    code = "absurd_dimensions"


class VideoReadError(VideoError):
    """Storage failed while reading a video (network, permissions)."""

    code = "video_read_error"
    transient = True


class ManifestError(InputError):
    """The corpus manifest is invalid; ``problems`` lists (line, field, message)."""

    code = "manifest_invalid"

    def __init__(self, reason: str, *, item: str | None = None, problems: list | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(reason, item=item, problems=self.problems)


class InvalidQuery(InputError):
    code = "invalid_query"


class InvalidSegment(InputError):
    """A segment handed to the compressor is unusable (frames shape/dtype, start_position, real_fps)."""

    code = "invalid_segment"


class InvalidFrames(InputError):
    """Decoded frames handed to the SVLM input path have the wrong type, dtype or shape."""

    code = "invalid_frames"


class LLMInputError(InputError):
    """The LLM stage's inputs do not fit together (token width, allocation, timestamps, length)."""

    code = "llm_input_invalid"


# --------------------------------------------------------------------------- models
class ModelError(TempoError):
    code = "model_error"


class CheckpointNotFound(ModelError):
    code = "checkpoint_not_found"


class CheckpointFormatError(ModelError):
    """Files exist but do not form a checkpoint we can load (keys, shapes, config)."""

    code = "checkpoint_format"


class UnsupportedModel(ModelError):
    code = "unsupported_model"


class TokenizerError(ModelError):
    """The tokenizer lacks something the method needs (e.g. single-token Yes/No)."""

    code = "tokenizer_error"


class InferenceError(ModelError):
    """The model failed on an input (shape, out of memory, numerical error)."""

    code = "inference_error"


# --------------------------------------------------------------------------- cache
class CacheError(TempoError):
    code = "cache_error"


class CacheLayoutError(CacheError):
    """The cache's layout version or structure is not one this code reads."""

    code = "cache_layout"


class FingerprintMismatch(CacheError):
    """Writing into a cache made with a different compression configuration."""

    code = "fingerprint_mismatch"


class Float16Overflow(CacheError):
    """Candidate values do not fit float16 (|x| > 65504, inf or NaN)."""

    code = "float16_overflow"


class EntryNotFound(CacheError):
    code = "entry_not_found"


class CacheWriteError(CacheError):
    code = "cache_write_error"
    transient = True


class CacheNotWritable(CacheError):
    """The output location refuses writes (read-only file system, permissions)."""

    code = "cache_not_writable"
    fatal = True


class DiskFull(CacheError):
    """The output location has no space left (ENOSPC, quota)."""

    code = "disk_full"
    fatal = True


class InvalidCacheBlock(CacheError):
    """A block or video record given to the cache writer is invalid (shape, alignment, NaN, types)."""

    code = "invalid_cache_block"


class InvalidTokenRange(CacheError):
    """A token range asked of a cache entry is outside [0, K] or not one per segment."""

    code = "invalid_token_range"


class EntryIncomplete(CacheError):
    """Finalising found blocks of a cache entry missing or damaged; the entry stays incomplete."""

    code = "entry_incomplete"


class CacheCorrupt(EntryIncomplete):
    """Stored bytes of a cache entry fail their checksum, are missing, truncated or out of range.

    ``item`` names the entry (``video/query``); ``chunk`` the object or chunk (store key, and
    segment/token chunk where known). Recompute with ``tempo compress --repair``.
    """

    code = "cache_corrupt"


class EntryInputsMismatch(CacheError):
    """A cache entry was computed from other inputs (query text, template, video) than asked for."""

    code = "entry_inputs_mismatch"


class VideoNotIndexed(CacheError):
    """A video asked of a segment index is absent from it or its indexing did not finish."""

    code = "video_not_indexed"


class IndexMismatch(CacheError):
    """A segment index was built with another SVLM, prompt or geometry than the compressor in use."""

    code = "index_mismatch"


# --------------------------------------------------------------------------- allocation / shards
class AllocationError(TempoError):
    """Invalid input to a token allocation policy."""

    code = "invalid_allocation_input"


class ShardError(TempoError):
    code = "shard_error"


class ConfigError(TempoError):
    """Invalid command-line or job configuration."""

    code = "config_error"


class OutputOverlapsInput(ConfigError):
    """A job's output is, contains or lies inside one of its inputs (it would overwrite them)."""

    code = "output_overlaps_input"


class DeviceUnavailable(ConfigError):
    """The requested torch device does not exist here (e.g. ``--device cuda`` without a GPU)."""

    code = "device_unavailable"


class PackingError(AllocationError):
    """An allocation does not fit the cache entry it is applied to (length, range, shapes)."""

    code = "packing_error"


class ShardFormatError(ShardError):
    """A shard, sample or shard-set index is not in a format version this code reads."""

    code = "shard_format"


class ShardCorrupt(ShardError):
    """A shard tar's bytes do not match the sha256 (or size) recorded when it was written."""

    code = "shard_corrupt"
