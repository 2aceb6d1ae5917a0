"""Random-weight models with the released architectures' exact configurations (real shapes).

``tempo make-random-models --preset NAME DIR`` writes, on demand and never into the repository:

- ``qwen3-vl-2b``: ``DIR/svlm`` in the layout of ``Qwen/Qwen3-VL-2B-Instruct`` — its published
  ``config.json`` (below), one ``model.safetensors`` (bf16, tied LM head not stored, as released),
  the processor files and a tokenizer whose special tokens sit at the released ids.
- ``tempo-6b``: the above plus ``DIR/tempo`` in the Tempo-6B layout (docs/METHOD.md, "Checkpoint
  layout"): ``config.json`` (``tempo_qwen`` = the published ``Qwen/Qwen3-4B`` config plus the
  ``mm_*`` fields), the compression tokens ``(1, 128, 2048)``, the SVLM without its LM head, the
  projector 2048 → 2560 and the Qwen3-4B LLM, in bf16 safetensors shards with an index.

Where the values come from (checked 2026-12-02 with the project's public-source search; the
Hugging Face repositories themselves cannot be reached from here):

- Qwen3-VL-2B-Instruct ``config.json``: every value of ``QWEN3_VL_2B_CONFIG`` agrees with
  several independent public copies of that file (e.g. Rust/C++ test fixtures that embed it:
  text hidden 2048, 28 layers, intermediate 6144, 16 heads / 8 KV heads, head_dim 128, rope
  theta 5e6, mrope_section [24, 20, 20] interleaved, max positions 262144, tied embeddings,
  vocab 151936; vision depth 24, hidden 1024, intermediate 4096, 16 heads, patch 16, temporal
  patch 2, merge 2, out_hidden_size 2048, 2304 position embeddings, DeepStack [5, 11, 17]; token
  ids 151643/151645/151652/151653/151655/151656). The model page lists ``model.safetensors``
  of 4.26 GB, i.e. ~2.13 B bf16 parameters with the tied LM head stored once — what this writes.
- Qwen3-4B ``config.json``: ``QWEN3_4B_CONFIG`` agrees with public copies (hidden 2560, 36 layers,
  intermediate 9728, 32 / 8 heads, head_dim 128, max positions 40960, rope theta 1e6,
  ``rope_scaling`` null, rms eps 1e-6, tied embeddings, vocab 151936; the model card: 4.0 B
  parameters, 36 layers, GQA 32 Q / 8 KV).
- Tempo-6B: its ``config.json`` is **not** in any public source we can reach. The ``mm_*`` field
  names, K = 128, ``mm_hidden_size`` 2048 and D_llm = 2560 come from the method description
  (docs/METHOD.md, "LLM stage" and "Checkpoint layout"). Not confirmed, and chosen here: ``mm_projector_type`` (default
  ``"mlp2x_gelu"``, the LLaVA-family default; ``--projector linear`` for the other layout),
  ``visual_token_budget`` 8192, ``tokenizer_model_max_length`` 32768, the number of shards, and
  whether ``lm_head`` is stored separately (the layout lists ``lm_head``, so it is stored and
  the config says ``tie_word_embeddings: false``).

Weights are normal(0, 0.02) (``initializer_range``), norm weights 1, biases 0, compression tokens
N(mean, std) of the embedding table per dimension — deterministic per (seed, tensor name).
Generation never holds two copies: the model is built on the ``meta`` device for names and
shapes only, and each tensor is generated, written into its safetensors file and dropped
(peak ≈ the largest tensor, the 151936 × 2560 embedding table: 778 MB).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tempo_ops.errors import ConfigError

QWEN3_VL_2B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": True,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}
"""``config.json`` of Qwen/Qwen3-VL-2B-Instruct as published (sources: module docstring)."""

QWEN3_4B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
"""``config.json`` of Qwen/Qwen3-4B as published (sources: module docstring)."""

TEMPO_NUM_COMPRESSION_TOKENS = 128
TEMPO_MM_HIDDEN_SIZE = 2048
TEMPO_PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
TEMPO_VISUAL_TOKEN_BUDGET = 8192  # not confirmed publicly
TEMPO_TOKENIZER_MODEL_MAX_LENGTH = 32768  # not confirmed publicly; the evaluation overrides it anyway
PRESETS = ("qwen3-vl-2b", "tempo-6b")
SVLM_DIRNAME = "svlm"
TEMPO_DIRNAME = "tempo"
MAX_SHARD_BYTES = 4 * 1024**3
"""Shard size of the Tempo checkpoint (its real shard count is not public)."""

_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# --------------------------------------------------------------------------- configs
def svlm_config(*, text_layers: int | None = None, vision_depth: int | None = None, compact_vocab: bool = False) -> dict[str, Any]:
    """The Qwen3-VL-2B-Instruct config, optionally with fewer layers / the compact test vocabulary.

    Widths, heads and rope are never changed. With fewer vision blocks than the published
    DeepStack indexes need, the indexes become the first ``min(3, depth)`` blocks.
    ``compact_vocab``: the vocabulary of the compact test tokenizer (~1.1K entries, special
    tokens right after the learned ones) instead of 151936, with the token ids moved to match —
    for cheap tests only; the published ids need the full vocabulary.
    """
    cfg = copy.deepcopy(QWEN3_VL_2B_CONFIG)
    if text_layers is not None:
        cfg["text_config"]["num_hidden_layers"] = _positive(text_layers, "text_layers")
    if vision_depth is not None:
        depth = _positive(vision_depth, "vision_depth")
        cfg["vision_config"]["depth"] = depth
        published = QWEN3_VL_2B_CONFIG["vision_config"]["deepstack_visual_indexes"]
        if max(published) >= depth:
            cfg["vision_config"]["deepstack_visual_indexes"] = list(range(min(len(published), depth)))
    if compact_vocab:
        from tempo_ops.svlm.tokenizer_build import build_tokenizer

        tok = build_tokenizer()
        cfg["text_config"]["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
        ids = {
            "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
        }
        for key, token in ids.items():
            cfg[key] = tok.token_to_id(token)
        cfg["text_config"]["bos_token_id"] = tok.token_to_id("<|endoftext|>")
        cfg["text_config"]["eos_token_id"] = tok.token_to_id("<|im_end|>")
    return cfg


def tokenizer_for(cfg: dict[str, Any]) -> Any:
    """The tokenizer that matches a config's token ids: the released ids, or the compact test ones."""
    from tempo_ops.svlm.tokenizer_build import QWEN_FIRST_ADDED_ID, build_tokenizer

    released = cfg["text_config"]["bos_token_id"] == QWEN_FIRST_ADDED_ID
    tok = build_tokenizer(added_tokens_at=QWEN_FIRST_ADDED_ID if released else None)
    if tok.token_to_id("<|video_pad|>") != cfg["video_token_id"]:
        raise ConfigError("the config's token ids match no tokenizer this code builds", item="model preset")
    return tok


