"""The segment index's layout: node paths, attribute names, stored dtypes, fingerprint, version check.

The human-readable specification is ``schemas/INDEX_LAYOUT.md``; this module is its code.
An index stores, per segment, everything the compressor's language model needs to run a new
query without the video (``tempo_ops.svlm.compressor.SegmentFeatures``): prefix token ids,
rope-position inputs, the vision encoder's merged visual tokens and DeepStack features.

Zarr v3 hierarchy (keys relative to the index root; ``vkey = sanitize_key(video_id)``)::

    zarr.json                                  root group; attrs: ROOT_* (written once)
    videos/zarr.json                           group (no attrs)
    videos/{vkey}/zarr.json                    video group; attrs: VIDEO_*; marker "complete": true
    videos/{vkey}/units/{u}/zarr.json          unit group; attrs: UNIT_*; marker "complete": true (last)
    videos/{vkey}/units/{u}/visual             (n, N, D) STORED dtype, chunks (1, N, D)
    videos/{vkey}/units/{u}/deepstack          (n, L, N, D) STORED dtype, chunks (1, L, N, D)
    videos/{vkey}/units/{u}/n_visual           (n,) int32: real visual tokens of each segment (<= N)
    videos/{vkey}/units/{u}/input_ids          (n, P) int32, padded with -1
    videos/{vkey}/units/{u}/mm_token_type_ids  (n, P) int8, padded with 0
    videos/{vkey}/units/{u}/prefix_length      (n,) int32
    videos/{vkey}/units/{u}/grid               (n, 3) int32: (t, h, w) in patches
    videos/{vkey}/units/{u}/start_position     (n,) int64
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.cache_layout import (
    REQUIRED_SAMPLING_FIELDS,
    canonical_json,  # noqa: F401 - re-exported: the index fingerprints like the cache
    check_root,
    config_differences,  # noqa: F401
    config_fingerprint,  # noqa: F401
    require_sections,
    to_jsonable,
)
from tempo_ops.errors import ConfigError
from tempo_ops.keys import sanitize_key

LAYOUT_VERSION = 2  # 2: every chunk carries a crc32c (zarr codec); 1 (no checksums) is still read
READABLE_VERSIONS = (1, 2)
INDEX_KIND = "tempo_segment_index"
STORED_DTYPES = ("bfloat16", "float32")
DEFAULT_STORED_DTYPE = "bfloat16"
BF16_ENCODING = "bfloat16_bits_in_uint16"  # zarr v3 has no bfloat16 data type
DEFAULT_SEGMENTS_PER_UNIT = 32  # one unit = one writer = one group

# ---------------------------------------------------------------- node names
VIDEOS = "videos"
UNITS = "units"
METADATA_FILE = "zarr.json"
ARRAYS = ("visual", "deepstack", "n_visual", "input_ids", "mm_token_type_ids", "prefix_length", "grid", "start_position")

# ---------------------------------------------------------------- root attributes
ROOT_KIND = "kind"  # == INDEX_KIND
ROOT_LAYOUT_VERSION = "layout_version"
ROOT_FINGERPRINT = "fingerprint"  # sha256 hex of canonical_json(config)
ROOT_CONFIG = "config"  # {"svlm": {...}, "sampling": {...}, "compute_dtype": str, "stored_dtype": str}
ROOT_PACKAGE_VERSION = "tempo_ops_version"
ROOT_CREATED_AT = "created_at"
ROOT_SEGMENTS_PER_UNIT = "segments_per_unit"  # U: segments per unit group
ROOT_D = "hidden_size"
ROOT_DEEPSTACK_LAYERS = "deepstack_layers"  # L

# ---------------------------------------------------------------- video attributes
VIDEO_KIND = "tempo_index_video"
VIDEO_ID = "video_id"
VIDEO_N_SEGMENTS = "n_segments"
VIDEO_META = "meta"  # the same record the token cache stores (uri, timestamps, timestamp_texts, ...)
META_VIDEO_IDENTITY = "video_identity"  # in VIDEO_META: file_identity of the video when indexed
VIDEO_WRITTEN_AT = "written_at"
VIDEO_COMPLETE = "complete"  # marker: every unit landed and was verified
VIDEO_COMPLETED_AT = "completed_at"

# ---------------------------------------------------------------- unit attributes
UNIT_KIND = "tempo_index_unit"
UNIT_SEG_START = "seg_start"
UNIT_SEG_STOP = "seg_stop"
UNIT_STORED_DTYPE = "stored_dtype"
UNIT_ENCODING = "encoding"  # BF16_ENCODING for bfloat16, "float32" otherwise
UNIT_COMPLETE = "complete"  # written last, in the same put as the rest of the unit's attributes

REQUIRED_SVLM_FIELDS = ("svlm_name", "svlm_weights_sha256", "prompt_sha256", "reference_geometry", "hidden_size")


def video_path(video_id: str) -> str:
    return f"{VIDEOS}/{sanitize_key(video_id)}"


def units_path(video_id: str) -> str:
    return f"{video_path(video_id)}/{UNITS}"


def unit_path(video_id: str, unit: int) -> str:
    return f"{units_path(video_id)}/{int(unit)}"


def metadata_key(node_path: str) -> str:
    return f"{node_path}/{METADATA_FILE}" if node_path else METADATA_FILE


MEMORY_TOKEN_FIELDS = ("memory_tokens_source", "memory_tokens_sha256", "num_memory_tokens")
"""Fields of ``Compressor.fingerprint()`` an index does not depend on (it holds no memory-token output)."""


def split_identity(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """An index video record → (the record the token cache stores, the video identity recorded
    when indexing or None). Cache entries computed from the index carry that identity."""
    out = dict(meta)
    identity = out.pop(META_VIDEO_IDENTITY, None)
    return out, identity if isinstance(identity, dict) else None


def svlm_section(compressor_fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``Compressor.fingerprint()`` an index depends on: everything but the memory
    tokens (so any field a later compressor version adds, e.g. a numerics mode, counts too)."""
    return {k: v for k, v in compressor_fingerprint.items() if k not in MEMORY_TOKEN_FIELDS}


