"""Tiny random-weight models, built offline, for tests and the demo (docs/METHOD.md, "Environment").

``make_tiny_models(out_dir, seed)`` writes two directories:

- ``svlm/``: a tiny Qwen3-VL (``Qwen3VLForConditionalGeneration``; 2-layer vision tower and
  2-layer text model, hidden 64, patch 16, temporal patch 2, merge 2, DeepStack index [0]) saved
  with ``save_pretrained`` (safetensors), its byte-level BPE tokenizer with the Qwen special
  tokens and the Qwen3-VL chat template, and the processor files Qwen3-VL ships
  (``preprocessor_config.json``, ``video_preprocessor_config.json``), so the real
  ``Qwen3VLProcessor`` loads the directory wherever torchvision exists.
- ``tempo/``: a tiny checkpoint in the released Tempo-6B layout (docs/METHOD.md,
  "Checkpoint layout"): ``config.json`` (model_type ``tempo_qwen``, a Qwen3 config plus the
  ``mm_*`` fields), weights split over two safetensors shards with a
  ``model.safetensors.index.json``, and the tokenizer.

Everything is deterministic for a seed: the same call writes the same weight bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from tempo_ops.errors import ConfigError
from tempo_ops.svlm.tokenizer_build import build_tokenizer, write_tokenizer

SVLM_HIDDEN = 64
TEMPO_LLM_HIDDEN = 96
NUM_COMPRESSION_TOKENS = 128
VISUAL_TOKEN_BUDGET = 8192
TOKENIZER_MODEL_MAX_LENGTH = 16384
SVLM_DIRNAME = "svlm"
TEMPO_DIRNAME = "tempo"
# The Tempo checkpoint refers to its base SVLM by this path, relative to the Tempo directory.
TEMPO_SVLM_REF = f"../{SVLM_DIRNAME}"

TEMPO_PREFIX_SVLM = "model.vision_tower_aux_list.0.vlm."
TEMPO_KEY_COMPRESSION_TOKENS = "model.vision_tower_aux_list.0.compression_tokens"

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
"""``preprocessor_config.json`` as Qwen3-VL ships it (image processor)."""

VIDEO_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}
"""``video_preprocessor_config.json`` as Qwen3-VL ships it (video processor)."""


def tiny_svlm_config(tokenizer: Any) -> Any:
    """A tiny ``Qwen3VLConfig`` whose vocabulary and special ids match ``tokenizer`` (a ``tokenizers.Tokenizer``)."""
    from transformers import Qwen3VLConfig

    def tid(token: str) -> int:
        value = tokenizer.token_to_id(token)
        if value is None:
            raise ConfigError(f"tokenizer lacks {token!r}", item="tiny svlm")
        return int(value)

    head_dim = 16
    text_config = {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "hidden_size": SVLM_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            # sums to head_dim / 2, as Qwen3-VL's [24, 20, 20] does for head_dim 128
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": SVLM_HIDDEN,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [0],
        "hidden_act": "gelu_pytorch_tanh",
    }
    cfg = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    cfg.bos_token_id = text_config["bos_token_id"]
    cfg.eos_token_id = text_config["eos_token_id"]
    cfg.pad_token_id = text_config["pad_token_id"]
    cfg.dtype = "float32"
    return cfg


def tiny_llm_config(tokenizer: Any) -> Any:
    """A tiny ``Qwen3Config`` for the Tempo LLM stage (hidden 96, 2 layers)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        hidden_size=TEMPO_LLM_HIDDEN,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=int(tokenizer.token_to_id("<|endoftext|>")),
        eos_token_id=int(tokenizer.token_to_id("<|im_end|>")),
        pad_token_id=int(tokenizer.token_to_id("<|endoftext|>")),
        dtype="float32",
    )


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_svlm(out_dir: str | Path, seed: int = 0, tokenizer: Any = None) -> Path:
    """Build and save the tiny Qwen3-VL (weights, config, tokenizer, processor files) into ``out_dir``."""
    from transformers import Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    cfg = tiny_svlm_config(tok)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    write_processor_files(out, tok)
    return out


