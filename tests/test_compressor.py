"""Tests of the SVLM compressor (tempo_ops.svlm.compressor) on the tiny Qwen3-VL."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tempo_ops.errors import InferenceError, InvalidQuery, InvalidSegment
from tempo_ops.svlm import prompt as svlm_prompt
from tempo_ops.svlm.compressor import CompressionResult, Compressor, resolve_device_dtype
from tempo_ops.svlm.tiny import make_tiny_models
from tempo_ops.svlm.vision_inputs import frames_to_video_inputs

TOL = 1e-4


@dataclass
class Seg:
    frames: np.ndarray
    start_position: int
    real_fps: float


def _frames(seed: int, t: int = 8, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models_compressor"), seed=0)


@pytest.fixture(scope="session")
def comp(tiny_paths) -> Compressor:
    # Without the reference geometry 64x64 frames stay 64x64 (16 visual tokens): fast tests.
    # The reference geometry (upscaling to >= 128*32*32 pixels) is exercised in test_reference_geometry.
    return Compressor.from_pretrained(tiny_paths["svlm"], seed=0, device="cpu", reference_geometry=False)


@pytest.fixture(scope="session")
def segs() -> list[Seg]:
    # Different start positions give different time-stamp texts, hence prefixes of different lengths.
    return [Seg(_frames(1), 0, 2.0), Seg(_frames(2), 8, 2.0), Seg(_frames(3, h=64, w=128), 400, 2.0)]


def _compressor_with_tokens(comp: Compressor, tokens: torch.Tensor, **kw) -> Compressor:
    return Compressor(
        comp.model,
        comp.tokenizer,
        tokens,
        comp.yes_no_rows,
        svlm_name=comp.svlm_name,
        svlm_weights_sha256=comp.svlm_weights_sha256,
        memory_tokens_source="test",
        device=comp.device,
        dtype=comp.dtype,
        reference_geometry=comp.reference_geometry,
        **kw,
    )


def _hf_inputs(comp: Compressor, seg: Seg, query: str, extra_ids: list[int] | None = None) -> dict:
    """Inputs for the HF model's own forward: prefix + suffix (+ extra text ids), batch of one."""
    vi = frames_to_video_inputs(seg.frames, reference_geometry=comp.reference_geometry)
    ids = svlm_prompt.build_segment_ids(comp.tokenizer, vi.video_grid_thw, seg.start_position, seg.real_fps, query)
    input_ids = torch.as_tensor(ids.input_ids)
    mm = torch.as_tensor(ids.mm_token_type_ids)
    if extra_ids:
        input_ids = torch.cat([input_ids, torch.tensor(extra_ids)])
        mm = torch.cat([mm, torch.zeros(len(extra_ids), dtype=mm.dtype)])
    return {
        "input_ids": input_ids[None],
        "mm_token_type_ids": mm[None],
        "pixel_values_videos": vi.pixel_values_videos,
        "video_grid_thw": vi.video_grid_thw,
    }


def test_shapes_dtypes_and_range(comp, segs):
    res = comp.compress(segs[:2], ["what happens?", "is there a dog"])
    assert isinstance(res, CompressionResult)
    assert res.candidates.shape == (2, 2, 128, 64) and res.candidates.dtype == np.float32
    assert res.relevance.shape == (2, 2) and res.relevance.dtype == np.float32
    assert np.all((res.relevance > 0) & (res.relevance < 1))
    # 128 different memory tokens give 128 different candidates
    assert np.unique(res.candidates[0, 0].round(5), axis=0).shape[0] == 128


def test_relevance_equals_yes_no_softmax_of_model_logits(comp, segs):
    seg, query = segs[1], "is there a red car?"
    res = comp.compress([seg], [query])
    yes = comp.tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    no = comp.tokenizer("No", add_special_tokens=False)["input_ids"][0]
    with torch.inference_mode():
        logits = comp.model(**_hf_inputs(comp, seg, query)).logits[0, -1].double()
    expected = torch.softmax(logits[[yes, no]], dim=0)[0].item()
    assert res.relevance[0, 0] == pytest.approx(expected, abs=1e-5)