def llm_config(*, layers: int | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """The Qwen3-4B config, optionally with fewer layers / a smaller vocabulary."""
    cfg = copy.deepcopy(QWEN3_4B_CONFIG)
    if layers is not None:
        cfg["num_hidden_layers"] = cfg["max_window_layers"] = _positive(layers, "layers")
    if vocab_size is not None:
        cfg["vocab_size"] = _positive(vocab_size, "vocab_size")
    return cfg


def tempo_config(llm: dict[str, Any], *, projector: str = "mlp2x_gelu", svlm_ref: str = f"../{SVLM_DIRNAME}") -> dict[str, Any]:
    """``config.json`` of the Tempo-6B layout: the Qwen3 config plus the ``mm_*`` fields."""
    if projector not in TEMPO_PROJECTOR_TYPES:
        raise ConfigError(f"projector must be one of {TEMPO_PROJECTOR_TYPES}, got {projector!r}", item="tempo preset")
    cfg = copy.deepcopy(llm)
    cfg.update(
        {
            "model_type": "tempo_qwen",
            "architectures": ["TempoQwenForCausalLM"],
            "tie_word_embeddings": False,  # the layout stores lm_head (not confirmed publicly)
            "mm_vision_tower_aux_list": [svlm_ref],
            "num_compression_tokens": TEMPO_NUM_COMPRESSION_TOKENS,
            "mm_projector_type": projector,
            "mm_hidden_size": TEMPO_MM_HIDDEN_SIZE,
            "visual_token_budget": TEMPO_VISUAL_TOKEN_BUDGET,
            "tokenizer_model_max_length": TEMPO_TOKENIZER_MODEL_MAX_LENGTH,
        }
    )
    return cfg


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}", item="model preset")
    return value


