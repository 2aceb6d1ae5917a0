"""The LLM stage's part of a Tempo-6B-layout checkpoint (docs/METHOD.md "Checkpoint layout").

A Tempo checkpoint is one directory (local path or fsspec URL): ``config.json`` (model_type
``tempo_qwen``: a Qwen3 config plus ``mm_*`` fields), safetensors shards listed by
``model.safetensors.index.json`` (or one ``model.safetensors``) and the LLM's tokenizer files.
The LLM stage is the tensors

- ``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*``, ``lm_head.*`` (the Qwen3
  causal LM, names as in ``Qwen3ForCausalLM``; ``lm_head`` may be absent when
  ``tie_word_embeddings`` is true), and
- ``model.mm_projector.*`` (the projector, ``tempo_ops.llm.projector``).

Everything else (``model.vision_tower_aux_list.*``: the compressor) is never read here: only
the shards that hold LLM-stage tensors are opened (or, for a URL, copied).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tempo_ops.errors import CheckpointFormatError
from tempo_ops.llm.projector import PROJECTOR_PREFIX

LLM_PREFIXES: tuple[str, ...] = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
"""Name prefixes of the Qwen3 causal LM's tensors inside a Tempo checkpoint."""
LLM_STAGE_PREFIXES: tuple[str, ...] = (*LLM_PREFIXES, PROJECTOR_PREFIX)
"""Everything the LLM stage reads: the causal LM and the projector."""

TEMPO_MM_FIELDS: tuple[str, ...] = (
    "mm_vision_tower_aux_list",
    "num_compression_tokens",
    "mm_projector_type",
    "mm_hidden_size",
    "visual_token_budget",
    "tokenizer_model_max_length",
)
"""config.json fields a Tempo checkpoint adds to its Qwen3 config."""
INDEX_FILE = "model.safetensors.index.json"
# Config keys that describe the Tempo wrapper rather than the Qwen3 causal LM.
_NOT_QWEN3 = ("model_type", "architectures", "transformers_version", "auto_map", *TEMPO_MM_FIELDS)


def is_llm_stage_key(name: str) -> bool:
    """True for tensors the LLM stage reads (causal LM and projector)."""
    return name.startswith(LLM_STAGE_PREFIXES)


def shard_file_name(i: int, n: int) -> str:
    """The Hugging Face shard name ``model-{i:05d}-of-{n:05d}.safetensors`` (i from 1)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def qwen3_config(tempo_config: Mapping[str, Any], *, item: str) -> Any:
    """The ``Qwen3Config`` of the LLM inside a Tempo config, with rope scaling forced off.

    The reference forces ``rope_scaling`` to None (plain rope with the config's theta); the
    ``mm_*`` fields and the wrapper's model type are dropped.
    """
    from transformers import Qwen3Config

    doc = {k: v for k, v in tempo_config.items() if k not in _NOT_QWEN3}
    rope = doc.pop("rope_parameters", None)
    legacy_theta = doc.pop("rope_theta", None)
    theta = rope.get("rope_theta") if isinstance(rope, dict) and rope.get("rope_theta") is not None else legacy_theta
    doc.pop("rope_scaling", None)
    doc["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta if theta is not None else 1_000_000.0)}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = doc.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointFormatError(f"config.json field {key!r} must be a positive integer, got {value!r}", item=item)
    try:
        return Qwen3Config(**doc)
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"config.json is not a valid Qwen3 config: {exc}", item=item) from exc


def tempo_config_from(qwen3: Any, mm_fields: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a Tempo checkpoint: the Qwen3 config's dict, ``extra`` fields, then the ``mm_*`` fields."""
    doc = qwen3.to_dict()
    doc.pop("transformers_version", None)
    doc.update({k: v for k, v in dict(extra or {}).items() if k not in doc})
    doc.update(dict(mm_fields))
    doc["model_type"] = "tempo_qwen"
    doc["architectures"] = ["TempoQwenForCausalLM"]
    return doc


def split_shards(state: Mapping[str, torch.Tensor], order: Sequence[str], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Cut tensors, in ``order``, into consecutive shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in order:
        t = state[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_safetensors_shards(out_dir: str | os.PathLike, shards: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Write ``shards`` as ``model-*-of-*.safetensors`` + ``model.safetensors.index.json`` into a local directory.

    Returns the index document. Tensors are written contiguous, in their own dtype.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = shard_file_name(i, len(shards))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return index


def llm_stage_keys(weight_map: Mapping[str, str]) -> list[str]:
    """The names in a checkpoint index that belong to the LLM stage, sorted."""
    return sorted(k for k in weight_map if is_llm_stage_key(k))


def shards_for(weight_map: Mapping[str, str], keys: Iterable[str]) -> list[str]:
    """The shard files holding ``keys`` (sorted, unique)."""
    return sorted({weight_map[k] for k in keys})