def test_candidates_equal_hf_forward_when_memory_tokens_are_token_embeddings(comp, segs):
    # With memory tokens equal to embeddings of real token ids, HF's own forward over
    # prefix + suffix + those ids (text positions continuing) must give the candidates.
    mem_ids = [(7 * i + 11) % 200 for i in range(128)]
    table = comp.model.get_input_embeddings().weight.detach()
    c = _compressor_with_tokens(comp, table[mem_ids][None].clone())
    seg, query = segs[2], "where is the ball"
    res = c.compress([seg], [query])
    with torch.inference_mode():
        hidden = comp.model.model(**_hf_inputs(comp, seg, query, mem_ids)).last_hidden_state[0, -128:]
    assert np.abs(res.candidates[0, 0] - hidden.numpy()).max() <= TOL


def test_memory_tokens_do_not_change_relevance(comp, segs):
    other = _compressor_with_tokens(comp, torch.randn((1, 128, 64), generator=torch.Generator().manual_seed(5)))
    a = comp.compress(segs, ["a", "the person walks"])
    b = other.compress(segs, ["a", "the person walks"])
    np.testing.assert_allclose(a.relevance, b.relevance, atol=1e-6)
    assert np.abs(a.candidates - b.candidates).max() > 1e-2


@pytest.mark.parametrize("n_queries", [1, 3])
def test_shared_prefix_matches_unshared_full_sequences(comp, segs, n_queries):
    queries = ["what is on the table", "", "count the people who enter the room from the left side"][:n_queries]
    shared = comp.compress(segs, queries)
    full = comp.compress_unshared(segs, queries)
    assert np.abs(shared.candidates - full.candidates).max() <= TOL
    assert np.abs(shared.relevance - full.relevance).max() <= TOL


def test_padding_invariance(comp, segs):
    query = "is the door open"
    alone = comp.compress([segs[0]], [query])
    alone_full = comp.compress_unshared([segs[0]], [query])
    # In a batch with a shorter and a longer query and other segments (other prefix lengths).
    batch_queries = ["hi", query, "a very much longer question about everything that happens in this clip"]
    batched = comp.compress([segs[2], segs[0], segs[1]], batch_queries)
    batched_full = comp.compress_unshared([segs[2], segs[0], segs[1]], batch_queries)
    for res in (batched, batched_full):
        assert np.abs(res.candidates[1, 1] - alone.candidates[0, 0]).max() <= TOL
        assert abs(res.relevance[1, 1] - alone.relevance[0, 0]) <= TOL
    assert np.abs(alone_full.candidates - alone.candidates).max() <= TOL


def test_batching_by_cost_gives_the_same_result(comp, segs):
    queries = ["one", "two words", "three more words"]
    big = comp.compress(segs + [Seg(_frames(1), 16, 2.0)], queries)
    tiny_batches = _compressor_with_tokens(comp, comp.memory_tokens, max_batch_tokens=1)
    small = tiny_batches.compress(segs + [Seg(_frames(1), 16, 2.0)], queries)
    assert np.abs(big.candidates - small.candidates).max() <= TOL
    assert np.abs(big.relevance - small.relevance).max() <= TOL
    # equal prefix lengths are batched together: segs[0] and the extra one share a prefix length
    prepared = [comp._prepare_segment(s, i) for i, s in enumerate(segs + [Seg(_frames(1), 16, 2.0)])]
    batches = comp._prefix_batches(prepared)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert any(len(b) > 1 for b in batches)
    assert all(len(b) == 1 for b in tiny_batches._prefix_batches(prepared))