def build_svlm(cfg: dict[str, Any], *, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16) -> Any:
    """``Qwen3VLForConditionalGeneration`` of a config dict, random (transformers' own init), eval mode.

    On ``meta`` it has names and shapes only. Parameters are created in ``dtype`` on ``device``
    directly (no float32 copy first: that would need 8.5 GB for the 2B model).
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig.from_dict(cfg)
    with torch.device(device), _default_dtype(dtype):
        return Qwen3VLForConditionalGeneration(config).to(dtype).eval()


def build_llm(cfg: dict[str, Any], *, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16) -> Any:
    """``Qwen3ForCausalLM`` of a (Qwen3 or tempo_qwen) config dict, as ``build_svlm`` builds (rope
    scaling off, as the LLM stage loads it: ``tempo_ops.llm.checkpoint.qwen3_config``)."""
    from transformers import Qwen3ForCausalLM

    from tempo_ops.llm.checkpoint import qwen3_config

    config = qwen3_config(cfg, item="model preset")
    with torch.device(device), _default_dtype(dtype):
        return Qwen3ForCausalLM(config).to(dtype).eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, shape and how to fill it (``normal``, ``ones``, ``zeros``)."""

    name: str
    shape: tuple[int, ...]
    init: str
    std: float = 0.02
    mean: float = 0.0


def model_tensor_specs(model: Any, *, prefix: str = "", skip: Iterable[str] = (), std: float = 0.02) -> list[TensorSpec]:
    """Specs of every parameter of ``model`` (a meta-device module), tied duplicates left out.

    Norm weights (``LayerNorm``, ``*RMSNorm``) → ones, biases → zeros, the rest normal(0, ``std``).
    """
    skip = set(skip)
    norm_modules = {
        name for name, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm) or "RMSNorm" in type(mod).__name__
    }
    specs = []
    for name, param in model.named_parameters(remove_duplicate=True):
        if name in skip:
            continue
        module, _, leaf = name.rpartition(".")
        if leaf == "bias":
            init = "zeros"
        elif module in norm_modules:
            init = "ones"
        else:
            init = "normal"
        specs.append(TensorSpec(prefix + name, tuple(param.shape), init, std))
    return specs


def make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The tensor of ``spec``, deterministic for (seed, spec.name) whatever the order of generation."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.init != "normal":
        raise ConfigError(f"unknown init {spec.init!r}", item=spec.name)
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.empty(spec.shape, dtype=dtype).normal_(spec.mean, spec.std, generator=gen)


