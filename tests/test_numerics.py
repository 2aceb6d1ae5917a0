"""Reference numerics (tempo_ops/numerics.py): each bf16 piece against a hand-computed result.

The hand computations round to bf16 with integer bit arithmetic (round to nearest, ties to
even) in numpy, independently of torch's conversion.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tempo_ops import numerics as num
from tempo_ops.errors import ConfigError
from tempo_ops.svlm.compressor import Compressor
from tempo_ops.svlm.vision_inputs import frames_to_video_inputs


def bf16(x) -> np.ndarray:
    """float32 → nearest bf16 (ties to even), returned as float32 — by hand, on the bit pattern."""
    bits = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def test_hand_bf16_matches_known_values():
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: goes to even (1); 1 + 3·2^-8 → 1 + 2^-6.
    np.testing.assert_array_equal(bf16([1 + 2**-8, 1 + 3 * 2**-8, 0.1]), np.float32([1.0, 1 + 2**-6, 0.10009765625]))


@pytest.fixture(scope="module")
def exact(tiny_models):
    return Compressor.from_pretrained(tiny_models["svlm"], memory_tokens=tiny_models["tempo"], device="cpu", reference_geometry=False)


@pytest.fixture(scope="module")
def reference(tiny_models):
    return Compressor.from_pretrained(
        tiny_models["svlm"], memory_tokens=tiny_models["tempo"], device="cpu", reference_geometry=False, numerics="reference"
    )


def _file_state(tiny_models) -> dict[str, torch.Tensor]:
    from pathlib import Path

    state = {}
    for f in sorted(Path(tiny_models["svlm"]).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_default_mode_follows_dtype_and_unknown_is_an_error():
    assert num.resolve_numerics(None, torch.bfloat16) == "reference"
    assert num.resolve_numerics(None, torch.float32) == "exact"
    assert num.resolve_numerics(None, torch.float16) == "exact"
    assert num.resolve_numerics("exact", torch.bfloat16) == "exact"
    with pytest.raises(ConfigError, match="unknown numerics 'fast'"):
        num.resolve_numerics("fast", torch.float32)


def test_text_and_vision_rope_inv_freq_rounded_to_bf16(exact, reference):
    text_cfg = exact.model.config.text_config
    dim = text_cfg.head_dim
    fp32 = 1.0 / (text_cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    ex_inv = exact.model.model.language_model.rotary_emb.inv_freq
    ref_inv = reference.model.model.language_model.rotary_emb.inv_freq
    assert torch.equal(ex_inv, fp32)  # exact mode: untouched float32
    assert ref_inv.dtype == torch.float32
    assert torch.equal(ref_inv, torch.tensor(fp32.tolist()).to(torch.bfloat16).float())
    np.testing.assert_array_equal(ref_inv.numpy(), bf16(fp32.numpy()))
    assert not torch.equal(ref_inv, fp32)  # the rounding really changes values here
    vis = reference.model.model.visual.rotary_pos_emb
    np.testing.assert_array_equal(vis.inv_freq.numpy(), bf16(exact.model.model.visual.rotary_pos_emb.inv_freq.numpy()))


def test_round_rope_inv_freq_is_idempotent_and_reports_modules(tiny_models):
    import transformers

    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_models["svlm"], dtype=torch.float32)
    names = num.round_rope_inv_freq_bf16(model)
    assert set(names) == {"model.visual.rotary_pos_emb", "model.language_model.rotary_emb"}
    once = model.model.language_model.rotary_emb.inv_freq.clone()
    num.round_rope_inv_freq_bf16(model)
    assert torch.equal(once, model.model.language_model.rotary_emb.inv_freq)
    assert torch.equal(model.model.language_model.rotary_emb.original_inv_freq, once)


def test_vision_rope_angles_are_a_bf16_outer_product():
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float) / 8))
    pos = torch.arange(0, 300, 7)  # includes integers above 256, not exact in bf16
    got = num.reference_vision_rope_angles(pos, inv)
    assert got.dtype == torch.bfloat16
    hand = bf16(bf16(pos.numpy().astype(np.float32))[:, None] * bf16(inv.numpy())[None, :])
    np.testing.assert_array_equal(got.float().numpy(), hand)
    # 4.57's own formula: outer(arange(n, dtype=bf16), inv_freq.bf16)[p]
    table = torch.outer(torch.arange(300, dtype=torch.bfloat16), inv.to(torch.bfloat16))
    assert torch.equal(got, table[pos])


def _hand_bilinear(table: np.ndarray, t: int, h: int, w: int, side: int, merge: int) -> np.ndarray:
    """4.57's fast_pos_embed_interpolate with explicit bf16 rounding of weights, products and each add."""
    rows = bf16(table)
    hs = torch.linspace(0, side - 1, h).numpy()  # the reference's own coordinates (float32 linspace)
    ws = torch.linspace(0, side - 1, w).numpy()
    out = np.zeros((h, w, table.shape[1]), np.float32)
    for i in range(h):
        for j in range(w):
            h0, w0 = int(hs[i]), int(ws[j])
            h1, w1 = min(h0 + 1, side - 1), min(w0 + 1, side - 1)
            dh, dw = np.float32(hs[i] - h0), np.float32(ws[j] - w0)
            one = np.float32(1)
            taps = [(h0, w0, (one - dh) * (one - dw)), (h0, w1, (one - dh) * dw), (h1, w0, dh * (one - dw)), (h1, w1, dh * dw)]
            acc = None
            for hi, wi, weight in taps:
                term = bf16(rows[hi * side + wi] * bf16(np.float32(weight)))
                acc = term if acc is None else bf16(acc + term)
            out[i, j] = acc
    # merge-block order, frames repeated
    blocks = out.reshape(h // merge, merge, w // merge, merge, -1).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)
    return np.tile(blocks, (t, 1))


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(2, 6, 4), (1, 2, 10)]])
def test_pos_embed_interpolation_matches_hand_written_bf16_bilinear(grids):
    side, c = 6, 5
    table = torch.randn((side * side, c), generator=torch.Generator().manual_seed(0)) * 3
    got = num.reference_pos_embed_interpolate(table, torch.tensor(grids), side, 2)
    assert got.dtype == torch.bfloat16 and got.shape == (sum(t * h * w for t, h, w in grids), c)
    hand = np.concatenate([_hand_bilinear(table.numpy(), t, h, w, side, 2) for t, h, w in grids])
    np.testing.assert_array_equal(got.float().numpy(), hand)
    # The bf16 sum differs from a float32 interpolation (what transformers 5.x computes).
    assert not np.array_equal(hand, np.concatenate([_f32_bilinear(table.numpy(), g, side) for g in grids]))