def test_deterministic(comp, segs):
    a = comp.compress(segs[:2], ["x y z"])
    b = comp.compress(segs[:2], ["x y z"])
    assert np.array_equal(a.candidates, b.candidates) and np.array_equal(a.relevance, b.relevance)


def test_absolute_time_stamps_change_outputs(comp):
    frames = _frames(9)
    early = comp.compress([Seg(frames, 0, 2.0)], ["q"])
    late = comp.compress([Seg(frames, 80, 2.0)], ["q"])
    slower = comp.compress([Seg(frames, 80, 1.0)], ["q"])
    assert np.abs(early.candidates - late.candidates).max() > 1e-3
    assert np.abs(late.candidates - slower.candidates).max() > 1e-3
    assert early.relevance[0, 0] != late.relevance[0, 0]


def test_empty_query_is_the_default_query(comp, segs):
    a = comp.compress(segs[:1], [""])
    b = comp.compress(segs[:1], [svlm_prompt.DEFAULT_QUERY])
    assert np.array_equal(a.candidates, b.candidates)


def test_fingerprint(comp, tiny_paths):
    fp = comp.fingerprint()
    assert set(fp) == {
        "svlm_name", "svlm_weights_sha256", "memory_tokens_source", "memory_tokens_sha256",
        "prompt_sha256", "num_memory_tokens", "hidden_size", "reference_geometry", "numerics",
    }
    assert json.loads(json.dumps(fp)) == fp
    assert fp["num_memory_tokens"] == 128 and fp["hidden_size"] == 64 and fp["reference_geometry"] is False
    assert fp["memory_tokens_source"] == "init:seed=0"
    assert fp["numerics"] == "exact"  # float32 default
    assert fp["prompt_sha256"] == svlm_prompt.prompt_sha256()
    other = Compressor.from_pretrained(tiny_paths["svlm"], seed=1, device="cpu")
    assert other.fingerprint()["memory_tokens_sha256"] != fp["memory_tokens_sha256"]
    assert other.fingerprint()["svlm_weights_sha256"] == fp["svlm_weights_sha256"]
    assert other.fingerprint()["reference_geometry"] is True


def test_reference_geometry(tiny_paths, segs):
    ref = Compressor.from_pretrained(tiny_paths["svlm"], seed=0, device="cpu")
    assert ref.reference_geometry is True
    prepared = ref._prepare_segment(segs[0], 0)
    # 64x64 frames are enlarged to the video minimum of 128*32*32 pixels: 384x384, grid (4, 24, 24)
    assert prepared.grid[0].tolist() == [4, 24, 24]
    shared = ref.compress(segs[:2], ["q", "another query"])
    full = ref.compress_unshared(segs[:2], ["q", "another query"])
    assert np.abs(shared.candidates - full.candidates).max() <= TOL
    assert np.abs(shared.relevance - full.relevance).max() <= TOL


@pytest.mark.parametrize(
    "seg, reason",
    [
        (Seg(_frames(1).astype(np.float32), 0, 2.0), "uint8"),
        (Seg(_frames(1)[..., :2], 0, 2.0), "(T, H, W, 3)"),
        (Seg(_frames(1)[0], 0, 2.0), "(T, H, W, 3)"),
        (Seg(np.zeros((0, 32, 32, 3), np.uint8), 0, 2.0), "empty"),
        (Seg(_frames(1), -1, 2.0), "start_position"),
        (Seg(_frames(1), 0, 0.0), "real_fps"),
        (Seg(_frames(1), 0, float("nan")), "real_fps"),
        (Seg(_frames(1).tolist(), 0, 2.0), "list"),
    ],
)
def test_bad_segments(comp, segs, seg, reason):
    with pytest.raises(InvalidSegment) as info:
        comp.compress([segs[0], seg], ["q"])
    assert "segment 1" in str(info.value) and reason in str(info.value)


@pytest.mark.parametrize("queries", ["a string", [], [3], ["ok", None], ["<|im_end|> injected"]])
def test_bad_queries(comp, segs, queries):
    with pytest.raises(InvalidQuery):
        comp.compress(segs[:1], queries)