def index_config(compressor_fingerprint: Mapping[str, Any], sampling: Mapping[str, Any], *, compute_dtype: str, stored_dtype: str) -> dict[str, Any]:
    """The configuration an index is fingerprinted with (see INDEX_LAYOUT.md)."""
    return validate_config(
        {
            "svlm": svlm_section(compressor_fingerprint),
            "sampling": dict(sampling),
            "compute_dtype": compute_dtype,
            "stored_dtype": stored_dtype,
        }
    )


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check an index configuration; return it as plain JSON. ConfigError names the bad field."""
    if not isinstance(config, Mapping):
        raise ConfigError("index config must be a dict", item="config")
    out = to_jsonable(config, item="config")
    require_sections(out, {"svlm": REQUIRED_SVLM_FIELDS, "sampling": REQUIRED_SAMPLING_FIELDS})
    if out.get("stored_dtype") not in STORED_DTYPES:
        raise ConfigError(f"stored_dtype must be one of {STORED_DTYPES}, got {out.get('stored_dtype')!r}", item="config")
    if not isinstance(out.get("compute_dtype"), str):
        raise ConfigError("compute_dtype must be a string", item="config")
    return out


def check_layout(root_attrs: Mapping[str, Any] | None, item: str) -> dict[str, Any]:
    """Validate an index root's attributes; return them. The ONE layout-version check of the index.

    Raises CacheLayoutError when the root is not a Tempo segment index or its
    ``layout_version`` is missing or not one of ``READABLE_VERSIONS``.
    """
    return check_root(
        root_attrs,
        item,
        kind=INDEX_KIND,
        label="Tempo segment index",
        versions=READABLE_VERSIONS,
        required=(ROOT_FINGERPRINT, ROOT_CONFIG, ROOT_SEGMENTS_PER_UNIT, ROOT_D, ROOT_DEEPSTACK_LAYERS),
    )
