"""Loading the LLM stage from the Tempo-6B layout: only its shards, projector types, tied heads, save round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tempo_ops.errors import CheckpointFormatError, ConfigError
from tempo_ops.llm import TempoLLM
from tempo_ops.llm.checkpoint import is_llm_stage_key
from tempo_ops.svlm import checkpoints
from tempo_ops.svlm.tiny import build_tiny_tempo

INDEX = "model.safetensors.index.json"
TIMES = ["<2.0 seconds>", "<6.0 seconds>"]


def _index(d) -> dict[str, str]:
    return json.loads((Path(d) / INDEX).read_text())["weight_map"]


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _sample(llm, seed=0):
    alloc = np.array([3, 2])
    tokens = np.random.default_rng(seed).standard_normal((5, 64)).astype(np.float16)
    return llm.build_inputs(tokens, alloc, TIMES, "What happens?")


def test_reads_only_the_llm_stage_shards(tiny_models, tmp_path):
    tempo = Path(tiny_models["tempo"])
    wm = _index(tempo)
    llm_shards = sorted({v for k, v in wm.items() if is_llm_stage_key(k)})
    svlm_only = sorted(set(wm.values()) - set(llm_shards))
    assert svlm_only, "the tiny checkpoint must have a shard holding only compressor tensors"
    llm = TempoLLM.from_pretrained(tempo)
    assert llm.shards_read == llm_shards
    # With the compressor-only shard gone, the LLM stage still loads, identically.
    cut = _copy(tempo, tmp_path / "cut")
    for name in svlm_only:
        (cut / name).unlink()
    again = TempoLLM.from_pretrained(cut)
    assert again.weights_sha256 == llm.weights_sha256
    # From a URL only the needed shards are copied.
    fs = fsspec.filesystem("memory")
    for f in tempo.iterdir():
        fs.pipe(f"/ckpt11/{f.name}", f.read_bytes())
    remote = TempoLLM.from_pretrained("memory://ckpt11")
    assert remote.weights_sha256 == llm.weights_sha256 and remote.shards_read == llm_shards
    x = _sample(llm)
    assert torch.equal(remote.inputs_embeds(x.inputs_embeds.new_zeros(0, 64), np.zeros(2, np.int64), TIMES, "q"),
                       llm.inputs_embeds(x.inputs_embeds.new_zeros(0, 64), np.zeros(2, np.int64), TIMES, "q"))
    fs.rm("/ckpt11", recursive=True)


def test_weights_equal_the_checkpoint_tensors(tiny_models):
    tempo = Path(tiny_models["tempo"])
    llm = TempoLLM.from_pretrained(tempo)
    state = {}
    for shard in sorted(set(_index(tempo).values())):
        state.update(load_file(str(tempo / shard)))
    for k, v in llm.lm.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(llm.projector.weight, state["model.mm_projector.weight"])
    assert llm.hidden_size == 96 and llm.mm_hidden_size == 64 and llm.projector_type == "linear"
    assert llm.lm.config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("ptype", ["mlp2x_gelu", "mlp3x_gelu"])
def test_mlp_projectors(tiny_models, tmp_path, ptype):
    out = build_tiny_tempo(tmp_path / ptype, tiny_models["svlm"], seed=0, projector_type=ptype)
    llm = TempoLLM.from_pretrained(out)
    n = int(ptype[3])
    wm = _index(out)
    assert sorted(k for k in wm if k.startswith("model.mm_projector.")) == sorted(
        f"model.mm_projector.{2 * i}.{p}" for i in range(n) for p in ("weight", "bias")
    )
    x = torch.randn(5, 64)
    state = {}
    for shard in sorted(set(wm.values())):
        state.update(load_file(str(out / shard)))
    h = x @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"]
    for i in range(1, n):
        h = torch.nn.functional.gelu(h, approximate="none")
        h = h @ state[f"model.mm_projector.{2 * i}.weight"].T + state[f"model.mm_projector.{2 * i}.bias"]
    torch.testing.assert_close(llm.project(x), h, rtol=1e-5, atol=1e-6)


def test_identity_projector_and_unknown_type(tiny_models, tmp_path):
    with pytest.raises(CheckpointFormatError, match="identity"):
        build_tiny_tempo(tmp_path / "ident", tiny_models["svlm"], seed=0, projector_type="identity")
    bad = _edit_config(_copy(tiny_models["tempo"], tmp_path / "badtype"), mm_projector_type="qformer")
    with pytest.raises(CheckpointFormatError, match="qformer"):
        TempoLLM.from_pretrained(bad)


def test_tied_embeddings_without_lm_head(tiny_models, tmp_path):
    tied = _copy(tiny_models["tempo"], tmp_path / "tied")
    wm = _index(tied)
    shard = tied / wm["lm_head.weight"]
    state = load_file(str(shard))
    del state["lm_head.weight"]
    save_file(state, str(shard), metadata={"format": "pt"})
    doc = json.loads((tied / INDEX).read_text())
    del doc["weight_map"]["lm_head.weight"]
    (tied / INDEX).write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match="missing"):
        TempoLLM.from_pretrained(tied)  # untied config: the head is required
    _edit_config(tied, tie_word_embeddings=True)
    llm = TempoLLM.from_pretrained(tied)
    assert llm.lm.lm_head.weight.data_ptr() == llm.lm.model.embed_tokens.weight.data_ptr()


def test_bad_checkpoints_are_typed_errors(tiny_models, tmp_path):
    missing = _copy(tiny_models["tempo"], tmp_path / "missing")
    doc = json.loads((missing / INDEX).read_text())
    del doc["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (missing / INDEX).write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match="missing"):
        TempoLLM.from_pretrained(missing)
    wrong = _edit_config(_copy(tiny_models["tempo"], tmp_path / "wrong"), model_type="qwen3")
    with pytest.raises(CheckpointFormatError, match="tempo_qwen"):
        TempoLLM.from_pretrained(wrong)
    with pytest.raises(ConfigError):
        TempoLLM.from_pretrained(tiny_models["tempo"], numerics="fast")


def test_reference_numerics_bf16_rope(tiny_models):
    ref = TempoLLM.from_pretrained(tiny_models["tempo"], numerics="reference", device="cpu")
    plain = TempoLLM.from_pretrained(tiny_models["tempo"], device="cpu")
    assert ref.dtype == torch.bfloat16 and plain.dtype == torch.float32 and plain.numerics == "exact"
    assert TempoLLM.from_pretrained(tiny_models["tempo"], dtype="bfloat16").numerics == "reference"
    f32 = plain.lm.model.rotary_emb.inv_freq
    got = ref.lm.model.rotary_emb.inv_freq
    assert got.dtype == torch.float32
    assert torch.equal(got, f32.to(torch.bfloat16).float()) and not torch.equal(got, f32)
    # Weights passed through float16 on the way to bf16.
    w = plain.lm.model.layers[0].mlp.up_proj.weight
    assert torch.equal(ref.lm.model.layers[0].mlp.up_proj.weight, w.half().bfloat16())
    assert ref.fingerprint()["numerics"] == "reference" and ref.fingerprint()["dtype"] == "bfloat16"
    (g,) = ref.generate([_sample(ref)], max_new_tokens=4)
    assert len(g.token_ids) <= 4


def test_save_pretrained_round_trip(tiny_models, tmp_path):
    llm = TempoLLM.from_pretrained(tiny_models["tempo"])
    out = tmp_path / "saved"
    llm.save_pretrained(out, compressor_from=tiny_models["tempo"], max_shard_bytes=200_000)
    back = TempoLLM.from_pretrained(out)
    assert back.weights_sha256 == llm.weights_sha256
    assert back.fingerprint() | {"name": ""} == llm.fingerprint() | {"name": ""}
    wm = _index(out)
    assert set(wm) == set(_index(tiny_models["tempo"]))
    assert len(set(wm.values())) > 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "tempo_qwen" and cfg["mm_projector_type"] == "linear" and cfg["mm_hidden_size"] == 64
    # The compressor parts came along: the memory tokens load from the saved checkpoint.
    a = checkpoints.load_memory_tokens(out, hidden_size=64)
    b = checkpoints.load_memory_tokens(tiny_models["tempo"], hidden_size=64)
    assert torch.equal(a.tokens, b.tokens)
    x, y = _sample(llm), _sample(back)
    assert torch.equal(x.inputs_embeds, y.inputs_embeds)
    assert llm.generate([x], max_new_tokens=5) == back.generate([y], max_new_tokens=5)
    # Without compressor_from only the LLM stage is written.
    only = tmp_path / "only"
    llm.save_pretrained(only)
    assert all(is_llm_stage_key(k) for k in _index(only))
    assert TempoLLM.from_pretrained(only).weights_sha256 == llm.weights_sha256
