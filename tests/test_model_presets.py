"""Real-shape presets: published configs load, layouts are the released ones, one layer of each runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tempo_ops import model_presets as mp
from tempo_ops.errors import ConfigError


def test_published_svlm_config_loads_with_exact_values():
    from transformers import Qwen3VLConfig

    cfg = Qwen3VLConfig.from_dict(mp.svlm_config())
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (2048, 28, 6144)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (16, 8, 128)
    assert text.vocab_size == 151936 and cfg.tie_word_embeddings
    # the 4.57-style rope_scaling of the released file becomes transformers 5's rope_parameters
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert text.rope_parameters["mrope_interleaved"] is True
    assert text.rope_parameters["rope_theta"] == 5000000
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (24, 1024, 4096, 16)
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (16, 2, 2)
    assert vision.out_hidden_size == 2048 and vision.deepstack_visual_indexes == [5, 11, 17]
    assert (cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (151656, 151652, 151653)


def test_published_llm_config_loads_with_exact_values():
    from transformers import Qwen3Config

    cfg = Qwen3Config.from_dict(mp.llm_config())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (2560, 36, 9728)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert cfg.rope_parameters["rope_theta"] == 1000000 and cfg.rope_parameters["rope_type"] == "default"
    tempo = mp.tempo_config(mp.llm_config())
    assert tempo["model_type"] == "tempo_qwen" and tempo["mm_hidden_size"] == 2048
    assert tempo["num_compression_tokens"] == 128 and tempo["hidden_size"] == 2560


def test_parameter_counts_match_the_released_sizes():
    # Qwen3-VL-2B-Instruct's model.safetensors is 4.26 GB (bf16, tied head stored once);
    # Qwen3-4B's card says 4.0 B parameters.
    svlm = sum(math.prod(s.shape) for s in mp.svlm_specs(mp.svlm_config()))
    assert svlm == 2_127_532_032
    assert round(2 * svlm / 1e9, 2) == 4.26
    llm = mp.build_llm(mp.llm_config())
    assert sum(p.numel() for p in llm.parameters()) == 4_022_468_096


def test_shortened_configs_keep_widths_and_valid_deepstack():
    cfg = mp.svlm_config(text_layers=1, vision_depth=2)
    assert cfg["text_config"]["num_hidden_layers"] == 1 and cfg["vision_config"]["depth"] == 2
    assert cfg["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    assert cfg["text_config"]["hidden_size"] == 2048 and cfg["vision_config"]["hidden_size"] == 1024
    assert mp.svlm_config()["vision_config"]["deepstack_visual_indexes"] == [5, 11, 17]  # not mutated
    with pytest.raises(ConfigError):
        mp.svlm_config(text_layers=0)
    with pytest.raises(ConfigError):
        mp.tempo_config(mp.llm_config(), projector="mlp9x_relu")
    with pytest.raises(ConfigError):
        mp.make_random_models("/nonexistent/x", "qwen3-vl-7b")


def test_streaming_writer_round_trips_and_is_deterministic(tmp_path):
    specs = [
        mp.TensorSpec("a.weight", (3, 5), "normal"),
        mp.TensorSpec("a.bias", (5,), "zeros"),
        mp.TensorSpec("norm.weight", (7,), "ones"),
        mp.TensorSpec("b", (2, 2, 3), "normal", std=1.0),
    ]
    wm = mp.write_sharded(tmp_path, specs, lambda s: mp.make_tensor(s, 3), max_shard_bytes=40)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == wm
    assert [wm[s.name] for s in specs] == ["model-00001-of-00002.safetensors"] * 2 + ["model-00002-of-00002.safetensors"] * 2
    assert index["metadata"]["total_size"] == 2 * (15 + 5 + 7 + 12)
    for spec in specs:
        with safe_open(str(tmp_path / wm[spec.name]), framework="pt") as fh:
            got = fh.get_tensor(spec.name)
        assert got.dtype == torch.bfloat16 and tuple(got.shape) == spec.shape
        assert torch.equal(got, mp.make_tensor(spec, 3))
    assert torch.equal(mp.make_tensor(specs[3], 3), mp.make_tensor(specs[3], 3))
    assert not torch.equal(mp.make_tensor(specs[3], 3), mp.make_tensor(specs[3], 4))
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ConfigError):
        mp.write_safetensors_streaming(tmp_path / "x.safetensors", specs[:1], lambda s: torch.zeros(2))


@dataclass
class _Seg:
    frames: np.ndarray
    start_position: int
    real_fps: float


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """One text layer and one vision block at Qwen3-VL-2B's exact widths, plus a Tempo checkpoint
    whose LLM is one Qwen3-4B layer; compact vocabularies keep the files small (the widths are
    what the shapes depend on; the released token ids are checked on the tokenizer alone)."""
    out = tmp_path_factory.mktemp("one_layer")
    s_cfg = mp.svlm_config(text_layers=1, vision_depth=1, compact_vocab=True)
    svlm = mp.write_random_svlm(out / "svlm", seed=0, cfg=s_cfg)
    tempo = mp.write_random_tempo(out / "tempo", seed=0, svlm_cfg=s_cfg, llm_cfg=mp.llm_config(layers=1, vocab_size=4096))
    return {"svlm": svlm, "tempo": tempo}


def test_released_tokenizer_ids(tmp_path):
    from transformers import AutoTokenizer

    from tempo_ops.svlm.tokenizer_build import write_tokenizer

    tok = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp_path, mp.tokenizer_for(mp.svlm_config()))))
    assert len(tok) == 151669 <= mp.svlm_config()["text_config"]["vocab_size"]
    for token, tid in (("<|endoftext|>", 151643), ("<|im_end|>", 151645), ("<|vision_start|>", 151652), ("<|video_pad|>", 151656)):
        assert tok.convert_tokens_to_ids(token) == tid
    assert len(tok("Yes", add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("Count the dogs <2.0 seconds>")["input_ids"]) == "Count the dogs <2.0 seconds>"


def test_svlm_layout(one_layer):
    svlm = Path(one_layer["svlm"])
    assert sorted(p.name for p in svlm.glob("*.safetensors")) == ["model.safetensors"]
    with safe_open(str(svlm / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.get_slice("model.language_model.layers.0.mlp.gate_proj.weight").get_shape() == [6144, 2048]
        assert fh.get_slice("model.visual.blocks.0.attn.qkv.weight").get_shape() == [3072, 1024]
    assert "lm_head.weight" not in keys  # tied, stored once, as released
    assert {k.split(".")[1] for k in keys} == {"visual", "language_model"}


def test_one_layer_of_the_svlm_runs_through_the_compressor(one_layer):
    from tempo_ops.svlm.compressor import Compressor

    comp = Compressor.from_pretrained(
        one_layer["svlm"], memory_tokens=one_layer["tempo"], device="cpu", dtype="bfloat16", reference_geometry=False
    )
    assert comp.memory_tokens_source.endswith("+svlm") and comp.hidden_size == 2048 and comp.num_memory_tokens == 128
    rng = np.random.default_rng(0)
    segs = [_Seg(rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), 8 * i, 2.0) for i in range(2)]
    out = comp.compress(segs, ["What is it?", "Count the dogs."])
    assert out.candidates.shape == (2, 2, 128, 2048) and out.relevance.shape == (2, 2)
    assert np.isfinite(out.candidates).all() and ((out.relevance > 0) & (out.relevance < 1)).all()
    ref = comp.compress_unshared(segs, ["What is it?", "Count the dogs."])
    assert np.abs(out.relevance - ref.relevance).max() < 0.02  # bf16


def test_tempo_layout_and_weight_sink(one_layer):
    from tempo_ops.svlm import checkpoints

    tempo = Path(one_layer["tempo"])
    index = json.loads((tempo / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.mm_projector.0.weight" in index and "model.mm_projector.2.bias" in index
    assert "lm_head.weight" in index and "model.embed_tokens.weight" in index
    base = mp.build_svlm(mp.svlm_config(text_layers=1, vision_depth=1, compact_vocab=True))
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    seen: dict[str, tuple] = {}
    mem = checkpoints.load_memory_tokens(
        tempo, hidden_size=2048, svlm_state_shapes=shapes, weight_sink=lambda n, t: seen.__setitem__(n, tuple(t.shape))
    )
    assert mem.tokens.shape == (1, 128, 2048) and mem.svlm_weights is None
    assert set(seen) == set(mem.svlm_weight_digests) and all(shapes[n] == s for n, s in seen.items())
    with safe_open(str(Path(one_layer["svlm"]) / "model.safetensors"), framework="pt") as fh:
        embed = fh.get_tensor("model.language_model.embed_tokens.weight")
    # compression tokens: N(mean, std) of the embedding table per dimension
    mean, std = mp.embedding_stats(embed)
    assert torch.allclose(mean, embed.float().mean(0), atol=1e-5) and torch.allclose(std, embed.float().std(0), atol=1e-4)
    assert abs(float(mem.tokens.std()) - float(std.mean())) < 2e-3


def test_one_layer_of_the_llm_runs_at_exact_widths(one_layer):
    llm = mp.build_llm(mp.llm_config(layers=1, vocab_size=4096), device="cpu")
    embeds = torch.randn(1, 40, 2560, dtype=torch.bfloat16) * 0.02
    with torch.inference_mode():
        out = llm(inputs_embeds=embeds, position_ids=torch.arange(40)[None])
    assert out.logits.shape == (1, 40, 4096) and torch.isfinite(out.logits).all()


def test_cli_rejects_bad_preset(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["make-random-models", "/tmp/unused", "--preset", "nope"])
    assert main(["make-random-models", "/tmp/unused", "--preset", "qwen3-vl-2b", "--seed", "-1"]) == 2
