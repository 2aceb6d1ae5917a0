"""The query-aware SVLM compressor (docs/METHOD.md "SVLM prompt", "Memory tokens", "Relevance").

For every (query, segment) pair the SVLM reads ``[system + video] [query suffix] [K memory tokens]``.
The candidates are the final post-norm hidden states at the K memory positions, ``(K, D)``; the
relevance is ``sigmoid((w_Yes − w_No) · h)`` with h the final hidden state of the last suffix
token (the position just before the first memory token) and w_Yes/w_No the base SVLM LM-head rows.

Shared prefix: the query comes after the video, so the key/value states of the prefix do not
depend on it. ``compress`` runs the vision encoder and the language model over each prefix once
(segments whose prefixes have the same length are batched), keeps the KV cache, and then runs
every query's suffix + memory tokens as one batch against the cache (right padding, attention
mask, positions continuing after the prefix's 3-D rope positions). ``compress_unshared`` runs
every full sequence independently, as the reference implementation does; both give the same
result within floating-point tolerance (tested).

Rope positions: prefix positions come from ``Qwen3VLModel.get_rope_index``; every suffix and
memory token is text, so its three rope coordinates all equal ``next_position + offset`` where
``next_position = P + rope_delta`` is the position after the prefix — exactly what
``get_rope_index`` gives over the full sequence with placeholder text ids at memory positions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tempo_ops import numerics as num
from tempo_ops.chunking import consecutive_chunks
from tempo_ops.errors import (
    CheckpointFormatError,
    InferenceError,
    InputError,
    InvalidQuery,
    InvalidSegment,
    TempoError,
)
from tempo_ops.svlm import checkpoints
from tempo_ops.svlm import prompt as svlm_prompt

DEFAULT_NUM_MEMORY_TOKENS = 128
DEFAULT_MAX_BATCH_TOKENS = 32768
"""Default cap on Σ(attended sequence length) of the rows of one forward pass."""


@dataclass(frozen=True)
class CompressionResult:
    """Output of ``Compressor.compress``.

    Attributes:
        candidates: ``(Q, S, K, D) float32`` memory-token hidden states per query and segment.
        relevance: ``(Q, S) float32`` in [0, 1]: P(Yes) / (P(Yes) + P(No)).
    """

    candidates: np.ndarray
    relevance: np.ndarray


@dataclass
class _Prepared:
    """One segment's query-independent inputs."""

    label: str
    input_ids: torch.Tensor  # (P,) int64
    mm_token_type_ids: torch.Tensor  # (P,) int64
    pixel_values: torch.Tensor  # (N, C) float32
    grid: torch.Tensor  # (1, 3) int64


@dataclass(frozen=True)
class SegmentFeatures:
    """One segment's query-independent SVLM inputs, after the vision encoder (what an index stores).

    Attributes:
        input_ids: ``(P,) int64`` prefix token ids (system + video block, time stamps included).
        mm_token_type_ids: ``(P,) int64`` (0 text, 2 video), rope-position input with ``grid``.
        grid: ``(3,) int64`` video grid ``(t, h, w)`` in patches.
        visual: ``(N, D)`` merged visual tokens, N = number of video tokens in ``input_ids``.
        deepstack: ``(L, N, D)`` DeepStack features of the L DeepStack layers.
        start_position: the segment's first sampled-frame position.
        label: names the segment in errors.
    ``visual``/``deepstack`` are torch tensors in the model dtype (any device).
    """

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    grid: torch.Tensor
    visual: torch.Tensor
    deepstack: torch.Tensor
    start_position: int
    label: str


@dataclass
class _PrefixState:
    """KV cache of a batch of G equal-length prefixes."""

    length: int  # P
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (G, H, P, d) keys and values
    next_position: torch.Tensor  # (G,) int64: rope position of the first suffix token