def _f32_bilinear(table, g, side):
    t, h, w = g
    hs, ws = torch.linspace(0, side - 1, h).numpy(), torch.linspace(0, side - 1, w).numpy()
    out = np.zeros((h, w, table.shape[1]), np.float32)
    for i in range(h):
        for j in range(w):
            h0, w0 = int(hs[i]), int(ws[j])
            h1, w1 = min(h0 + 1, side - 1), min(w0 + 1, side - 1)
            dh, dw = hs[i] - h0, ws[j] - w0
            out[i, j] = (table[h0 * side + w0] * (1 - dh) * (1 - dw) + table[h0 * side + w1] * (1 - dh) * dw
                         + table[h1 * side + w0] * dh * (1 - dw) + table[h1 * side + w1] * dh * dw)
    return np.tile(out.reshape(h // 2, 2, w // 2, 2, -1).transpose(0, 2, 1, 3, 4).reshape(h * w, -1), (t, 1))


def test_relevance_direction_subtracted_in_bf16():
    rows = torch.randn((2, 64), generator=torch.Generator().manual_seed(1))
    rows[0, 0], rows[1, 0] = 1.0, 1.0 - 2**-10  # the bf16 difference is 2^-7 rounding away the small part
    ref = num.relevance_direction(rows, "reference")
    assert ref.dtype == torch.float32
    r = rows.numpy()
    np.testing.assert_array_equal(ref.numpy(), bf16(bf16(r[0]) - bf16(r[1])))
    np.testing.assert_array_equal(num.relevance_direction(rows, "exact").numpy(), r[0] - r[1])
    assert ref[0] == 0.0 and num.relevance_direction(rows, "exact")[0] == 2**-10


def test_reference_load_passes_weights_through_fp16(tiny_models, exact, reference):
    state = _file_state(tiny_models)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    params = dict(reference.model.named_parameters())
    assert params[name].dtype == torch.float32
    assert torch.equal(params[name], state[name].to(torch.float16).float())
    assert not torch.equal(params[name], state[name])
    assert torch.equal(dict(exact.model.named_parameters())[name], state[name])  # exact: as stored
    # memory tokens: the float32 master stays as stored, the copy the model reads is fp16-rounded
    assert torch.equal(reference.memory_tokens, exact.memory_tokens)
    assert torch.equal(reference._memory_on_device, exact.memory_tokens[0].to(torch.float16).float())
    assert torch.equal(reference.yes_no_rows, exact.yes_no_rows.to(torch.float16).float())


def test_bf16_run_rounds_weights_via_fp16(tiny_models):
    bf = Compressor.from_pretrained(tiny_models["svlm"], device="cpu", dtype=torch.bfloat16, reference_geometry=False)
    assert bf.numerics == "reference" and bf.model.dtype == torch.bfloat16
    state = _file_state(tiny_models)
    name = "model.visual.blocks.0.attn.qkv.weight"
    expected = state[name].to(torch.float16).to(torch.bfloat16)
    assert torch.equal(dict(bf.model.named_parameters())[name], expected)
    inv = bf.model.model.language_model.rotary_emb.inv_freq
    np.testing.assert_array_equal(inv.float().numpy(), bf16(exact_inv_freq(bf.model.config.text_config)))


def exact_inv_freq(text_cfg) -> np.ndarray:
    dim = text_cfg.head_dim
    return (1.0 / (text_cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).numpy()


def _block_inputs(model, pixels, grid):
    """(hidden states, (cos, sin)) entering the first vision block."""
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0].clone()
        seen["pe"] = tuple(x.clone() for x in kwargs["position_embeddings"])

    handle = model.model.visual.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.model.get_video_features(pixels, grid, return_dict=True)
    finally:
        handle.remove()
    return seen["hidden"], seen["pe"]


def test_vision_hooks_feed_reference_pos_embeds_and_rope(exact, reference):
    frames = np.random.default_rng(0).integers(0, 256, (2, 96, 64, 3), dtype=np.uint8)
    vi = frames_to_video_inputs(frames, reference_geometry=False)
    pixels = torch.as_tensor(np.asarray(vi.pixel_values_videos))
    grid = torch.as_tensor(np.asarray(vi.video_grid_thw)).reshape(1, 3)
    visual = reference.model.model.visual
    hidden, (cos, sin) = _block_inputs(reference.model, pixels, grid)
    with torch.inference_mode():
        patches = visual.patch_embed(pixels)  # (the hook adds the embeddings only inside a vision forward)
    pos = num.reference_pos_embed_interpolate(visual.pos_embed.weight, grid, visual.num_grid_per_side, 2)
    assert torch.equal(hidden, patches + pos.float())
    # rope: cos/sin of the bf16 angle table of the positions the tower asked for, in its [h, w, h, w] layout
    rot = visual.rotary_pos_emb
    asked = {}
    def ask(module, args):
        asked["pos"] = args[1].clone()

    handle = rot.register_forward_pre_hook(ask)
    try:
        _block_inputs(reference.model, pixels, grid)
    finally:
        handle.remove()
    angles = num.reference_vision_rope_angles(asked["pos"], rot.inv_freq)
    assert torch.equal(cos, rot.recomposition_frequencies(angles.cos()).float())
    assert torch.equal(sin, rot.recomposition_frequencies(angles.sin()).float())
    np.testing.assert_array_equal(cos.numpy(), bf16(cos.numpy()))  # every value is a bf16 value
    ex_hidden, (ex_cos, _) = _block_inputs(exact.model, pixels, grid)
    assert ex_cos.dtype == torch.float32 and not torch.equal(cos, ex_cos)
    assert torch.allclose(cos, ex_cos, atol=2e-2)
    assert not torch.equal(hidden, ex_hidden)


def test_exact_mode_has_no_hooks_and_reference_mode_changes_outputs_slightly(exact, reference):
    assert exact._numerics_hooks is None and not exact.model.model.visual._forward_pre_hooks
    assert reference._numerics_hooks is not None
    seg = SimpleNamespace(frames=np.random.default_rng(2).integers(0, 256, (8, 64, 96, 3), dtype=np.uint8), start_position=0, real_fps=2.0)
    a = exact.compress([seg], ["what?"])
    b = reference.compress([seg], ["what?"])
    c = reference.compress_unshared([seg], ["what?"])
    assert 0 < np.abs(a.candidates - b.candidates).max() < 0.1
    np.testing.assert_allclose(b.candidates, c.candidates, atol=1e-5)  # shared prefix path unaffected by the hooks
    np.testing.assert_allclose(b.relevance, c.relevance, atol=1e-6)


def test_fingerprint_records_numerics(exact, reference):
    assert exact.fingerprint()["numerics"] == "exact"
    assert reference.fingerprint()["numerics"] == "reference"
    rest = {k: v for k, v in reference.fingerprint().items() if k != "numerics"}
    assert rest == {k: v for k, v in exact.fingerprint().items() if k != "numerics"}


def test_unknown_numerics_is_refused(tiny_models):
    with pytest.raises(ConfigError, match="numerics"):
        Compressor.from_pretrained(tiny_models["svlm"], device="cpu", numerics="fast")
