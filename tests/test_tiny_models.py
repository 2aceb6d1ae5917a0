"""Tiny offline models: determinism, layouts, loading, and a forward pass with our inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tempo_ops.errors import ConfigError
from tempo_ops.svlm.prompt import build_segment_ids
from tempo_ops.svlm.tiny import (
    NUM_COMPRESSION_TOKENS,
    SVLM_HIDDEN,
    TEMPO_KEY_COMPRESSION_TOKENS,
    TEMPO_LLM_HIDDEN,
    TEMPO_PREFIX_SVLM,
    make_tiny_models,
)
from tempo_ops.svlm.vision_inputs import frames_to_video_inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"), seed=0)


def _load_all(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_cli_build_is_byte_identical_for_same_seed(tiny, tmp_path):
    from pipelines.cli import main

    assert main(["make-tiny-models", str(tmp_path / "again"), "--seed", "0"]) == 0
    for sub in ("svlm", "tempo"):
        ours = sorted(p.name for p in Path(tiny[sub]).iterdir())
        theirs = sorted(p.name for p in (tmp_path / "again" / sub).iterdir())
        assert ours == theirs
        for name in ours:
            if name.endswith(".safetensors") or name in ("tokenizer.json", "model.safetensors.index.json"):
                assert (Path(tiny[sub]) / name).read_bytes() == (tmp_path / "again" / sub / name).read_bytes(), name


def test_other_seed_gives_other_weights(tiny, tmp_path):
    other = make_tiny_models(tmp_path / "s1", seed=1)
    a = _load_all(Path(tiny["svlm"]))
    b = _load_all(Path(other["svlm"]))
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.language_model.embed_tokens.weight"], b["model.language_model.embed_tokens.weight"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        make_tiny_models(tmp_path / "x", seed=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError):
        make_tiny_models(tmp_path / "file")
    from pipelines.cli import main

    assert main(["make-tiny-models", str(tmp_path / "y"), "--seed", "-3"]) == 2


def test_svlm_config_matches_tokenizer(tiny):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny["svlm"])
    tok = AutoTokenizer.from_pretrained(tiny["svlm"])
    assert cfg.model_type == "qwen3_vl"
    tc, vc = cfg.text_config, cfg.vision_config
    assert tc.vocab_size == len(tok)
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tc.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tc.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tc.pad_token_id == tok.pad_token_id
    assert sum(tc.rope_parameters["mrope_section"]) == tc.head_dim // 2
    assert tc.hidden_size == SVLM_HIDDEN and vc.out_hidden_size == tc.hidden_size
    assert (vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size) == (16, 2, 2)
    assert list(vc.deepstack_visual_indexes) == [0]
    assert tc.num_hidden_layers == 2 and vc.depth == 2


def test_svlm_processor_files_and_tokenizer(tiny):
    from transformers import AutoTokenizer

    svlm = Path(tiny["svlm"])
    video = json.loads((svlm / "video_preprocessor_config.json").read_text())
    image = json.loads((svlm / "preprocessor_config.json").read_text())
    for doc in (video, image):
        assert (doc["patch_size"], doc["temporal_patch_size"], doc["merge_size"]) == (16, 2, 2)
        assert doc["image_mean"] == doc["image_std"] == [0.5, 0.5, 0.5]
        assert doc["processor_class"] == "Qwen3VLProcessor"
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    tok = AutoTokenizer.from_pretrained(str(svlm))
    assert tok.is_fast
    assert len(tok("Yes", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("No", add_special_tokens=False)["input_ids"]) == 1
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"


def test_tempo_checkpoint_layout(tiny):
    tempo = Path(tiny["tempo"])
    cfg = json.loads((tempo / "config.json").read_text())
    assert cfg["model_type"] == "tempo_qwen"
    assert cfg["mm_vision_tower_aux_list"] == ["../svlm"]
    assert (tempo / cfg["mm_vision_tower_aux_list"][0]).resolve() == Path(tiny["svlm"]).resolve()
    assert cfg["num_compression_tokens"] == NUM_COMPRESSION_TOKENS == 128
    assert cfg["mm_projector_type"] == "linear"
    assert cfg["mm_hidden_size"] == SVLM_HIDDEN and cfg["hidden_size"] == TEMPO_LLM_HIDDEN
    assert cfg["visual_token_budget"] > 0 and cfg["tokenizer_model_max_length"] > 0

    index = json.loads((tempo / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    from safetensors import safe_open

    total = 0
    for shard in shards:
        with safe_open(str(tempo / shard), framework="pt") as fh:
            keys = set(fh.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == shard}
            for k in keys:
                t = fh.get_tensor(k)
                total += t.numel() * t.element_size()
    assert total == index["metadata"]["total_size"]

    state = _load_all(tempo)
    assert state[TEMPO_KEY_COMPRESSION_TOKENS].shape == (1, 128, SVLM_HIDDEN)
    assert state["model.mm_projector.weight"].shape == (TEMPO_LLM_HIDDEN, SVLM_HIDDEN)
    assert state["model.mm_projector.bias"].shape == (TEMPO_LLM_HIDDEN,)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        assert key in state
    svlm_state = _load_all(Path(tiny["svlm"]))
    svlm_keys = {k[len(TEMPO_PREFIX_SVLM) :] for k in state if k.startswith(TEMPO_PREFIX_SVLM)}
    assert svlm_keys == {k for k in svlm_state if not k.startswith("lm_head.")}
    assert any(k.startswith("model.visual.") for k in svlm_keys)
    assert any(k.startswith("model.language_model.") for k in svlm_keys)
    for k in svlm_keys:
        assert torch.equal(state[TEMPO_PREFIX_SVLM + k], svlm_state[k]), k
    # memory tokens follow the embedding table's per-dimension statistics
    emb = svlm_state["model.language_model.embed_tokens.weight"]
    mem = state[TEMPO_KEY_COMPRESSION_TOKENS][0]
    assert torch.allclose(mem.mean(0).abs().mean(), emb.mean(0).abs().mean(), atol=0.05)
    assert torch.allclose(mem.std(0).mean(), emb.std(0).mean(), rtol=0.25)


def test_tempo_llm_loads_as_qwen3(tiny):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tempo = Path(tiny["tempo"])
    cfg = json.loads((tempo / "config.json").read_text())
    keys = {k: v for k, v in cfg.items() if k in Qwen3Config().to_dict() and k != "model_type"}
    llm = Qwen3ForCausalLM(Qwen3Config(**keys))
    state = _load_all(tempo)
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.vision_tower_aux_list.", "model.mm_projector."))}
    missing, unexpected = llm.load_state_dict(llm_state, strict=True)
    assert not missing and not unexpected


def test_forward_with_our_inputs(tiny):
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny["svlm"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny["svlm"])
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (8, 288, 512, 3), dtype=np.uint8)
    vi = frames_to_video_inputs(frames)
    seg = build_segment_ids(tok, vi.video_grid_thw, 8, 2.0, "What happens?")
    ids = torch.from_numpy(seg.input_ids)[None]
    mm = torch.from_numpy(seg.mm_token_type_ids)[None]
    with torch.no_grad():
        out = model(input_ids=ids, mm_token_type_ids=mm, pixel_values_videos=vi.pixel_values_videos, video_grid_thw=vi.video_grid_thw)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    # the video changes the output (its features are actually used)
    with torch.no_grad():
        out2 = model(
            input_ids=ids,
            mm_token_type_ids=mm,
            pixel_values_videos=frames_to_video_inputs(255 - frames).pixel_values_videos,
            video_grid_thw=vi.video_grid_thw,
        )
    assert not torch.allclose(out.logits[0, -1], out2.logits[0, -1])
