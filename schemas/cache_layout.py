"""The token cache's layout: node paths, attribute names, shapes, fingerprint, version check.

The human-readable specification is ``schemas/CACHE_LAYOUT.md``; this module is its code.
Everything that names a node or an attribute of the cache lives here, so writer, reader,
``tempo inspect`` and third-party readers agree.

Zarr v3 hierarchy (keys relative to the cache root; ``vkey = sanitize_key(video_id)``,
``qkey = sanitize_key(query_id)``)::

    zarr.json                                   root group; attrs: ROOT_* (written once)
    videos/zarr.json                            group (no attrs)
    videos/{vkey}/zarr.json                     video group; attrs: VIDEO_* (+ "meta")
    videos/{vkey}/queries/zarr.json             group (no attrs)
    videos/{vkey}/queries/{qkey}/zarr.json      entry group; attrs: ENTRY_* ; marker "complete": true
    v2: videos/{vkey}/queries/{qkey}/{version}/  version group (attrs: ENTRY_INPUTS ...), holding
        candidates (S, K, D) {float16 | bfloat16 bits as uint16 | int8}, shards (P, K, D), chunks (1, C, D)
        scales     (S, K) float32 (int8 form only), shards (P, K), chunks (1, K)
        channel_exponents (S, D) int8 (int8 form, scheme "token_channel"), shards (P, D), chunks (1, D)
        relevance  (S,) float32, chunks (P,)
        every chunk and shard index ends in a crc32c; float fill values are NaN
    v1: videos/{vkey}/queries/{qkey}/candidates (S, K, D) float16 and .../relevance, no per-chunk crc32c
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from tempo_ops.errors import CacheLayoutError, ConfigError, InvalidCacheBlock
from tempo_ops.keys import sanitize_key

LAYOUT_VERSION = 2  # what new caches are written as
READABLE_VERSIONS = (1, 2)  # v1 caches are read (and shard-able) without conversion; `tempo migrate` converts
CACHE_KIND = "tempo_token_cache"
STORED_DTYPE = "float16"  # v1's only form
STORAGE_FORMS = ("bfloat16", "float16", "int8")  # v2: config["stored_dtype"]
FLOAT16_MAX = 65504.0
BF16_NAN_BITS = 0x7FC0  # fill value of bfloat16 candidates (stored as uint16 bit patterns)
INT8_MISSING = -128  # fill value of int8 candidates and channel exponents (stored values lie in [-127, 127])
# int8 schemes (root attribute INT8_SCHEME): "token" = x ≈ q·scale[token] (the first int8 caches;
# a root without the attribute); "token_channel" = x ≈ q·scale[token]·2**exponent[segment, channel]
# (new caches): a power-of-two pre-scale per channel, (max|x| · mean|x|)**(3/8) over the segment's
# tokens rounded to a power of two, keeps outlier channels and sink tokens from crushing the others.
INT8_SCHEMES = ("token", "token_channel")
INT8_SCHEME = "token_channel"  # what new int8 caches are written with
TEMPO_DTYPE_ATTR = "tempo_dtype"  # array attribute: what the stored numbers mean ("bfloat16", "int8_scaled")
CRC_NBYTES = 4  # crc32c appended to every v2 chunk and every shard index

DEFAULT_SEGMENTS_PER_SHARD = 32  # P: one shard = one unit of writing (one writer per shard)
# C: inner chunk along the token axis = read and checksum granularity. v2 reads whole chunks
# (to verify their crc32c), so C=2 keeps a budget read within ~1.1x of the selected bytes.
DEFAULT_TOKEN_CHUNK = 2
V1_DEFAULT_TOKEN_CHUNK = 8

# ---------------------------------------------------------------- node names
VIDEOS = "videos"
QUERIES = "queries"
CANDIDATES = "candidates"
RELEVANCE = "relevance"
SCALES = "scales"
CHANNEL_EXPONENTS = "channel_exponents"
METADATA_FILE = "zarr.json"
CANDIDATES_DIMS = ("segment", "token", "channel")
RELEVANCE_DIMS = ("segment",)
SCALES_DIMS = ("segment", "token")
CHANNEL_EXPONENTS_DIMS = ("segment", "channel")

# ---------------------------------------------------------------- root attributes
ROOT_KIND = "kind"  # == CACHE_KIND
ROOT_LAYOUT_VERSION = "layout_version"  # int == LAYOUT_VERSION
ROOT_FINGERPRINT = "fingerprint"  # sha256 hex of canonical_json(config)
ROOT_CONFIG = "config"  # {"compressor": {...}, "sampling": {...}, "stored_dtype": "float16"}
ROOT_PACKAGE_VERSION = "tempo_ops_version"  # producing tempo_ops.__version__
ROOT_CREATED_AT = "created_at"  # ISO-8601 UTC
ROOT_SEGMENTS_PER_SHARD = "segments_per_shard"  # P
ROOT_TOKEN_CHUNK = "token_chunk"  # C
ROOT_K = "num_memory_tokens"  # K (== config.compressor.num_memory_tokens)
ROOT_D = "hidden_size"  # D (== config.compressor.hidden_size)
ROOT_STORAGE_FORM = "storage_form"  # v2: one of STORAGE_FORMS (== config.stored_dtype)
ROOT_INT8_SCHEME = "int8_scheme"  # v2 int8 caches: one of INT8_SCHEMES (absent: "token")

# ---------------------------------------------------------------- video attributes
VIDEO_KIND = "tempo_video"
VIDEO_ID = "video_id"  # original id (the group name is sanitize_key of it)
VIDEO_N_SEGMENTS = "n_segments"
VIDEO_META = "meta"  # the record given to write_video (see VIDEO_META_REQUIRED / _KNOWN)
VIDEO_WRITTEN_AT = "written_at"

VIDEO_META_REQUIRED = ("uri", "timestamps", "timestamp_texts")
VIDEO_META_KNOWN = ("probe", "frame_indices", "real_fps", "bounds", "sampling")

# ---------------------------------------------------------------- entry attributes
ENTRY_KIND = "tempo_entry"
ENTRY_VIDEO_ID = "video_id"
ENTRY_QUERY_ID = "query_id"
ENTRY_QUERY_TEXT = "query_text"  # the text the compressor read (the query rendered under the template)
ENTRY_PROMPT_TEMPLATE = "prompt_template"  # name in tempo_ops.query_text.TEMPLATES; part of the entry's identity
ENTRY_N_SEGMENTS = "n_segments"
ENTRY_K = "num_memory_tokens"
ENTRY_D = "hidden_size"
ENTRY_STARTED_AT = "started_at"
ENTRY_COMPLETE = "complete"  # the completion marker: True, written last by finalize_entry
ENTRY_COMPLETED_AT = "completed_at"
ENTRY_PACKAGE_VERSION = "tempo_ops_version"
# v2 only
ENTRY_VERSION = "version"  # the pointer: name of the complete version subgroup readers use
ENTRY_PENDING = "pending_version"  # the version subgroup being written (resume / unit writers)
ENTRY_INPUTS = "inputs"  # what the entry was computed from (see entry_inputs)
ENTRY_INPUTS_SHA256 = "inputs_sha256"  # sha256 of canonical_json(inputs)
VERSION_KIND = "tempo_entry_version"
VERSION_NAME = re.compile(r"v[0-9a-f]{16}")  # version subgroup names (``v`` + 16 hex digits)

# ---------------------------------------------------------------- config / fingerprint
REQUIRED_COMPRESSOR_FIELDS = (
    "svlm_name",
    "svlm_weights_sha256",
    "memory_tokens_source",
    "memory_tokens_sha256",
    "prompt_sha256",
    "num_memory_tokens",
    "hidden_size",
    "reference_geometry",
)
REQUIRED_SAMPLING_FIELDS = ("target_fps", "min_frames", "max_frames", "max_edge", "window")


def video_path(video_id: str) -> str:
    """Zarr path of a video's group."""
    return f"{VIDEOS}/{sanitize_key(video_id)}"