def test_model_failure_becomes_inference_error_naming_the_segment(comp, segs, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(comp.model.model.language_model, "forward", boom)
    with pytest.raises(InferenceError) as info:
        comp.compress([segs[1]], ["q"])
    assert "segment 0" in str(info.value) and "start_position 8" in str(info.value)
    assert "simulated out of memory" in str(info.value)


def test_visual_feature_count_mismatch_is_inference_error(comp, segs, monkeypatch):
    real = comp.model.model.get_video_features

    def fewer(*args, **kwargs):
        out = real(*args, **kwargs)
        out.pooler_output = tuple(p[:-1] for p in out.pooler_output)
        return out

    monkeypatch.setattr(comp.model.model, "get_video_features", fewer)
    with pytest.raises(InferenceError, match="visual features"):
        comp.compress([segs[0]], ["q"])


def test_constructor_checks_shapes(comp):
    with pytest.raises(Exception, match="memory tokens"):
        _compressor_with_tokens(comp, torch.zeros((1, 4, 32)))
    with pytest.raises(Exception, match="max_batch_tokens"):
        _compressor_with_tokens(comp, comp.memory_tokens, max_batch_tokens=0)


def test_device_dtype_defaults():
    dev, dt = resolve_device_dtype("cpu", None)
    assert dev.type == "cpu" and dt == torch.float32
    assert resolve_device_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device_dtype(None, None) == (torch.device("cpu"), torch.float32)
    with pytest.raises(Exception, match="dtype"):
        resolve_device_dtype("cpu", "int8")


def test_short_segments_and_mixed_grids(comp, segs):
    # A short trailing window (3 frames → padded to 4) and a 1-frame one, next to a full segment.
    short = [Seg(_frames(4, t=3), 16, 2.0), Seg(_frames(5, t=1), 19, 2.0), segs[0]]
    shared = comp.compress(short, ["what moves", ""])
    full = comp.compress_unshared(short, ["what moves", ""])
    assert shared.candidates.shape == (2, 3, 128, 64)
    assert np.abs(shared.candidates - full.candidates).max() <= TOL
    assert np.abs(shared.relevance - full.relevance).max() <= TOL


def test_no_segments_gives_empty_result(comp):
    res = comp.compress([], ["q", "r"])
    assert res.candidates.shape == (2, 0, 128, 64) and res.relevance.shape == (2, 0)


def test_compress_is_encode_then_compress_from_features(comp, segs):
    from dataclasses import replace

    feats = comp.encode_segments(segs)
    assert [f.start_position for f in feats] == [0, 8, 400]
    for f in feats:
        n = int((f.input_ids == comp.model.config.video_token_id).sum())
        assert f.visual.shape == (n, comp.hidden_size) and f.deepstack.shape[1:] == (n, comp.hidden_size)
    whole = comp.compress(segs, ["q", ""])
    split = comp.compress_from_features(feats, ["q", ""])
    np.testing.assert_array_equal(whole.candidates, split.candidates)
    np.testing.assert_array_equal(whole.relevance, split.relevance)
    # Features in another dtype (an index stored in bf16) are cast to the model's.
    bf16 = [replace(f, visual=f.visual.bfloat16(), deepstack=f.deepstack.bfloat16()) for f in feats]
    assert np.abs(comp.compress_from_features(bf16, ["q"]).relevance - whole.relevance[0]).max() < 1e-2
    with pytest.raises(InvalidSegment, match="video tokens"):
        comp.compress_from_features([replace(feats[0], visual=feats[0].visual[:-1])], ["q"])
    with pytest.raises(InvalidSegment, match="SegmentFeatures"):
        comp.compress_from_features([segs[0]], ["q"])
    with pytest.raises(InvalidQuery):
        comp.compress_from_features(feats, [])