def resolve_device_dtype(device: str | torch.device | None, dtype: torch.dtype | str | None) -> tuple[torch.device, torch.dtype]:
    """Default device (CUDA when available, else CPU) and dtype (bf16 on CUDA, float32 on CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dt = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise InputError(f"unknown floating dtype {dtype!r}", item="dtype")
    else:
        dt = dtype
    return dev, dt


def _segment_label(segment: Any, i: int) -> str:
    index = getattr(segment, "index", None)
    start = getattr(segment, "start_position", None)
    return f"segment {i}" + (f" (index {index}" if index is not None else " (") + f", start_position {start})"


class Compressor:
    """Query-aware compressor: a Qwen3-VL SVLM plus K learned memory tokens.

    Build it with ``Compressor.from_pretrained``; the constructor takes already loaded parts.

    Args:
        model: ``Qwen3VLForConditionalGeneration`` (eval mode, on ``device``/``dtype``).
        tokenizer: its tokenizer.
        memory_tokens: ``(1, K, D)`` memory-token embeddings (kept as a float32 master copy).
        yes_no_rows: ``(2, D)`` base LM-head rows of "Yes" and "No".
        svlm_name: name of the SVLM (last component of its location; for the fingerprint).
        svlm_weights_sha256: fingerprint of the SVLM weights in use.
        memory_tokens_source: ``"tempo:<name>"``, ``"compressor:<name>"`` or ``"init:seed=<n>"``
            (``+svlm`` appended when the SVLM weights came from the Tempo checkpoint).
        max_batch_tokens: cap on Σ(attended sequence length) over the rows of one forward pass
            (prefix passes: G·P; suffix passes: Σ(P + suffix + K); at least one row always runs).
        reference_geometry: passed to ``frames_to_video_inputs`` (docs/METHOD.md "Geometry").
        numerics: ``"reference"`` hooks the released model's bf16 roundings into ``model``
            (``tempo_ops.numerics.install_reference_numerics``), keeps an fp16-rounded device copy
            of the memory tokens and subtracts the Yes/No rows in bf16; ``"exact"`` runs the model
            as given. The fp16 pass of the SVLM weights is done by ``from_pretrained``.
        svlm_location, memory_tokens_location: full paths/URLs they were loaded from (informational).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        memory_tokens: torch.Tensor,
        yes_no_rows: torch.Tensor,
        *,
        svlm_name: str,
        svlm_weights_sha256: str,
        memory_tokens_source: str,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        reference_geometry: bool = True,
        numerics: str = num.EXACT,
        svlm_location: str | None = None,
        memory_tokens_location: str | None = None,
    ) -> None:
        hidden = int(model.config.text_config.hidden_size)
        if memory_tokens.ndim != 3 or memory_tokens.shape[0] != 1 or memory_tokens.shape[2] != hidden:
            raise CheckpointFormatError(
                f"memory tokens must have shape (1, K, {hidden}), got {tuple(memory_tokens.shape)}", item=svlm_name
            )
        if tuple(yes_no_rows.shape) != (2, hidden):
            raise CheckpointFormatError(f"Yes/No rows must have shape (2, {hidden})", item=svlm_name)
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise InputError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}", item="max_batch_tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self.reference_geometry = bool(reference_geometry)
        self.numerics = num.resolve_numerics(numerics, dtype)
        self.svlm_name = svlm_name
        self.svlm_weights_sha256 = svlm_weights_sha256
        self.memory_tokens_source = memory_tokens_source
        self.svlm_location = svlm_location or svlm_name
        self.memory_tokens_location = memory_tokens_location
        self._memory_tokens = memory_tokens.detach().to("cpu", torch.float32).contiguous()
        reference = self.numerics == num.REFERENCE
        device_tokens = num.pass_through_fp16(self._memory_tokens[0]) if reference else self._memory_tokens[0]
        self._memory_on_device = device_tokens.to(device, dtype)
        self._relevance_direction = num.relevance_direction(yes_no_rows, self.numerics).to(device)
        self._numerics_hooks = num.install_reference_numerics(model) if reference else None
        self._yes_no_rows = yes_no_rows.detach().to("cpu", torch.float32).clone()
        config = model.config
        self._video_token_id = int(config.video_token_id)
        self._image_token_id = int(config.image_token_id)
        pad = getattr(config.text_config, "pad_token_id", None)
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if pad in (self._video_token_id, self._image_token_id):
            pad = 0
        self._placeholder_id = int(pad)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        svlm_path: str | os.PathLike,
        *,
        memory_tokens: str | os.PathLike | None = None,
        seed: int = 0,
        num_memory_tokens: int = DEFAULT_NUM_MEMORY_TOKENS,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
        tempo_svlm_weights: bool = True,
        reference_geometry: bool = True,
        numerics: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Compressor:
        """Load the base SVLM and the memory tokens (local paths or fsspec URLs).

        Args:
            svlm_path: base Qwen3-VL directory (config, safetensors, tokenizer).
            memory_tokens: a Tempo-6B-layout checkpoint or our compressor checkpoint; None →
                fresh tokens from the embedding table's per-dimension mean/std (``seed``,
                ``num_memory_tokens``).
            tempo_svlm_weights: for a Tempo checkpoint, replace the SVLM's ``model.visual.*`` and
                ``model.language_model.*`` weights by the checkpoint's fine-tuned ones (strict
                name/shape checks); the Yes/No LM-head rows always come from the base SVLM.
            device, dtype: default CUDA + bf16 when available, else CPU + float32 (dtype may be
                a string such as ``"bfloat16"``).
            max_batch_tokens: see the class docstring; None → ``DEFAULT_MAX_BATCH_TOKENS``.
            numerics: ``"reference"`` (default when the dtype is bf16) or ``"exact"`` (default
                otherwise); see ``tempo_ops.numerics``. In reference numerics every weight
                (SVLM, fine-tuned SVLM weights, memory tokens, Yes/No rows) passes through
                float16 on load before the cast to ``dtype``.
        """
        dev, dt = resolve_device_dtype(device, dtype)
        mode = num.resolve_numerics(numerics, dt)
        if max_batch_tokens is None:
            max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS
        # Reference numerics: load in float16 (the fp16 pass), cast to the run dtype below.
        load_dtype = torch.float16 if mode == num.REFERENCE else dt
        loaded = checkpoints.load_svlm(svlm_path, device=dev, dtype=load_dtype, storage_options=storage_options)
        model = loaded.model
        hidden = loaded.hidden_size
        digests = dict(loaded.weight_digests)
        if memory_tokens is None:
            tokens = checkpoints.init_memory_tokens(model.get_input_embeddings().weight, num_memory_tokens, seed)
            source = f"init:seed={int(seed)}"
        else:
            shapes = None
            if tempo_svlm_weights:
                shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            state = model.state_dict()
            item = os.fspath(memory_tokens)
            mem = checkpoints.load_memory_tokens(
                memory_tokens,
                hidden_size=hidden,
                svlm_state_shapes=shapes,
                # installed as read, one tensor at a time: never a second copy of the SVLM
                weight_sink=lambda name, tensor: _install_one(state, name, tensor, item=item),
                storage_options=storage_options,
            )
            del state
            tokens, source = mem.tokens, mem.source
            if mem.svlm_weight_digests:
                digests.update(mem.svlm_weight_digests)
                source += "+svlm"
        if load_dtype != dt:
            model.to(dt)  # rope inv_freq buffers are float32 until here: rounded once, to bf16, by the hooks
        return cls(
            model,
            loaded.tokenizer,
            tokens,
            loaded.yes_no_rows,
            svlm_name=loaded.name,
            svlm_weights_sha256=checkpoints.combine_tensor_digests(digests),
            memory_tokens_source=source,
            device=dev,
            dtype=dt,
            max_batch_tokens=max_batch_tokens,
            reference_geometry=reference_geometry,
            numerics=mode,
            svlm_location=loaded.location,
            memory_tokens_location=None if memory_tokens is None else os.fspath(memory_tokens),
        )

    def save_pretrained(self, path: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Write our compressor checkpoint (``compressor_config.json`` + ``memory_tokens.safetensors``).

        Only the memory tokens and a reference to the SVLM (name + weights hash) are stored; a
        compressor whose SVLM weights came from a Tempo checkpoint must be rebuilt from that
        checkpoint to get the same SVLM (the config records the source).
        """
        checkpoints.save_compressor_checkpoint(
            path,
            self._memory_tokens,
            source=self.memory_tokens_source,
            svlm_name=self.svlm_name,
            svlm_weights_sha256=self.svlm_weights_sha256,
            extra={
                "svlm_location": self.svlm_location,
                "memory_tokens_location": self.memory_tokens_location,
                "reference_geometry": self.reference_geometry,
                "numerics": self.numerics,
            },
            storage_options=storage_options,
        )

    # ------------------------------------------------------------------ properties
    @property
    def num_memory_tokens(self) -> int:
        """K."""
        return int(self._memory_tokens.shape[1])

    @property
    def hidden_size(self) -> int:
        """D (SVLM hidden size)."""
        return int(self._memory_tokens.shape[2])

    @property
    def memory_tokens(self) -> torch.Tensor:
        """``(1, K, D) float32`` CPU copy of the memory tokens."""
        return self._memory_tokens.clone()

    @property
    def yes_no_rows(self) -> torch.Tensor:
        """``(2, D) float32`` base LM-head rows of "Yes" and "No"."""
        return self._yes_no_rows.clone()

    def fingerprint(self) -> dict[str, Any]:
        """What determines the candidates (JSON-able), for the cache's config check."""
        return {
            "svlm_name": self.svlm_name,
            "svlm_weights_sha256": self.svlm_weights_sha256,
            "memory_tokens_source": self.memory_tokens_source,
            "memory_tokens_sha256": checkpoints.tensor_sha256(self._memory_tokens),
            "prompt_sha256": svlm_prompt.prompt_sha256(),
            "num_memory_tokens": self.num_memory_tokens,
            "hidden_size": self.hidden_size,
            "reference_geometry": self.reference_geometry,
            "numerics": self.numerics,
        }

    # ------------------------------------------------------------------ inputs
    def _prepare_segment(self, segment: Any, i: int) -> _Prepared:
        from tempo_ops.svlm.vision_inputs import frames_to_video_inputs

        label = _segment_label(segment, i)
        frames = getattr(segment, "frames", None)
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
            raise InvalidSegment(f"frames must be a (T, H, W, 3) uint8 array, got {desc}", item=label)
        if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
            raise InvalidSegment(f"frames must not be empty, got shape {frames.shape}", item=label)
        start = getattr(segment, "start_position", None)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise InvalidSegment(f"start_position must be an integer >= 0, got {start!r}", item=label)
        fps = getattr(segment, "real_fps", None)
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.floating)) or not math.isfinite(fps) or fps <= 0:
            raise InvalidSegment(f"real_fps must be a positive finite number, got {fps!r}", item=label)
        try:
            vi = frames_to_video_inputs(frames, reference_geometry=self.reference_geometry)
            prefix = svlm_prompt.build_prefix_ids(self.tokenizer, vi.video_grid_thw, int(start), float(fps))
        except TempoError as exc:
            item = f"{label}: {exc.item}" if exc.item else label
            try:  # keep the specific error type (InvalidFrames, AbsurdDimensions...), naming the segment
                renamed = type(exc)(exc.reason, item=item)
            except TypeError:
                renamed = InvalidSegment(exc.reason, item=item)
            raise renamed from exc
        pixels = torch.as_tensor(np.asarray(vi.pixel_values_videos), dtype=torch.float32)
        grid = torch.as_tensor(np.asarray(vi.video_grid_thw), dtype=torch.int64).reshape(1, 3)
        return _Prepared(
            label=label,
            input_ids=torch.as_tensor(prefix.input_ids, dtype=torch.int64).reshape(-1),
            mm_token_type_ids=torch.as_tensor(prefix.mm_token_type_ids, dtype=torch.int64).reshape(-1),
            pixel_values=pixels,
            grid=grid,
        )

    def _suffix_ids(self, queries: Sequence[str]) -> list[torch.Tensor]:
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise InvalidQuery("queries must be a sequence of strings", item=repr(queries)[:60])
        if len(queries) == 0:
            raise InvalidQuery("at least one query is needed", item="queries")
        out = []
        for qi, query in enumerate(queries):
            if not isinstance(query, str):
                raise InvalidQuery(f"query must be a string, got {type(query).__name__}", item=f"queries[{qi}]")
            ids = torch.as_tensor(svlm_prompt.build_suffix_ids(self.tokenizer, query), dtype=torch.int64).reshape(-1)
            if ids.numel() == 0:
                raise InvalidQuery("query suffix tokenised to nothing", item=f"queries[{qi}]")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ model pieces
    @property
    def _inner(self) -> Any:
        return self.model.model

    def _vision(self, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Vision encoder over the videos of ``grid`` ``(G, 3)``: per video the merged tokens
        ``(N_g, D)`` and the DeepStack features ``(L, N_g, D)`` (model dtype, on the device)."""
        vision = self._inner.get_video_features(pixels.to(self.device, self.dtype), grid, return_dict=True)
        visual = [v.to(self.dtype) for v in vision.pooler_output]
        layers = list(vision.deepstack_features or [])
        deepstack = [
            torch.stack([layer[g] for layer in layers]).to(self.dtype) if layers else visual[g].new_zeros((0, *visual[g].shape))
            for g in range(len(visual))
        ]
        return visual, deepstack

    def _embed_features(
        self, input_ids: torch.Tensor, visual: Sequence[torch.Tensor], deepstack: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Token embeddings ``(B, L, D)`` with the merged visual tokens scattered at video tokens.

        ``visual``/``deepstack``: per video, in row order, ``(N_g, D)`` / ``(L, N_g, D)``.
        Returns (embeds, visual mask ``(B, L) bool``, DeepStack features ``[(ΣN_g, D)]`` per layer).
        """
        embeds = self._inner.get_input_embeddings()(input_ids)
        video_embeds = torch.cat([v.to(self.device, embeds.dtype) for v in visual], dim=0)
        mask = input_ids == self._video_token_id
        if int(mask.sum()) != video_embeds.shape[0]:
            raise InferenceError(
                f"{int(mask.sum())} video tokens in the prompt but {video_embeds.shape[0]} visual features"
            )
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), video_embeds)
        layers = deepstack[0].shape[0] if deepstack else 0
        ds = [torch.cat([f[i].to(self.device, embeds.dtype) for f in deepstack], dim=0) for i in range(layers)]
        return embeds, mask, ds

    def _read_outputs(self, hidden: torch.Tensor, lens: Sequence[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates ``(R, K, D)`` at the memory positions right after each row's last real token
        (``lens[r] - 1``) and relevance ``(R,)`` from that last real token's hidden state."""
        rows_idx = torch.arange(hidden.shape[0], device=self.device)
        last = torch.tensor([n - 1 for n in lens], device=self.device)
        relevance = self._relevance(hidden[rows_idx, last])
        candidates = hidden[rows_idx[:, None], last[:, None] + 1 + torch.arange(k, device=self.device)]
        return candidates.float().cpu(), relevance.cpu()

    def _relevance(self, h: torch.Tensor) -> torch.Tensor:
        """``sigmoid((w_Yes − w_No) · h)`` in float32; ``h`` ``(R, D)`` → ``(R,)``."""
        return torch.sigmoid(h.float() @ self._relevance_direction)

    def _run_prefix(self, batch: list[SegmentFeatures]) -> _PrefixState:
        from transformers import DynamicCache

        inner = self._inner
        ids = torch.stack([f.input_ids for f in batch]).to(self.device)
        mm = torch.stack([f.mm_token_type_ids for f in batch]).to(self.device)
        grid = torch.stack([f.grid.reshape(3) for f in batch]).to(self.device)
        embeds, visual_mask, deepstack = self._embed_features(ids, [f.visual for f in batch], [f.deepstack for f in batch])
        position_ids, deltas = inner.get_rope_index(ids, mm, video_grid_thw=grid)
        cache = DynamicCache(config=self.model.config.text_config)
        inner.language_model(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            visual_pos_masks=visual_mask,
            deepstack_visual_embeds=deepstack,
        )
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        length = ids.shape[1]
        return _PrefixState(length=length, kv=kv, next_position=(deltas.reshape(-1) + length).to(torch.int64))

    def _run_suffix(
        self, state: _PrefixState, rows: list[tuple[int, int]], suffixes: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Suffix + memory tokens of ``rows`` ((prefix index g, query index q)) against the prefix cache.

        Returns candidates ``(R, K, D) float32`` and relevance ``(R,) float32`` (CPU).
        """
        from transformers import DynamicCache

        k = self.num_memory_tokens
        lens = [int(suffixes[q].numel()) for _, q in rows]
        width = max(lens) + k
        r = len(rows)
        ids = torch.full((r, width), self._placeholder_id, dtype=torch.int64)
        for i, (_, q) in enumerate(rows):
            ids[i, : lens[i]] = suffixes[q]
        ids = ids.to(self.device)
        embeds = self._inner.get_input_embeddings()(ids)
        attention = torch.zeros((r, state.length + width), dtype=torch.int64)
        attention[:, : state.length] = 1
        for i, n in enumerate(lens):
            embeds[i, n : n + k] = self._memory_on_device
            attention[i, state.length : state.length + n + k] = 1
        g_index = torch.tensor([g for g, _ in rows], dtype=torch.int64, device=self.device)
        positions = state.next_position.to(self.device)[g_index, None] + torch.arange(width, device=self.device)
        positions = positions.unsqueeze(0).expand(3, -1, -1)
        cache = DynamicCache(
            ddp_cache_data=[(key.index_select(0, g_index), val.index_select(0, g_index)) for key, val in state.kv],
            config=self.model.config.text_config,
        )
        out = self._inner.language_model(
            inputs_embeds=embeds,
            attention_mask=attention.to(self.device),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return self._read_outputs(out.last_hidden_state, lens, k)

    # ------------------------------------------------------------------ batching
    def _prefix_batches(self, prepared: Sequence[_Prepared | SegmentFeatures]) -> list[list[int]]:
        """Segment indices grouped by prefix length, chunked so that G·P ≤ max_batch_tokens."""
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prepared):
            by_length.setdefault(int(p.input_ids.numel()), []).append(i)
        batches = []
        for length in sorted(by_length):
            per_batch = max(1, self.max_batch_tokens // length)
            idx = by_length[length]
            batches.extend(idx[j : j + per_batch] for j in range(0, len(idx), per_batch))
        return batches

    def _cost_chunks(self, costs: list[int]) -> list[list[int]]:
        """Consecutive index chunks whose Σcost ≤ max_batch_tokens (at least one index each)."""
        return consecutive_chunks(costs, self.max_batch_tokens)

    # ------------------------------------------------------------------ public API
    def compress(self, segments: Sequence[Any], queries: Sequence[str]) -> CompressionResult:
        """Candidates and relevance of every segment for every query (shared-prefix path).

        Equal to ``compress_from_features(encode_segments(segments), queries)`` — that is how it
        is computed.

        Args:
            segments: objects with ``.frames (T, H, W, 3) uint8``, ``.start_position`` (sampled-frame
                offset of the segment) and ``.real_fps`` (e.g. ``tempo_ops.video.Segment``).
            queries: query texts (empty → ``"Describe this content."``).
        Returns:
            ``CompressionResult(candidates (Q, S, K, D) float32, relevance (Q, S) float32)``.
        Raises:
            InvalidSegment / InvalidQuery: bad inputs; InferenceError: the model failed on a batch.
        """
        self._suffix_ids(queries)  # bad queries fail before the vision encoder runs
        return self.compress_from_features(self.encode_segments(segments), queries)

    def encode_segments(self, segments: Sequence[Any]) -> list[SegmentFeatures]:
        """The query-independent half: frames → prefix ids, grid, merged visual tokens, DeepStack features.

        Args:
            segments: as for ``compress``.
        Returns:
            One ``SegmentFeatures`` per segment (tensors on the model's device, model dtype).
        Raises:
            InvalidSegment: bad frames / start / fps; InferenceError: the vision encoder failed.
        """
        prepared = [self._prepare_segment(s, i) for i, s in enumerate(segments)]
        out: list[SegmentFeatures | None] = [None] * len(prepared)
        with torch.inference_mode():
            for batch in self._prefix_batches(prepared):
                labels = ", ".join(prepared[i].label for i in batch)
                try:
                    pixels = torch.cat([prepared[i].pixel_values for i in batch])
                    grid = torch.cat([prepared[i].grid for i in batch]).to(self.device)
                    visual, deepstack = self._vision(pixels, grid)
                except (RuntimeError, ValueError, IndexError) as exc:
                    raise InferenceError(f"SVLM vision encoder failed: {exc}", item=labels) from exc
                for j, i in enumerate(batch):
                    p = prepared[i]
                    n_video = int((p.input_ids == self._video_token_id).sum())
                    if visual[j].shape[0] != n_video or deepstack[j].shape[1] != n_video:
                        raise InferenceError(
                            f"{n_video} video tokens in the prompt but {visual[j].shape[0]} visual features", item=p.label
                        )
                    out[i] = SegmentFeatures(
                        input_ids=p.input_ids,
                        mm_token_type_ids=p.mm_token_type_ids,
                        grid=p.grid.reshape(3),
                        visual=visual[j],
                        deepstack=deepstack[j],
                        start_position=int(segments[i].start_position),
                        label=p.label,
                    )
        return [f for f in out if f is not None]

    def compress_from_features(self, features: Sequence[SegmentFeatures], queries: Sequence[str]) -> CompressionResult:
        """The query-dependent half: only the language model over [prefix + query + memory tokens].

        Args:
            features: ``SegmentFeatures`` from ``encode_segments`` or read back from an index
                (any device/dtype; cast to the model's).
            queries: query texts (empty → ``"Describe this content."``).
        Returns:
            ``CompressionResult(candidates (Q, S, K, D) float32, relevance (Q, S) float32)``.
        Raises:
            InvalidSegment: features of the wrong shape; InvalidQuery; InferenceError: the model failed.
        """
        features = [self._check_features(f, i) for i, f in enumerate(features)]
        suffixes = self._suffix_ids(queries)
        q_count, s_count, k, d = len(suffixes), len(features), self.num_memory_tokens, self.hidden_size
        candidates = np.zeros((q_count, s_count, k, d), dtype=np.float32)
        relevance = np.zeros((q_count, s_count), dtype=np.float32)
        with torch.inference_mode():
            for batch in self._prefix_batches(features):
                labels = ", ".join(features[i].label for i in batch)
                try:
                    state = self._run_prefix([features[i] for i in batch])
                    rows = [(g, q) for g in range(len(batch)) for q in range(q_count)]
                    costs = [state.length + int(suffixes[q].numel()) + k for _, q in rows]
                    for chunk in self._cost_chunks(costs):
                        chunk_rows = [rows[j] for j in chunk]
                        cand, rel = self._run_suffix(state, chunk_rows, suffixes)
                        for j, (g, q) in enumerate(chunk_rows):
                            candidates[q, batch[g]] = cand[j].numpy()
                            relevance[q, batch[g]] = float(rel[j])
                except TempoError as exc:
                    raise InferenceError(exc.reason, item=labels) from exc
                except (RuntimeError, ValueError, IndexError) as exc:
                    raise InferenceError(f"SVLM forward pass failed: {exc}", item=labels) from exc
        self._check_outputs(candidates, relevance)
        return CompressionResult(candidates=candidates, relevance=relevance)

    def _check_features(self, f: Any, i: int) -> SegmentFeatures:
        """Validate one ``SegmentFeatures`` (shapes consistent with each other and with D)."""
        label = getattr(f, "label", None) or f"segment {i}"
        if not isinstance(f, SegmentFeatures):
            raise InvalidSegment(f"expected SegmentFeatures, got {type(f).__name__}", item=label)
        p = f.input_ids.numel()
        n = int((f.input_ids == self._video_token_id).sum())
        d = self.hidden_size
        if f.input_ids.ndim != 1 or tuple(f.mm_token_type_ids.shape) != (p,) or f.grid.numel() != 3:
            raise InvalidSegment("input_ids / mm_token_type_ids / grid shapes disagree", item=label)
        if tuple(f.visual.shape) != (n, d) or f.deepstack.ndim != 3 or tuple(f.deepstack.shape[1:]) != (n, d):
            raise InvalidSegment(
                f"visual {tuple(f.visual.shape)} / deepstack {tuple(f.deepstack.shape)} do not match {n} video tokens x D={d}",
                item=label,
            )
        return f

    def compress_unshared(self, segments: Sequence[Any], queries: Sequence[str]) -> CompressionResult:
        """Same result as ``compress``, computed the reference way: every (query, segment) sequence
        ``[prefix][suffix][memory]`` runs in full, vision encoder included (rows right-padded and
        batched by cost). For verification and benchmarks; ``compress`` is faster.
        """
        segments = list(segments)
        suffixes = self._suffix_ids(queries)
        prepared = [self._prepare_segment(s, i) for i, s in enumerate(segments)]
        q_count, s_count, k, d = len(suffixes), len(prepared), self.num_memory_tokens, self.hidden_size
        candidates = np.zeros((q_count, s_count, k, d), dtype=np.float32)
        relevance = np.zeros((q_count, s_count), dtype=np.float32)
        rows = [(s, q) for s in range(s_count) for q in range(q_count)]
        costs = [int(prepared[s].input_ids.numel() + suffixes[q].numel()) + k for s, q in rows]
        with torch.inference_mode():
            for chunk in self._cost_chunks(costs):
                chunk_rows = [rows[j] for j in chunk]
                labels = ", ".join(sorted({prepared[s].label for s, _ in chunk_rows}))
                try:
                    cand, rel = self._run_full([prepared[s] for s, _ in chunk_rows], [suffixes[q] for _, q in chunk_rows])
                except TempoError as exc:
                    raise InferenceError(exc.reason, item=labels) from exc
                except (RuntimeError, ValueError, IndexError) as exc:
                    raise InferenceError(f"SVLM forward pass failed: {exc}", item=labels) from exc
                for j, (s, q) in enumerate(chunk_rows):
                    candidates[q, s] = cand[j].numpy()
                    relevance[q, s] = float(rel[j])
        self._check_outputs(candidates, relevance)
        return CompressionResult(candidates=candidates, relevance=relevance)

    def _run_full(self, prefixes: list[_Prepared], suffixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full sequences ``[prefix][suffix][K memory]`` (one per row), right-padded, one forward pass."""
        k = self.num_memory_tokens
        seqs = [torch.cat([p.input_ids, s]) for p, s in zip(prefixes, suffixes)]
        lens = [int(x.numel()) for x in seqs]
        width = max(lens) + k
        r = len(seqs)
        ids = torch.full((r, width), self._placeholder_id, dtype=torch.int64)
        mm = torch.zeros((r, width), dtype=torch.int64)
        attention = torch.zeros((r, width), dtype=torch.int64)
        for i, (p, seq) in enumerate(zip(prefixes, seqs)):
            ids[i, : lens[i]] = seq
            mm[i, : p.mm_token_type_ids.numel()] = p.mm_token_type_ids
            attention[i, : lens[i] + k] = 1
        ids, mm, attention = ids.to(self.device), mm.to(self.device), attention.to(self.device)
        grid = torch.cat([p.grid for p in prefixes]).to(self.device)
        visual, per_video_deepstack = self._vision(torch.cat([p.pixel_values for p in prefixes]), grid)
        embeds, visual_mask, deepstack = self._embed_features(ids, visual, per_video_deepstack)
        for i, n in enumerate(lens):
            embeds[i, n : n + k] = self._memory_on_device
        # Memory positions hold placeholder *text* ids, so get_rope_index continues text positions there.
        position_ids, _ = self._inner.get_rope_index(ids, mm, video_grid_thw=grid, attention_mask=attention)
        out = self._inner.language_model(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=position_ids,
            use_cache=False,
            visual_pos_masks=visual_mask,
            deepstack_visual_embeds=deepstack,
        )
        return self._read_outputs(out.last_hidden_state, lens, k)

    @staticmethod
    def _check_outputs(candidates: np.ndarray, relevance: np.ndarray) -> None:
        if not np.isfinite(candidates).all() or not np.isfinite(relevance).all():
            bad = np.argwhere(~np.isfinite(relevance)) if not np.isfinite(relevance).all() else None
            raise InferenceError(
                "SVLM produced NaN or infinite values" + (f" (relevance at (query, segment) {bad[0].tolist()})" if bad is not None else ""),
                item="compress",
            )


def _install_one(state: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor, *, item: str) -> None:
    """Copy one tensor into the model tensor ``state[name]`` in place (strict on name and shape)."""
    target = state.get(name)
    if target is None:
        raise CheckpointFormatError(f"tensor {name} is unknown to the SVLM", item=item)
    if tuple(target.shape) != tuple(tensor.shape):
        raise CheckpointFormatError(f"{name} has shape {tuple(tensor.shape)}, the SVLM expects {tuple(target.shape)}", item=item)
    with torch.no_grad():
        target.copy_(tensor.to(target.dtype))