def queries_path(video_id: str) -> str:
    """Zarr path of the group holding a video's entries."""
    return f"{video_path(video_id)}/{QUERIES}"


def entry_path(video_id: str, query_id: str) -> str:
    """Zarr path of one (video, query) entry group."""
    return f"{queries_path(video_id)}/{sanitize_key(query_id)}"


def data_path(video_id: str, query_id: str, version: str | None = None) -> str:
    """Group holding an entry's arrays: the version subgroup (v2) or the entry group itself (v1: None)."""
    base = entry_path(video_id, query_id)
    return f"{base}/{version}" if version else base


def candidates_path(video_id: str, query_id: str, version: str | None = None) -> str:
    return f"{data_path(video_id, query_id, version)}/{CANDIDATES}"


def relevance_path(video_id: str, query_id: str, version: str | None = None) -> str:
    return f"{data_path(video_id, query_id, version)}/{RELEVANCE}"


def scales_path(video_id: str, query_id: str, version: str | None = None) -> str:
    return f"{data_path(video_id, query_id, version)}/{SCALES}"


def channel_exponents_path(video_id: str, query_id: str, version: str | None = None) -> str:
    return f"{data_path(video_id, query_id, version)}/{CHANNEL_EXPONENTS}"


def metadata_key(node_path: str) -> str:
    """Store key of a node's ``zarr.json`` ('' is the root)."""
    return f"{node_path}/{METADATA_FILE}" if node_path else METADATA_FILE