def write_processor_files(out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write the tiny SVLM's processor files only (tokenizer, chat template, image and video
    processor configs) into ``out_dir``: enough for ``AutoProcessor.from_pretrained`` under any
    transformers version (the parity tests load them with the reference's 4.57)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, tokenizer if tokenizer is not None else build_tokenizer())
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(out / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG)
    return out


def _tempo_shards(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Three shards, as a released checkpoint mixes them: (1) the causal LM, (2) the projector,
    the compression tokens and the SVLM's vision tower, (3) the SVLM's language model.

    So the LLM stage needs shards 1 and 2 only, and the compressor shards 2 and 3.
    """
    from tempo_ops.llm.checkpoint import LLM_PREFIXES

    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for k in sorted(state):
        if k.startswith(LLM_PREFIXES):
            shards[0][k] = state[k]
        elif k.startswith(TEMPO_PREFIX_SVLM + "model.language_model."):
            shards[2][k] = state[k]
        else:
            shards[1][k] = state[k]
    return shards


def build_tiny_tempo(
    out_dir: str | Path,
    svlm_dir: str | Path,
    seed: int = 0,
    tokenizer: Any = None,
    *,
    projector_type: str = "linear",
) -> Path:
    """Build the tiny Tempo-6B-layout checkpoint from the tiny SVLM in ``svlm_dir``.

    Weights: ``model.vision_tower_aux_list.0.compression_tokens`` ``(1, 128, 64)`` (normal with the
    per-dimension mean/std of the SVLM's embedding table), the SVLM without its LM head under
    ``model.vision_tower_aux_list.0.vlm.``, ``model.mm_projector.*`` (``projector_type``: ``linear``
    64→96 by default, ``mlp{N}x_gelu``, or ``identity`` which needs equal widths) and a tiny Qwen3
    LLM (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``), in three shards
    (``_tempo_shards``) with ``model.safetensors.index.json``.
    """
    from safetensors.torch import load_file
    from transformers import Qwen3ForCausalLM

    from tempo_ops.llm.checkpoint import tempo_config_from, write_safetensors_shards
    from tempo_ops.llm.projector import PROJECTOR_PREFIX, build_projector

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    svlm_dir = Path(svlm_dir)
    svlm_files = sorted(svlm_dir.glob("*.safetensors"))
    if not svlm_files:
        raise ConfigError("no safetensors weights found", item=str(svlm_dir))
    svlm_state: dict[str, torch.Tensor] = {}
    for f in svlm_files:
        svlm_state.update(load_file(str(f)))

    gen = torch.Generator().manual_seed(seed + 1)
    embed = svlm_state["model.language_model.embed_tokens.weight"].float()
    mean, std = embed.mean(dim=0), embed.std(dim=0)
    compression = (torch.randn((1, NUM_COMPRESSION_TOKENS, embed.shape[1]), generator=gen) * std + mean).contiguous()

    llm_cfg = tiny_llm_config(tok)
    torch.manual_seed(seed + 2)
    llm = Qwen3ForCausalLM(llm_cfg).to(torch.float32)
    projector = build_projector(projector_type, SVLM_HIDDEN, TEMPO_LLM_HIDDEN, item="tiny tempo")
    with torch.no_grad():  # uniform(±1/sqrt(fan_in)) like nn.Linear, but from the seeded generator
        for layer in [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]:
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)

    state: dict[str, torch.Tensor] = {TEMPO_KEY_COMPRESSION_TOKENS: compression}
    for k, v in svlm_state.items():
        if k.startswith("lm_head."):
            continue
        state[TEMPO_PREFIX_SVLM + k] = v.contiguous()
    for k, v in projector.state_dict().items():
        state[PROJECTOR_PREFIX + k] = v.detach().contiguous()
    for k, v in llm.state_dict().items():
        state[k] = v.detach().clone().contiguous()

    write_safetensors_shards(out, _tempo_shards(state))

    mm_fields = {
        "mm_vision_tower_aux_list": [TEMPO_SVLM_REF],
        "num_compression_tokens": NUM_COMPRESSION_TOKENS,
        "mm_projector_type": projector_type,
        "mm_hidden_size": SVLM_HIDDEN,
        "visual_token_budget": VISUAL_TOKEN_BUDGET,
        "tokenizer_model_max_length": TOKENIZER_MODEL_MAX_LENGTH,
    }
    config = tempo_config_from(llm_cfg, mm_fields)
    _write_json(out / "config.json", config)
    write_tokenizer(out, tok)
    return out


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Build the tiny SVLM and the tiny Tempo checkpoint under ``out_dir``, offline.

    Args:
        out_dir: directory to create/fill; gets ``svlm/`` and ``tempo/``.
        seed: RNG seed; the same seed writes the same weight bytes.
    Returns:
        ``{"svlm": path, "tempo": path}`` (strings).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}", item="make_tiny_models")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output path exists and is not a directory", item=str(out))
    tok = build_tokenizer()
    svlm = build_tiny_svlm(out / SVLM_DIRNAME, seed=seed, tokenizer=tok)
    tempo = build_tiny_tempo(out / TEMPO_DIRNAME, svlm, seed=seed, tokenizer=tok)
    return {"svlm": str(svlm), "tempo": str(tempo)}
