"""Token ids of the SVLM prompt for one segment (docs/METHOD.md, "SVLM prompt").

The prompt is the Qwen3-VL chat template with the generation prompt added::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
    <t0 seconds><|vision_start|><|video_pad|>*n<|vision_end|>      (one block per temporal group)
    <t1 seconds><|vision_start|><|video_pad|>*n<|vision_end|> ...
    \\nQuery:\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

It is split into a query-independent *prefix* (everything up to the last ``<|vision_end|>``)
and a query *suffix*. The split falls right after a special token, so tokenising the two
parts separately gives exactly the ids of tokenising the whole string (tested).

Each temporal group's time follows Qwen3-VL's ``_calculate_timestamps``: frame indices are
``start_position + arange(T)`` (absolute positions in the sampled-frame list, so in-prompt
times are absolute), times are ``index / real_fps``, and each group of 2 frames is stamped
with the mean of its first and last frame time, rendered ``<{t:.1f} seconds>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tempo_ops.errors import InvalidQuery, TokenizerError

SYSTEM_PROMPT_TRAINING = (
    "You are a query-conditioned visual compressor. Store in the provided memory tokens the minimal "
    "visual information needed to answer the Query. Ignore irrelevant details."
)
"""System prompt used to train the compressor (without the Yes/No question)."""

SYSTEM_PROMPT = (
    SYSTEM_PROMPT_TRAINING
    + " Now, before compressing, answer exactly 'Yes' or 'No': is this segment relevant to the Query?"
)
"""System prompt used at inference: the training text plus the zero-shot relevance question."""

DEFAULT_QUERY = "Describe this content."
"""Query used when the user's query is empty or blank."""

QUERY_TEMPLATE = "\nQuery:\n{query}"
"""User text that follows the video; ``{query}`` is the user's query."""

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"

TEMPORAL_PATCH_SIZE = 2
SPATIAL_MERGE_SIZE = 2

# mm_token_type_ids values used by transformers' multimodal processors.
MM_TEXT, MM_IMAGE, MM_VIDEO = 0, 1, 2

# Strings that would corrupt the prompt's structure if they appeared inside a query.
_FORBIDDEN_IN_QUERY = (IM_START, IM_END, VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD, "<|vision_pad|>", "<|endoftext|>")


@dataclass(frozen=True)
class PrefixTokens:
    """Query-independent prompt prefix of one segment.

    Attributes:
        input_ids: ``(Lp,) int64`` token ids.
        mm_token_type_ids: ``(Lp,) int64``: 2 on ``<|video_pad|>`` tokens, 0 elsewhere (vision
            start/end markers and timestamps are text, as in ``Qwen3VLProcessor``).
    """

    input_ids: np.ndarray
    mm_token_type_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


SegmentTokens = PrefixTokens
"""Same structure, for a whole segment prompt (prefix + suffix), as returned by ``build_segment_ids``."""


def _grid(video_grid_thw: Any) -> tuple[int, int, int]:
    """``(t, h, w)`` from a ``(1, 3)`` or ``(3,)`` grid (numpy, torch or sequence)."""
    arr = np.asarray(video_grid_thw.tolist() if hasattr(video_grid_thw, "tolist") else video_grid_thw, dtype=np.int64)
    arr = arr.reshape(-1)
    if arr.shape != (3,):
        raise InvalidQuery(f"video_grid_thw must hold one (t, h, w) grid, got shape {arr.shape}", item="video_grid_thw")
    t, h, w = (int(v) for v in arr)
    if t < 1 or h < 1 or w < 1 or h % SPATIAL_MERGE_SIZE or w % SPATIAL_MERGE_SIZE:
        raise InvalidQuery(f"invalid grid (t={t}, h={h}, w={w}): positive, h and w even", item="video_grid_thw")
    return t, h, w


