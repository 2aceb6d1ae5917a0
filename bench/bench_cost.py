"""Cost model, counted: FLOPs per segment (compressor) and per answered sample (LLM stage), bytes per segment.

Every FLOP figure is counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add of every matmul, batched matmul and convolution; elementwise work, norms, softmax
and the relevance dot product (a matrix-vector product) are not counted) while our own code
paths run on the published shapes:

- Compressor (Qwen3-VL-2B): ``Compressor._run_prefix`` (vision encoder + language model over the
  prefix) and ``Compressor._run_suffix`` (one query's suffix + 128 memory tokens against the
  prefix cache) on a model with **one** vision block and **one** text layer at the exact widths
  (compact vocabulary: embedding lookups cost no FLOPs and the LM head is not used), run on the
  CPU for real, with eager attention (the counter does not see the CPU SDPA kernel). Counts are
  split per module; the published model has 24 identical vision blocks, 28 identical text layers
  and 3 DeepStack mergers, so vision = patch embed + 24 × block + merger + 3 × DeepStack merger
  and text = 28 × layer — exact, not estimated, because identical layers do identical work.
- LLM stage (Qwen3-4B, Tempo-6B layout): the full 36-layer model built on the ``meta`` device
  (no memory, no arithmetic; the counter sees shapes), ``TempoLLM.build_inputs`` for the real
  prompt (timestamps, projected tokens, text), then the prefill (``logits_to_keep=1``) and 16
  greedy decode steps against the KV cache, at budgets 4096 and 8192 over a 1-hour video
  (1024 sampled frames → 128 segments; equal scores, so ATA spends the whole budget).
- Attention is counted dense (the counter does not discount the causal half; FlashAttention-
  style kernels skip it, so real attention work is up to 2× lower on those terms).

Bytes per segment: the token cache (schemas/CACHE_LAYOUT.md: K·D float16 candidates + float32
relevance + the shard index's 16·K/C bytes) and the segment index (layout of helper 13's
``schemas/index_layout.py`` as documented there: visual tokens and DeepStack features in bf16,
prefix ids int32, types int8, a few scalars; computed from that layout, not measured on disk).

Run: ``python -m bench.bench_cost`` → ``bench/results/cost.json``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import peak_rss_mb, write_result

QUERY_TOKENS_NOTE = "queries rendered with tempo_ops.query_text (Video-MME template, 4 options)"
VIDEO_HOUR_SEGMENTS = 128  # 1 h at 2 fps = 7200 frames, clamped to max_frames 1024 → 128 segments of 8
MAX_NEW_TOKENS = 16


def counted(fn: Any) -> tuple[Any, dict[str, int]]:
    """Run ``fn()`` under ``FlopCounterMode``; returns its result and FLOPs per module name."""
    with FlopCounterMode(display=False) as fc:
        out = fn()
    counts = fc.get_flop_counts()
    totals = {name: int(sum(ops.values())) for name, ops in counts.items()}
    # eager attention's QK^T and AV are the batched matmuls; projections are plain mm/addmm
    totals["Global.attention"] = int(sum(v for op, v in counts["Global"].items() if "bmm" in str(op)))
    return out, totals


def _module(counts: dict[str, int], suffix: str) -> int:
    hits = [v for k, v in counts.items() if k == suffix or k.endswith("." + suffix) or k.endswith(suffix)]
    if len(hits) != 1:
        raise RuntimeError(f"expected one module ending in {suffix!r}, found {len(hits)}")
    return hits[0]


def compressor_flops(tmp: Path) -> dict:
    from bench.bench_real_shapes import queries, segments
    from tempo_ops import model_presets as mp
    from tempo_ops.svlm.compressor import Compressor

    published = mp.svlm_config()
    depth = published["vision_config"]["depth"]
    layers = published["text_config"]["num_hidden_layers"]
    n_deepstack = len(published["vision_config"]["deepstack_visual_indexes"])
    cfg = mp.svlm_config(text_layers=1, vision_depth=1, compact_vocab=True)
    svlm = mp.write_random_svlm(tmp / "svlm1", seed=0, cfg=cfg)
    comp = Compressor.from_pretrained(svlm, device="cpu", dtype="bfloat16")
    comp.model.set_attn_implementation("eager")
    seg = segments(1)[0]
    prepared = comp._prepare_segment(seg, 0)
    suffixes = comp._suffix_ids(queries())
    with torch.inference_mode():
        state, prefix_counts = counted(lambda: comp._run_prefix([prepared]))
        suffix = []
        for q in range(len(suffixes)):
            _, c = counted(lambda q=q: comp._run_suffix(state, [(0, q)], suffixes))
            suffix.append(c)
    vis_total = _module(prefix_counts, "Qwen3VLVisionModel")
    block = _module(prefix_counts, "VisionModel.blocks.0")
    ds = _module(prefix_counts, "VisionModel.deepstack_merger_list.0")
    merger = _module(prefix_counts, "VisionModel.merger")
    patch = _module(prefix_counts, "VisionModel.patch_embed")
    if vis_total != patch + block + merger + ds:
        raise RuntimeError("vision FLOPs outside patch embed, blocks and mergers: the scaling would miss them")
    vision = patch + depth * block + merger + n_deepstack * ds
    prefix_layer = _module(prefix_counts, "TextModel.layers.0")
    prefix_attention = layers * _module(prefix_counts, "TextModel.layers.0.self_attn") - layers * sum(
        _module(prefix_counts, f"TextModel.layers.0.self_attn.{p}_proj") for p in "qkvo"
    )
    prefix_lm = layers * prefix_layer
    suffix_lm = [layers * _module(c, "TextModel.layers.0") for c in suffix]
    per_query = float(np.mean(suffix_lm))
    return {
        "how": "counted on 1 vision block + 1 text layer at the exact widths, scaled by the published depths",
        "segment": "8 frames of 512x288 → 512x256 (reference geometry)",
        "grid_thw": prepared.grid[0].tolist(),
        "prefix_tokens": int(prepared.input_ids.numel()),
        "suffix_tokens_per_query": [int(s.numel()) for s in suffixes],
        "memory_tokens": comp.num_memory_tokens,
        "per_module_counted": {
            "patch_embed": patch, "vision_block": block, "merger": merger, "deepstack_merger": ds,
            "text_layer_prefix": prefix_layer, "text_layer_suffix": [_module(c, "TextModel.layers.0") for c in suffix],
        },
        "vision_encoder_gflops": vision / 1e9,
        "prefix_lm_gflops": prefix_lm / 1e9,
        "prefix_lm_attention_dense_gflops": prefix_attention / 1e9,
        "per_query_suffix_gflops": [x / 1e9 for x in suffix_lm],
        "per_query_suffix_mean_gflops": per_query / 1e9,
        "segment_gflops_1_query": (vision + prefix_lm + per_query) / 1e9,
        "segment_gflops_16_queries": (vision + prefix_lm + 16 * per_query) / 1e9,
        "note": "without prefix sharing (the reference) every query pays vision + prefix + its suffix again",
    }


def llm_flops(budgets: tuple[int, ...] = (4096, 8192)) -> dict:
    from bench.bench_real_shapes import queries
    from tempo_ops import model_presets as mp
    from tempo_ops.allocation import allocate
    from tempo_ops.llm.model import TempoLLM
    from tempo_ops.llm.projector import build_projector
    from tempo_ops.svlm.tokenizer_build import write_tokenizer
    from tempo_ops.video import format_timestamp, segment_timestamp

    cfg = mp.tempo_config(mp.llm_config())
    lm = mp.build_llm(cfg, device="meta")
    lm.set_attn_implementation("eager")
    with torch.device("meta"):
        projector = build_projector(cfg["mm_projector_type"], cfg["mm_hidden_size"], cfg["hidden_size"]).to(torch.bfloat16)
    # Sequence lengths come from the real input construction on a 1-layer CPU twin (same widths,
    # compact vocabulary: the learned BPE is the same, only the special ids differ); the meta
    # model cannot run it (it counts visual positions with .item()).
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp, mp.tokenizer_for(mp.svlm_config(compact_vocab=True)))))
    twin_cfg = mp.tempo_config(mp.llm_config(layers=1, vocab_size=len(tok)))
    twin_cfg["bos_token_id"] = twin_cfg["pad_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    twin_cfg["eos_token_id"] = tok.convert_tokens_to_ids("<|im_end|>")
    twin_proj = build_projector(cfg["mm_projector_type"], cfg["mm_hidden_size"], cfg["hidden_size"])
    twin = TempoLLM(mp.build_llm(twin_cfg, device="cpu"), twin_proj.to(torch.bfloat16), tok, twin_cfg, name="twin")
    out: dict = {"how": "counted on the full Qwen3-4B on the meta device (shapes only)", "budgets": {}}
    S = VIDEO_HOUR_SEGMENTS
    texts = [format_timestamp(segment_timestamp(i, 2.0)) for i in range(S)]
    for budget in budgets:
        alloc = allocate(np.full(S, 0.5, dtype=np.float32), budget)
        tokens = torch.zeros((int(alloc.sum()), cfg["mm_hidden_size"]), dtype=torch.bfloat16)
        with torch.inference_mode():
            L = int(twin.build_inputs(tokens, alloc, texts, queries()[0]).prompt_length)
            proj_flops, pre, attention, step_flops = _sample_flops(lm, projector, tokens.to("meta"), L)
        out["budgets"][str(budget)] = {
            "segments": S,
            "visual_tokens": int(alloc.sum()),
            "prompt_length": L,
            "projector_gflops": proj_flops / 1e9,
            "prefill_gflops": pre["Global"] / 1e9,
            "prefill_attention_dense_gflops": attention / 1e9,
            # computed from the counted figure: causal attention touches L(L+1)/2 of the L^2 pairs
            "prefill_gflops_causal": (pre["Global"] - attention + attention * (L + 1) / (2 * L)) / 1e9,
            "lm_head_gflops_per_step": _module(pre, "CausalLM.lm_head") / 1e9,
            "decode_gflops_16_steps": sum(step_flops) / 1e9,
            "sample_gflops": (proj_flops + pre["Global"] + sum(step_flops)) / 1e9,
        }
    return out


def _sample_flops(lm: Any, projector: Any, tokens: torch.Tensor, L: int) -> tuple[int, dict[str, int], int, list[int]]:
    """Counted FLOPs of one answered sample on meta: projector, prefill of L positions, 16 decode steps."""
    from transformers import DynamicCache

    hidden = lm.config.hidden_size
    proj_flops = counted(lambda: projector(tokens))[1].get("Global", 0)
    cache = DynamicCache(config=lm.config)
    embeds = torch.zeros((1, L, hidden), dtype=torch.bfloat16, device="meta")
    positions = torch.arange(L, device="meta")[None]
    _, pre = counted(lambda: lm(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1))
    steps = []
    for i in range(MAX_NEW_TOKENS):
        x = torch.zeros((1, 1, hidden), dtype=torch.bfloat16, device="meta")
        pos = torch.tensor([[L + i]], device="meta")
        steps.append(counted(lambda x=x, pos=pos: lm(inputs_embeds=x, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1))[1]["Global"])
    return proj_flops, pre, pre["Global.attention"], steps


def cache_bytes(K: int = 128, D: int = 2048, P: int = 32, C: int = 8) -> dict:
    """Token-cache bytes per segment (schemas/CACHE_LAYOUT.md) for one (video, query)."""
    candidates = K * D * 2
    relevance = 4
    index = 16 * K // C  # (offset, nbytes) uint64 per inner chunk of C tokens
    crc = 4 / P
    return {
        "candidates_bytes": candidates,
        "relevance_bytes": relevance,
        "shard_index_bytes": index + crc,
        "per_segment_per_query_bytes": candidates + relevance + index + crc,
        "per_video_query_objects_note": "3 + 2*ceil(S/P) objects (entry group, two array metadata, shards, relevance chunks)",
    }


def index_bytes(prefix_tokens: int, visual_tokens: int, D: int = 2048, deepstack_layers: int = 3) -> dict:
    """Segment-index bytes per segment from helper 13's documented layout (bf16 stored; not measured)."""
    visual = visual_tokens * D * 2
    deepstack = deepstack_layers * visual_tokens * D * 2
    ids = prefix_tokens * 4 + prefix_tokens * 1  # input_ids int32 + mm_token_type_ids int8
    scalars = 4 + 4 + 3 * 4 + 8  # n_visual, prefix_length, grid, start_position
    return {
        "source": "schemas/index_layout.py of branch issue-13 (not on main when counted): computed from its layout",
        "visual_bytes": visual,
        "deepstack_bytes": deepstack,
        "ids_and_scalars_bytes": ids + scalars,
        "per_segment_bytes": visual + deepstack + ids + scalars,
    }


def main(argv: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tempo_cost_") as tmp:
        comp = compressor_flops(Path(tmp))
    figures: dict = {"compressor_qwen3_vl_2b": comp, "queries": QUERY_TOKENS_NOTE}
    figures["llm_qwen3_4b"] = llm_flops()
    figures["cache"] = cache_bytes()
    figures["index"] = index_bytes(comp["prefix_tokens"], int(np.prod(comp["grid_thw"]) // 4))
    figures["seconds"] = time.perf_counter() - t0
    figures["peak_rss_mb"] = peak_rss_mb()
    write_result("cost", figures, "python -m bench.bench_cost " + " ".join(argv or sys.argv[1:]))
    return figures


if __name__ == "__main__":
    main()