def candidates_shard_key(video_id: str, query_id: str, shard_index: int, version: str | None = None) -> str:
    """Store key of candidates shard ``shard_index`` (default chunk-key encoding, '/' separator)."""
    return f"{candidates_path(video_id, query_id, version)}/c/{shard_index}/0/0"


def scales_shard_key(video_id: str, query_id: str, shard_index: int, version: str | None = None) -> str:
    return f"{scales_path(video_id, query_id, version)}/c/{shard_index}/0"


def channel_exponents_shard_key(video_id: str, query_id: str, shard_index: int, version: str | None = None) -> str:
    return f"{channel_exponents_path(video_id, query_id, version)}/c/{shard_index}/0"


def relevance_chunk_key(video_id: str, query_id: str, chunk_index: int, version: str | None = None) -> str:
    return f"{relevance_path(video_id, query_id, version)}/c/{chunk_index}"


def stored_itemsize(form: str) -> int:
    """Bytes per stored candidate value of a storage form."""
    return 1 if form == "int8" else 2


def segment_nbytes(form: str, k: int, d: int, *, int8_scheme: str = INT8_SCHEME) -> int:
    """Stored bytes of one segment of an entry (candidates, int8 side arrays, relevance), without
    the per-chunk checksums and shard indexes."""
    side = k * 4 + (d if int8_scheme == "token_channel" else 0) if form == "int8" else 0
    return k * d * stored_itemsize(form) + side + 4


def entry_inputs(
    query_text: str, prompt_template: str, video_identity: Mapping[str, Any] | None, fingerprint: str, n_segments: int
) -> dict[str, Any]:
    """An entry's identity record: what its tokens were computed from (compared on every re-run)."""
    return to_jsonable(
        {
            "query_text": query_text,
            "prompt_template": prompt_template,
            "video": dict(video_identity) if video_identity is not None else None,
            "fingerprint": fingerprint,
            "n_segments": int(n_segments),
        },
        item="inputs",
    )


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(inputs).encode("ascii")).hexdigest()