def group_timestamps(start_position: int, n_frames: int, real_fps: float, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> list[float]:
    """Seconds stamped on each temporal group, exactly as Qwen3-VL's ``_calculate_timestamps``.

    Args:
        start_position: index of the segment's first frame among the video's sampled frames.
        n_frames: frames in the segment (after even padding).
        real_fps: sampled frames per second of the video.
    Returns:
        One float per group of ``temporal_patch_size`` frames (seconds, absolute).
    """
    if not (isinstance(real_fps, (int, float)) and np.isfinite(real_fps) and real_fps > 0):
        raise InvalidQuery(f"real_fps must be a positive finite number, got {real_fps!r}", item="real_fps")
    if start_position < 0:
        raise InvalidQuery(f"start_position must be >= 0, got {start_position}", item="start_position")
    indices = [int(start_position) + i for i in range(int(n_frames))]
    if len(indices) % temporal_patch_size:
        indices.extend(indices[-1] for _ in range(temporal_patch_size - len(indices) % temporal_patch_size))
    times = [idx / real_fps for idx in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def video_placeholder_text(video_grid_thw: Any, start_position: int, real_fps: float) -> str:
    """The expanded video text: per temporal group ``<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>``.

    ``n = h * w / 4`` (merged tokens per group).
    """
    t, h, w = _grid(video_grid_thw)
    per_group = h * w // (SPATIAL_MERGE_SIZE * SPATIAL_MERGE_SIZE)
    times = group_timestamps(start_position, t * TEMPORAL_PATCH_SIZE, real_fps)
    return "".join(f"<{ts:.1f} seconds>{VISION_START}{VIDEO_PAD * per_group}{VISION_END}" for ts in times)


def prefix_text(video_grid_thw: Any, start_position: int, real_fps: float, *, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The prefix as text (system turn, user turn start, expanded video)."""
    return (
        f"{IM_START}system\n{system_prompt}{IM_END}\n{IM_START}user\n"
        + video_placeholder_text(video_grid_thw, start_position, real_fps)
    )


def normalize_query(query: str | None) -> str:
    """The query text placed in the prompt: blank/empty/None → ``DEFAULT_QUERY``.

    Raises:
        InvalidQuery: not a string, or it contains a chat/vision control token.
    """
    if query is None:
        return DEFAULT_QUERY
    if not isinstance(query, str):
        raise InvalidQuery(f"query must be a string, got {type(query).__name__}", item="query")
    for token in _FORBIDDEN_IN_QUERY:
        if token in query:
            raise InvalidQuery(f"query contains the control token {token!r}", item=repr(query[:60]))
    return query if query.strip() else DEFAULT_QUERY


def suffix_text(query: str | None) -> str:
    """The suffix as text: ``"\\nQuery:\\n{query}<|im_end|>\\n<|im_start|>assistant\\n"``."""
    return QUERY_TEMPLATE.format(query=normalize_query(query)) + f"{IM_END}\n{IM_START}assistant\n"


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise TokenizerError(f"tokenizer has no token {token!r}", item=getattr(tokenizer, "name_or_path", None))
    return int(tid)


def build_prefix_ids(
    tokenizer: Any,
    video_grid_thw: Any,
    start_position: int,
    real_fps: float,
    *,
    system_prompt: str = SYSTEM_PROMPT,
) -> PrefixTokens:
    """Token ids of the query-independent prefix of one segment.

    Args:
        tokenizer: the SVLM's (fast) tokenizer.
        video_grid_thw: ``(1, 3)`` int grid ``(t, h, w)`` in patches (from ``frames_to_video_inputs``).
        start_position: the segment's first frame position in the sampled-frame list.
        real_fps: sampled frames per second of the video.
        system_prompt: system text (``SYSTEM_PROMPT`` at inference, ``SYSTEM_PROMPT_TRAINING`` for training).
    Returns:
        ``PrefixTokens`` with ``(Lp,) int64`` ids and mm_token_type_ids.
    Raises:
        TokenizerError: the tokenizer does not know ``<|video_pad|>`` or mis-tokenises the video block.
    """
    t, h, w = _grid(video_grid_thw)
    ids = _encode(tokenizer, prefix_text(video_grid_thw, start_position, real_fps, system_prompt=system_prompt))
    video_id = _token_id(tokenizer, VIDEO_PAD)
    mm = np.where(ids == video_id, MM_VIDEO, MM_TEXT).astype(np.int64)
    expected = t * h * w // (SPATIAL_MERGE_SIZE * SPATIAL_MERGE_SIZE)
    if int((mm == MM_VIDEO).sum()) != expected:
        raise TokenizerError(
            f"prefix holds {int((mm == MM_VIDEO).sum())} video tokens, expected {expected}",
            item=getattr(tokenizer, "name_or_path", None),
        )
    return PrefixTokens(input_ids=ids, mm_token_type_ids=mm)


def build_suffix_ids(tokenizer: Any, query: str | None) -> np.ndarray:
    """Token ids ``(Ls,) int64`` of ``"\\nQuery:\\n{query}<|im_end|>\\n<|im_start|>assistant\\n"``.

    An empty or blank query becomes ``DEFAULT_QUERY``. Raises ``InvalidQuery`` for non-strings and
    queries containing chat/vision control tokens.
    """
    return _encode(tokenizer, suffix_text(query))


def build_segment_ids(
    tokenizer: Any,
    video_grid_thw: Any,
    start_position: int,
    real_fps: float,
    query: str | None,
    *,
    system_prompt: str = SYSTEM_PROMPT,
) -> SegmentTokens:
    """Prefix + suffix of one segment and one query: ``(L,) int64`` ids and mm_token_type_ids."""
    prefix = build_prefix_ids(tokenizer, video_grid_thw, start_position, real_fps, system_prompt=system_prompt)
    suffix = build_suffix_ids(tokenizer, query)
    return SegmentTokens(
        input_ids=np.concatenate([prefix.input_ids, suffix]),
        mm_token_type_ids=np.concatenate([prefix.mm_token_type_ids, np.zeros_like(suffix)]),
    )


def chat_messages(query: str | None, *, system_prompt: str = SYSTEM_PROMPT, video: Any = None) -> list[dict]:
    """The chat messages of one segment's prompt, for ``apply_chat_template`` (video as one content item)."""
    video_item: dict[str, Any] = {"type": "video"}
    if video is not None:
        video_item["video"] = video
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": [video_item, {"type": "text", "text": QUERY_TEMPLATE.format(query=normalize_query(query))}]},
    ]


def prompt_sha256(system_prompts: Sequence[str] = (SYSTEM_PROMPT,)) -> str:
    """SHA-256 (hex) of the system prompt(s) and the query template, for the cache fingerprint.

    Changes whenever the prompt text that shapes the candidates changes.
    """
    h = hashlib.sha256()
    for part in (*system_prompts, QUERY_TEMPLATE, DEFAULT_QUERY, "timestamps:qwen3vl-mean-of-group:{t:.1f}"):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def yes_no_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Vocabulary ids of "Yes" and "No" (rows of the LM head used for the relevance score).

    Raises:
        TokenizerError: either word does not encode to exactly one token.
    """
    ids = []
    for word in ("Yes", "No"):
        enc = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise TokenizerError(
                f"{word!r} encodes to {len(enc)} tokens {enc}, the relevance score needs exactly one",
                item=getattr(tokenizer, "name_or_path", None),
            )
        ids.append(int(enc[0]))
    return ids[0], ids[1]
