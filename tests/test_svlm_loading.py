"""Tests of loading the compressor's parts (tempo_ops.svlm.checkpoints, Compressor.from_pretrained)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tempo_ops.errors import CheckpointFormatError, CheckpointNotFound, TokenizerError, UnsupportedModel
from tempo_ops.svlm import checkpoints
from tempo_ops.svlm.compressor import Compressor
from tempo_ops.svlm.tiny import make_tiny_models

TOKENS_KEY = checkpoints.TEMPO_MEMORY_TOKENS_KEY
VLM_PREFIX = checkpoints.TEMPO_SVLM_PREFIX


@dataclass
class Seg:
    frames: np.ndarray
    start_position: int
    real_fps: float


SEGS = [Seg(np.random.default_rng(i).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), 8 * i, 2.0) for i in range(2)]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models_loading"), seed=0)


@pytest.fixture(scope="session")
def base(tiny_paths) -> Compressor:
    return Compressor.from_pretrained(tiny_paths["svlm"], device="cpu")


def _index(tempo_dir: str | Path) -> dict[str, str]:
    return json.loads((Path(tempo_dir) / "model.safetensors.index.json").read_text())["weight_map"]


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensor(tempo_dir: Path, key: str, fn) -> None:
    """Replace tensor ``key`` of a Tempo checkpoint by ``fn(old)`` in its shard."""
    shard = tempo_dir / _index(tempo_dir)[key]
    state = load_file(str(shard))
    state[key] = fn(state[key]).contiguous()
    save_file(state, str(shard))


def _tempo_tokens(tempo_dir: str) -> torch.Tensor:
    shard = Path(tempo_dir) / _index(tempo_dir)[TOKENS_KEY]
    with safe_open(str(shard), framework="pt") as fh:
        return fh.get_tensor(TOKENS_KEY)


# ----------------------------------------------------------------------------- base SVLM
def test_load_base_svlm(tiny_paths, base):
    loaded = checkpoints.load_svlm(tiny_paths["svlm"])
    assert type(loaded.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert not loaded.model.training
    yes, no = loaded.yes_no_ids
    assert loaded.tokenizer.decode([yes]) == "Yes" and loaded.tokenizer.decode([no]) == "No"
    w = loaded.model.lm_head.weight.detach()
    assert torch.equal(loaded.yes_no_rows, w[[yes, no]].float())
    assert loaded.weights_sha256 == base.svlm_weights_sha256


def test_weights_hash_does_not_depend_on_run_dtype(tiny_paths, base):
    bf16 = Compressor.from_pretrained(tiny_paths["svlm"], device="cpu", dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.fingerprint()["svlm_weights_sha256"] == base.fingerprint()["svlm_weights_sha256"]
    res = bf16.compress(SEGS[:1], ["q"])  # bf16 path runs; outputs come back float32
    assert res.candidates.dtype == np.float32


def test_fresh_init_is_seeded_and_follows_embedding_statistics(tiny_paths, base):
    again = Compressor.from_pretrained(tiny_paths["svlm"], device="cpu", seed=0)
    other = Compressor.from_pretrained(tiny_paths["svlm"], device="cpu", seed=1, num_memory_tokens=16)
    assert torch.equal(base.memory_tokens, again.memory_tokens)
    assert other.memory_tokens.shape == (1, 16, 64)
    assert not torch.allclose(base.memory_tokens[:, :16], other.memory_tokens)
    table = base.model.get_input_embeddings().weight.detach().float()
    big = checkpoints.init_memory_tokens(table, 4096, seed=3)[0]
    assert torch.allclose(big.mean(0), table.mean(0), atol=0.1 * table.std(0).mean().item())
    assert torch.allclose(big.std(0), table.std(0), rtol=0.1)


# ----------------------------------------------------------------------------- our checkpoint
def test_save_load_round_trip(tiny_paths, base, tmp_path):
    base.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / checkpoints.COMPRESSOR_CONFIG_FILE).read_text())
    assert config["format"] == checkpoints.COMPRESSOR_FORMAT
    assert config["format_version"] == checkpoints.COMPRESSOR_FORMAT_VERSION
    assert config["num_memory_tokens"] == 128 and config["hidden_size"] == 64
    assert config["svlm"]["weights_sha256"] == base.svlm_weights_sha256
    loaded = Compressor.from_pretrained(tiny_paths["svlm"], memory_tokens=tmp_path / "ckpt", device="cpu")
    assert torch.equal(loaded.memory_tokens, base.memory_tokens)
    assert loaded.fingerprint()["memory_tokens_sha256"] == base.fingerprint()["memory_tokens_sha256"]
    assert loaded.memory_tokens_source.startswith("compressor:")
    a, b = base.compress(SEGS, ["q"]), loaded.compress(SEGS, ["q"])
    assert np.array_equal(a.candidates, b.candidates)


def test_save_and_load_through_memory_fs(tiny_paths, base):
    url = "memory://tempo-test-save/ckpt"
    base.save_pretrained(url)
    loaded = Compressor.from_pretrained(tiny_paths["svlm"], memory_tokens=url, device="cpu")
    assert torch.equal(loaded.memory_tokens, base.memory_tokens)


def test_compressor_checkpoint_errors(tiny_paths, base, tmp_path):
    good = tmp_path / "good"
    base.save_pretrained(good)

    def variant(name: str, edit) -> Path:
        d = _copy(str(good), tmp_path / name)
        cfg = json.loads((d / checkpoints.COMPRESSOR_CONFIG_FILE).read_text())
        edit(d, cfg)
        if (d / checkpoints.COMPRESSOR_CONFIG_FILE).exists():
            (d / checkpoints.COMPRESSOR_CONFIG_FILE).write_text(json.dumps(cfg))
        return d

    future = variant("future", lambda d, c: c.update(format_version=99))
    wrong_d = variant("wrong_d", lambda d, c: c.update(hidden_size=32))
    no_tensor = variant("no_tensor", lambda d, c: (d / checkpoints.MEMORY_TOKENS_FILE).unlink())
    wrong_k = variant("wrong_k", lambda d, c: c.update(num_memory_tokens=64))
    cases = [(future, CheckpointFormatError, "format_version"), (wrong_d, CheckpointFormatError, "hidden size"),
             (no_tensor, CheckpointNotFound, "memory_tokens.safetensors"), (wrong_k, CheckpointFormatError, "64")]
    for path, err, text in cases:
        with pytest.raises(err, match=text):
            checkpoints.load_memory_tokens(path, hidden_size=64)
    with pytest.raises(CheckpointNotFound, match="neither"):
        checkpoints.load_memory_tokens(tmp_path, hidden_size=64)  # a directory with no checkpoint files


# ----------------------------------------------------------------------------- Tempo layout
def test_tempo_memory_tokens_and_svlm_weights(tiny_paths, base, tmp_path):
    tempo = _copy(tiny_paths["tempo"], tmp_path / "tempo")
    # Make the fine-tuned SVLM differ from the base one so that replacement is observable.
    emb_key = VLM_PREFIX + "language_model.embed_tokens.weight"
    blk_key = VLM_PREFIX + "visual.blocks.0.mlp.linear_fc1.weight"
    _rewrite_tensor(tempo, emb_key, lambda t: t + 0.5)
    _rewrite_tensor(tempo, blk_key, lambda t: t * 2)
    comp = Compressor.from_pretrained(tiny_paths["svlm"], memory_tokens=tempo, device="cpu")
    assert torch.equal(comp.memory_tokens, _tempo_tokens(str(tempo)).float())
    state = comp.model.state_dict()
    base_state = base.model.state_dict()
    assert torch.allclose(state["model.language_model.embed_tokens.weight"],
                          base_state["model.language_model.embed_tokens.weight"] + 0.5)
    assert torch.allclose(state["model.visual.blocks.0.mlp.linear_fc1.weight"],
                          base_state["model.visual.blocks.0.mlp.linear_fc1.weight"] * 2)
    # lm_head (Yes/No rows) stays the base SVLM's
    assert torch.equal(state["lm_head.weight"], base_state["lm_head.weight"])
    assert torch.equal(comp.yes_no_rows, base.yes_no_rows)
    fp = comp.fingerprint()
    assert fp["svlm_weights_sha256"] != base.svlm_weights_sha256
    assert fp["memory_tokens_source"] == "tempo:tempo+svlm"
    assert fp["svlm_name"] == "svlm"
    # Without the SVLM weights: base SVLM, Tempo memory tokens.
    plain = Compressor.from_pretrained(tiny_paths["svlm"], memory_tokens=tempo, tempo_svlm_weights=False, device="cpu")
    assert plain.svlm_weights_sha256 == base.svlm_weights_sha256
    assert torch.equal(plain.memory_tokens, comp.memory_tokens)
    assert np.abs(plain.compress(SEGS, ["q"]).candidates - comp.compress(SEGS, ["q"]).candidates).max() > 1e-3


def test_unmodified_tempo_svlm_equals_base(tiny_paths, base):
    comp = Compressor.from_pretrained(tiny_paths["svlm"], memory_tokens=tiny_paths["tempo"], device="cpu")
    # The tiny Tempo checkpoint holds the base SVLM's weights unchanged: same hash as the base.
    assert comp.svlm_weights_sha256 == base.svlm_weights_sha256


def test_tempo_reads_only_the_shard_it_needs(tiny_paths, tmp_path, monkeypatch):
    tempo = _copy(tiny_paths["tempo"], tmp_path / "tempo")
    needed = _index(tempo)[TOKENS_KEY]
    opened: list[str] = []
    real_open = checkpoints.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_open", spy)
    mem = checkpoints.load_memory_tokens(tempo, hidden_size=64)
    assert opened == [needed]
    # Deleting every other shard does not matter.
    others = sorted(set(_index(tempo).values()) - {needed})
    assert others, "the tiny Tempo checkpoint is expected to have more than one shard"
    for name in others:
        (tempo / name).unlink()
    again = checkpoints.load_memory_tokens(tempo, hidden_size=64)
    assert torch.equal(mem.tokens, again.tokens)
    # ...but the SVLM weights live in the deleted shards too.
    shapes = {k: tuple(v.shape) for k, v in load_file(str(Path(tiny_paths["svlm"]) / "model.safetensors")).items()}
    with pytest.raises(CheckpointNotFound, match="missing file"):
        checkpoints.load_memory_tokens(tempo, hidden_size=64, svlm_state_shapes=shapes)


def test_memory_fs_loading_fetches_only_needed_files(tiny_paths, base):
    fs = fsspec.filesystem("memory")
    fs.put(tiny_paths["svlm"], "/tempo-test-load/svlm", recursive=True)
    fs.put(tiny_paths["tempo"], "/tempo-test-load/tempo", recursive=True)
    comp = Compressor.from_pretrained("memory://tempo-test-load/svlm", memory_tokens="memory://tempo-test-load/tempo",
                                      device="cpu")
    local = Compressor.from_pretrained(tiny_paths["svlm"], memory_tokens=tiny_paths["tempo"], device="cpu")
    assert torch.equal(comp.memory_tokens, local.memory_tokens)
    assert comp.svlm_weights_sha256 == local.svlm_weights_sha256
    assert np.array_equal(comp.compress(SEGS, ["q"]).candidates, local.compress(SEGS, ["q"]).candidates)
    mem = checkpoints.load_memory_tokens("memory://tempo-test-load/tempo", hidden_size=64)
    assert mem.fetched == [_index(tiny_paths["tempo"])[TOKENS_KEY]]


def _tempo_variant(tiny_paths, tmp_path: Path, name: str) -> Path:
    return _copy(tiny_paths["tempo"], tmp_path / name)


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_tempo_errors(tiny_paths, tmp_path):
    svlm = tiny_paths["svlm"]
    shapes = {k: tuple(v.shape) for k, v in load_file(str(Path(svlm) / "model.safetensors")).items()}

    d_mismatch = _tempo_variant(tiny_paths, tmp_path, "d")
    _edit_json(d_mismatch / "config.json", lambda c: c.update(mm_hidden_size=32))
    with pytest.raises(CheckpointFormatError, match="mm_hidden_size 32"):
        checkpoints.load_memory_tokens(d_mismatch, hidden_size=64)

    k_mismatch = _tempo_variant(tiny_paths, tmp_path, "k")
    _edit_json(k_mismatch / "config.json", lambda c: c.update(num_compression_tokens=64))
    with pytest.raises(CheckpointFormatError, match="128 tokens, config says 64"):
        checkpoints.load_memory_tokens(k_mismatch, hidden_size=64)

    bad_shape = _tempo_variant(tiny_paths, tmp_path, "shape")
    _rewrite_tensor(bad_shape, TOKENS_KEY, lambda t: t[0])
    with pytest.raises(CheckpointFormatError, match=r"\(1, K, D\)"):
        checkpoints.load_memory_tokens(bad_shape, hidden_size=64)

    no_tokens = _tempo_variant(tiny_paths, tmp_path, "notokens")
    _edit_json(no_tokens / "model.safetensors.index.json", lambda c: c["weight_map"].pop(TOKENS_KEY))
    with pytest.raises(CheckpointFormatError, match="compression_tokens"):
        checkpoints.load_memory_tokens(no_tokens, hidden_size=64)

    missing_vlm = _tempo_variant(tiny_paths, tmp_path, "missingvlm")
    gone = VLM_PREFIX + "language_model.norm.weight"
    _edit_json(missing_vlm / "model.safetensors.index.json", lambda c: c["weight_map"].pop(gone))
    with pytest.raises(CheckpointFormatError, match="1 missing"):
        checkpoints.load_memory_tokens(missing_vlm, hidden_size=64, svlm_state_shapes=shapes)
    # without SVLM weights requested the same checkpoint loads
    assert checkpoints.load_memory_tokens(missing_vlm, hidden_size=64).tokens.shape == (1, 128, 64)

    vlm_shape = _tempo_variant(tiny_paths, tmp_path, "vlmshape")
    _rewrite_tensor(vlm_shape, VLM_PREFIX + "language_model.norm.weight", lambda t: t[:32])
    with pytest.raises(CheckpointFormatError, match="norm.weight has shape"):
        Compressor.from_pretrained(svlm, memory_tokens=vlm_shape, device="cpu")

    wrong_type = _tempo_variant(tiny_paths, tmp_path, "type")
    _edit_json(wrong_type / "config.json", lambda c: c.update(model_type="llava"))
    with pytest.raises(CheckpointFormatError, match="tempo_qwen"):
        checkpoints.load_memory_tokens(wrong_type, hidden_size=64)

    no_shard = _tempo_variant(tiny_paths, tmp_path, "noshard")
    (no_shard / _index(no_shard)[TOKENS_KEY]).unlink()
    with pytest.raises(CheckpointNotFound, match="missing file"):
        checkpoints.load_memory_tokens(no_shard, hidden_size=64)

    with pytest.raises(CheckpointFormatError, match="hidden size 48"):
        checkpoints.load_memory_tokens(tiny_paths["tempo"], hidden_size=48)


# ----------------------------------------------------------------------------- base SVLM errors
def test_svlm_errors(tiny_paths, tmp_path):
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        Compressor.from_pretrained(tmp_path / "nowhere", device="cpu")

    no_config = _copy(tiny_paths["svlm"], tmp_path / "noconfig")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointNotFound, match="config.json"):
        checkpoints.load_svlm(no_config)

    pickled = _copy(tiny_paths["svlm"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointNotFound, match="pickle"):
        checkpoints.load_svlm(pickled)

    for model_type in ("llama", "qwen2_vl", None):
        other = _copy(tiny_paths["svlm"], tmp_path / f"type_{model_type}")
        _edit_json(other / "config.json", lambda c, mt=model_type: c.update(model_type=mt))
        with pytest.raises(UnsupportedModel, match="not a supported SVLM"):
            checkpoints.load_svlm(other)

    broken_json = _copy(tiny_paths["svlm"], tmp_path / "brokenjson")
    (broken_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        checkpoints.load_svlm(broken_json)


def test_yes_no_must_be_single_tokens(tiny_paths, tmp_path):
    split_yes = _copy(tiny_paths["svlm"], tmp_path / "splityes")

    def drop_yes(doc):
        doc["model"]["vocab"].pop("Yes")
        doc["model"]["merges"] = [m for m in doc["model"]["merges"] if "Yes" not in (m[0], m[1], m[0] + m[1])]

    _edit_json(split_yes / "tokenizer.json", drop_yes)
    with pytest.raises(TokenizerError, match="'Yes' is not a single token"):
        checkpoints.load_svlm(split_yes)


def test_unreachable_url_is_checkpoint_not_found():
    with pytest.raises(CheckpointNotFound):
        checkpoints.load_svlm("memory://tempo-test-nothing-here/svlm")


def test_qwen3_vl_moe_svlm_runs_and_shares_prefixes(tiny_paths, tmp_path):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    cfg = json.loads((Path(tiny_paths["svlm"]) / "config.json").read_text())
    text = {k: v for k, v in cfg["text_config"].items() if k != "model_type"}
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
    vision = {k: v for k, v in cfg["vision_config"].items() if k != "model_type"}
    ids = {k: cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(
        Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    )
    out = tmp_path / "moe"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(tiny_paths["svlm"]) / name, out / name)
    comp = Compressor.from_pretrained(out, device="cpu")
    assert type(comp.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    queries = ["q", "a longer query about the scene"]
    shared, full = comp.compress(SEGS, queries), comp.compress_unshared(SEGS, queries)
    assert shared.candidates.shape == (2, 2, 128, 64)
    assert np.abs(shared.candidates - full.candidates).max() <= 1e-4
    assert np.abs(shared.relevance - full.relevance).max() <= 1e-4