def _nbytes(spec: TensorSpec, dtype: torch.dtype) -> int:
    return math.prod(spec.shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(
    path: str | Path,
    specs: list[TensorSpec],
    tensor_fn: Callable[[TensorSpec], torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor (one tensor in memory at a time); returns data bytes.

    The header (names, dtypes, shapes, offsets) is known from the specs before any data exists,
    so each tensor from ``tensor_fn`` is written right after it is made and then dropped.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        n = _nbytes(spec, dtype)
        header[spec.name] = {"dtype": _DTYPES[dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for spec in specs:
            tensor = tensor_fn(spec)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != dtype:
                raise ConfigError(f"generated {tuple(tensor.shape)} {tensor.dtype}, expected {spec.shape} {dtype}", item=spec.name)
            fh.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            del tensor
    tmp.replace(path)
    return offset


def write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    tensor_fn: Callable[[TensorSpec], torch.Tensor],
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, str]:
    """Write ``specs`` as ``model-0000i-of-0000n.safetensors`` shards + ``model.safetensors.index.json``."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec, dtype)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors_streaming(out_dir / name, group, tensor_fn, dtype=dtype)
        weight_map.update({s.name: name for s in group})
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return weight_map


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- writers
SVLM_EMBED_KEY = "model.language_model.embed_tokens.weight"


def svlm_specs(cfg: dict[str, Any]) -> list[TensorSpec]:
    """Tensor specs of the released Qwen3-VL layout (``model.visual.*``, ``model.language_model.*``;
    ``lm_head.weight`` only when the embeddings are not tied)."""
    model = build_svlm(cfg)
    skip = ["lm_head.weight"] if cfg.get("tie_word_embeddings") else []
    return model_tensor_specs(model, skip=skip, std=cfg["text_config"]["initializer_range"])


def write_random_svlm(out_dir: str | Path, *, seed: int = 0, cfg: dict[str, Any] | None = None) -> Path:
    """Write a random-weight Qwen3-VL directory (config, ``model.safetensors`` bf16, tokenizer, processor files)."""
    from tempo_ops.svlm.tiny import write_processor_files

    cfg = cfg if cfg is not None else svlm_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = svlm_specs(cfg)
    write_safetensors_streaming(out / "model.safetensors", specs, lambda s: make_tensor(s, seed))
    tok = tokenizer_for(cfg)
    if tok.get_vocab_size(with_added_tokens=True) > cfg["text_config"]["vocab_size"]:
        raise ConfigError("the tokenizer is larger than the vocabulary", item=str(out))
    write_processor_files(out, tok)  # tokenizer, chat template, image and video processor configs
    _write_json(out / "config.json", cfg)  # last: a directory with a config has its weights
    return out


def embedding_stats(embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std ``(D,) float32`` of an embedding table ``(V, D)``, in row blocks
    (never a float32 copy of the whole table)."""
    total = torch.zeros(embed.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(embed.shape[1], dtype=torch.float64)
    for start in range(0, embed.shape[0], 8192):
        block = embed[start : start + 8192].double()
        total += block.sum(0)
        total_sq += (block * block).sum(0)
    n = embed.shape[0]
    mean = total / n
    var = (total_sq - n * mean * mean) / max(n - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


def write_random_tempo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    svlm_cfg: dict[str, Any] | None = None,
    llm_cfg: dict[str, Any] | None = None,
    projector: str = "mlp2x_gelu",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a random-weight checkpoint in the Tempo-6B layout.

    The SVLM part equals ``write_random_svlm(seed=seed, cfg=svlm_cfg)``'s weights (same names →
    same values) under ``model.vision_tower_aux_list.0.vlm.``; the compression tokens are
    N(mean_d, std_d) of that SVLM's embedding table.
    """
    from tempo_ops.svlm.checkpoints import TEMPO_MEMORY_TOKENS_KEY
    from tempo_ops.svlm.tokenizer_build import write_tokenizer

    svlm_cfg = svlm_cfg if svlm_cfg is not None else svlm_config()
    llm_cfg = llm_cfg if llm_cfg is not None else llm_config()
    config = tempo_config(llm_cfg, projector=projector)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d_svlm, d_llm = svlm_cfg["text_config"]["hidden_size"], llm_cfg["hidden_size"]
    if d_svlm != config["mm_hidden_size"]:
        config["mm_hidden_size"] = d_svlm

    svlm_part = svlm_specs(svlm_cfg)
    embed_spec = next(s for s in svlm_part if s.name == SVLM_EMBED_KEY)
    embed = make_tensor(embed_spec, seed)
    mean, std = embedding_stats(embed)
    del embed
    k = config["num_compression_tokens"]

    prefix = "model.vision_tower_aux_list.0.vlm."
    specs: list[TensorSpec] = [TensorSpec(TEMPO_MEMORY_TOKENS_KEY, (1, k, d_svlm), "compression")]
    specs += [TensorSpec(prefix + s.name, s.shape, s.init, s.std) for s in svlm_part if not s.name.startswith("lm_head.")]
    specs += projector_specs(projector, d_svlm, d_llm)
    llm = build_llm(config)
    specs += model_tensor_specs(llm, std=llm_cfg["initializer_range"])

    def tensor_fn(spec: TensorSpec) -> torch.Tensor:
        if spec.init == "compression":
            gen = torch.Generator().manual_seed(seed + 1)
            return (torch.randn(spec.shape, generator=gen) * std + mean).to(torch.bfloat16)
        # the SVLM copy gets the base SVLM's values: seeded by the base tensor name
        base = spec.name[len(prefix) :] if spec.name.startswith(prefix) else None
        return make_tensor(TensorSpec(base, spec.shape, spec.init, spec.std) if base else spec, seed)

    write_sharded(out, specs, tensor_fn, max_shard_bytes=max_shard_bytes)
    write_tokenizer(out, tokenizer_for(svlm_cfg))
    _write_json(out / "config.json", config)
    return out


def projector_specs(projector: str, d_in: int, d_out: int) -> list[TensorSpec]:
    """``model.mm_projector.*`` specs: ``linear`` → Linear(d_in→d_out) (``weight``/``bias``);
    ``mlp2x_gelu`` → ``0`` Linear(d_in→d_out), GELU, ``2`` Linear(d_out→d_out) (LLaVA's Sequential names)."""
    std = 1.0 / math.sqrt(3 * d_in)  # uniform(±1/sqrt(d_in))'s std, nn.Linear's default scale
    if projector == "linear":
        return [
            TensorSpec("model.mm_projector.weight", (d_out, d_in), "normal", std),
            TensorSpec("model.mm_projector.bias", (d_out,), "zeros"),
        ]
    if projector == "mlp2x_gelu":
        return [
            TensorSpec("model.mm_projector.0.weight", (d_out, d_in), "normal", std),
            TensorSpec("model.mm_projector.0.bias", (d_out,), "zeros"),
            TensorSpec("model.mm_projector.2.weight", (d_out, d_out), "normal", 1.0 / math.sqrt(3 * d_out)),
            TensorSpec("model.mm_projector.2.bias", (d_out,), "zeros"),
        ]
    raise ConfigError(f"projector must be one of {TEMPO_PROJECTOR_TYPES}, got {projector!r}", item="tempo preset")


def make_random_models(
    out_dir: str | Path,
    preset: str,
    *,
    seed: int = 0,
    text_layers: int | None = None,
    vision_depth: int | None = None,
    llm_layers: int | None = None,
    projector: str = "mlp2x_gelu",
) -> dict[str, str]:
    """Write the models of ``preset`` (``PRESETS``) under ``out_dir``; ``{"svlm": dir[, "tempo": dir]}``.

    ``text_layers`` / ``vision_depth`` / ``llm_layers`` shorten the stacks (widths stay exact),
    for cheap checks; None keeps the published depths.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})", item="make-random-models")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}", item="make-random-models")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output path exists and is not a directory", item=str(out))
    s_cfg = svlm_config(text_layers=text_layers, vision_depth=vision_depth)
    paths = {"svlm": str(write_random_svlm(out / SVLM_DIRNAME, seed=seed, cfg=s_cfg))}
    if preset == "tempo-6b":
        l_cfg = llm_config(layers=llm_layers)
        paths["tempo"] = str(write_random_tempo(out / TEMPO_DIRNAME, seed=seed, svlm_cfg=s_cfg, llm_cfg=l_cfg, projector=projector))
    return paths