def shard_index_nbytes(segments_per_shard: int, num_tokens: int, token_chunk: int) -> int:
    """Bytes of a candidates shard's index: 16 per inner chunk + 4 (crc32c)."""
    return segments_per_shard * (num_tokens // token_chunk) * 16 + 4


# ---------------------------------------------------------------- JSON helpers
def to_jsonable(value: Any, *, item: str = "value") -> Any:
    """``value`` as plain JSON types (numpy scalars/arrays, tuples converted); rejects NaN/inf."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, item=f"{item}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, item=item) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), item=item)
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), item=item)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidCacheBlock(f"{item} is not finite ({value})", item=item)
        return value
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise InvalidCacheBlock(f"{item} is not JSON-serialisable ({type(value).__name__})", item=item)


def _canonical(value: Any) -> Any:
    # 2 and 2.0 must give the same fingerprint (configs pass through JSON and Python alike).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, ASCII, integral floats as ints, no NaN."""
    return json.dumps(_canonical(to_jsonable(value)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 hex digest of ``canonical_json(config)``."""
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def require_sections(config: Mapping[str, Any], sections: Mapping[str, Sequence[str]]) -> None:
    """ConfigError unless ``config[section]`` is a dict holding every field of ``sections[section]``."""
    for section, fields in sections.items():
        sub = config.get(section)
        if not isinstance(sub, dict):
            raise ConfigError(f"missing section {section!r}", item="config")
        missing = [f for f in fields if f not in sub]
        if missing:
            raise ConfigError(f"missing field(s) {', '.join(section + '.' + m for m in missing)}", item="config")


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check the cache configuration and return it as plain JSON (a fresh dict).

    Raises ConfigError naming the missing/invalid field.
    """
    if not isinstance(config, Mapping):
        raise ConfigError("cache config must be a dict", item="config")
    out = to_jsonable(config, item="config")
    require_sections(out, {"compressor": REQUIRED_COMPRESSOR_FIELDS, "sampling": REQUIRED_SAMPLING_FIELDS})
    if out.get("stored_dtype") not in STORAGE_FORMS:
        raise ConfigError(f"stored_dtype must be one of {list(STORAGE_FORMS)}, got {out.get('stored_dtype')!r}", item="config")
    for name in ("num_memory_tokens", "hidden_size"):
        v = out["compressor"][name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"compressor.{name} must be a positive int, got {v!r}", item="config")
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: _canonical(value)}


def config_differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Dotted names of the fields that differ, e.g. ``["compressor.memory_tokens_sha256"]``."""
    a, b = _flatten(to_jsonable(stored)), _flatten(to_jsonable(given))
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


# ---------------------------------------------------------------- version check (every reader)
def check_layout(root_attrs: Mapping[str, Any] | None, item: str) -> dict[str, Any]:
    """Validate a cache root's attributes; return them. The ONE layout-version check.

    Raises CacheLayoutError when the root is not a Tempo cache, is damaged, its
    ``layout_version`` is missing or not one of ``READABLE_VERSIONS``, or (v2) its
    ``storage_form`` is missing or unknown.
    """
    attrs = check_root(
        root_attrs,
        item,
        kind=CACHE_KIND,
        label="Tempo token cache",
        versions=READABLE_VERSIONS,
        required=(ROOT_FINGERPRINT, ROOT_CONFIG, ROOT_SEGMENTS_PER_SHARD, ROOT_TOKEN_CHUNK, ROOT_K, ROOT_D),
        required_by_version={2: (ROOT_STORAGE_FORM,)},
    )
    if attrs[ROOT_LAYOUT_VERSION] >= 2 and attrs[ROOT_STORAGE_FORM] not in STORAGE_FORMS:
        raise CacheLayoutError(f"unknown storage form {attrs[ROOT_STORAGE_FORM]!r}", item=item)
    if attrs.get(ROOT_INT8_SCHEME, "token") not in INT8_SCHEMES:
        raise CacheLayoutError(f"unknown int8 scheme {attrs[ROOT_INT8_SCHEME]!r}", item=item)
    return attrs


def check_root(
    root_attrs: Mapping[str, Any] | None,
    item: str,
    *,
    kind: str,
    label: str,
    versions: Collection[int],
    required: Sequence[str],
    required_by_version: Mapping[int, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Validate a hierarchy root's ``kind``, ``layout_version`` (one of ``versions``) and
    ``required`` attributes, plus ``required_by_version[version]`` (cache and segment index
    alike); return them. CacheLayoutError says what is wrong."""
    if root_attrs is None:
        raise CacheLayoutError(f"no {label} here (root zarr.json missing or unreadable)", item=item)
    if not isinstance(root_attrs, Mapping):
        raise CacheLayoutError("root zarr.json is damaged (attributes are not an object)", item=item)
    if root_attrs.get(ROOT_KIND) != kind:
        raise CacheLayoutError(f"not a {label} (root attribute {ROOT_KIND!r} is not {kind!r})", item=item)
    found = root_attrs.get(ROOT_LAYOUT_VERSION)
    if found is None:
        raise CacheLayoutError("root attribute 'layout_version' is missing", item=item)
    readable = sorted(versions)
    if isinstance(found, bool) or found not in readable:
        raise CacheLayoutError(
            f"layout_version {found!r} is not supported (this code reads {readable[0] if len(readable) == 1 else readable})",
            item=item,
            found=found,
            expected=max(readable),
        )
    for name in (*required, *(required_by_version or {}).get(found, ())):
        if name not in root_attrs:
            raise CacheLayoutError(f"root attribute {name!r} is missing", item=item)
    return dict(root_attrs)


def storage_form(root_attrs: Mapping[str, Any]) -> str:
    """The storage form of a checked root (v1: always float16)."""
    return STORED_DTYPE if root_attrs.get(ROOT_LAYOUT_VERSION) == 1 else str(root_attrs[ROOT_STORAGE_FORM])


def int8_channel_scaled(root_attrs: Mapping[str, Any]) -> bool:
    """True when a checked root's int8 candidates carry per-(segment, channel) exponents."""
    return storage_form(root_attrs) == "int8" and root_attrs.get(ROOT_INT8_SCHEME, "token") == "token_channel"


def validate_video_meta(video_id: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Check a video record for ``write_video``; return it as plain JSON.

    Requires ``uri`` (str), ``timestamps`` (list of float seconds, one per segment) and
    ``timestamp_texts`` (list of str, same length, >= 1). Other fields are kept as given.
    """
    if not isinstance(meta, Mapping):
        raise InvalidCacheBlock("video meta must be a dict", item=video_id)
    out = to_jsonable(meta, item=f"{video_id}.meta")
    missing = [f for f in VIDEO_META_REQUIRED if f not in out]
    if missing:
        raise InvalidCacheBlock(f"video meta lacks {', '.join(missing)}", item=video_id)
    ts, texts = out["timestamps"], out["timestamp_texts"]
    if not isinstance(ts, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts):
        raise InvalidCacheBlock("meta.timestamps must be a list of numbers (seconds)", item=video_id)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidCacheBlock("meta.timestamp_texts must be a list of strings", item=video_id)
    if len(ts) != len(texts) or not ts:
        raise InvalidCacheBlock(
            f"meta.timestamps ({len(ts)}) and meta.timestamp_texts ({len(texts)}) must have the same, non-zero length",
            item=video_id,
        )
    if not isinstance(out["uri"], str):
        raise InvalidCacheBlock("meta.uri must be a string", item=video_id)
    return out
