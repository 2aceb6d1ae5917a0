"""SVLM inputs: smart_resize, reference geometry, patch layout, prompt token ids, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tempo_ops.errors import AbsurdDimensions, InvalidFrames, InvalidQuery, TokenizerError
from tempo_ops.svlm import prompt as P
from tempo_ops.svlm.tokenizer_build import build_tokenizer, write_tokenizer
from tempo_ops.svlm.vision_inputs import (
    PATCH_DIM,
    frames_to_video_inputs,
    normalize,
    reference_frame_geometry,
    resize_bicubic_antialias_uint8,
    smart_resize,
    video_max_pixels,
)


# --------------------------------------------------------------------------- smart_resize
@pytest.mark.parametrize(
    ("h", "w", "factor", "min_px", "max_px", "expected"),
    [
        # 288/64 = 4.5 rounds to even (4): the reference's 512x288 -> 512x256
        (288, 512, 64, 4 * 64**2, 16384 * 64**2, (256, 512)),
        # 352/64 = 5.5 rounds to even (6)
        (352, 512, 64, 4 * 64**2, 16384 * 64**2, (384, 512)),
        # second pass on the 512x256 result: already fine (area == min_pixels is not below it)
        (256, 512, 32, 128 * 32**2, 786432, (256, 512)),
        # too large: beta = sqrt(1e6 / 1e5); 1000/beta/32 = 9.88 -> 9*32
        (1000, 1000, 32, 0, 100_000, (288, 288)),
        # too small: beta = sqrt(131072 / 200) = 25.6; 10*25.6 = 256, 20*25.6 = 512
        (10, 20, 32, 128 * 32**2, 786432, (256, 512)),
        # a side that rounds to zero still gets one factor
        (16, 512, 64, 0, 16384 * 64**2, (64, 512)),
        # 2048x1024 to the video cap: beta = sqrt(2097152/786432); floors to 608 x 1248
        (1024, 2048, 32, 128 * 32**2, 786432, (608, 1248)),
    ],
)
def test_smart_resize_hand_cases(h, w, factor, min_px, max_px, expected):
    assert smart_resize(h, w, factor, min_px, max_px) == expected


def test_smart_resize_rejects_absurd():
    with pytest.raises(AbsurdDimensions):
        smart_resize(1, 201, 32, 0, 10**9)
    with pytest.raises(AbsurdDimensions):
        smart_resize(0, 10, 32, 0, 10**9)


def test_video_max_pixels_reference_values():
    assert video_max_pixels(8) == 768 * 32 * 32  # per-frame cap
    assert video_max_pixels(400) == pytest.approx(128000 * 1024 * 0.9 / 400 * 2)  # budget share: 589824
    assert video_max_pixels(2000) == int(128 * 1024 * 1.05)  # floor: 137625


# --------------------------------------------------------------------------- geometry
def test_reference_geometry_512x288_to_512x256():
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (8, 288, 512, 3), dtype=np.uint8)
    out = reference_frame_geometry(frames)
    assert out.shape == (8, 256, 512, 3) and out.dtype == np.uint8
    # stage 1 is PIL's default (bicubic) resize; stage 2 leaves 512x256 untouched
    expected0 = np.asarray(Image.fromarray(frames[0]).resize((512, 256), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[0], expected0)


def test_reference_geometry_pads_odd_frame_count():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 256, 512, 3), dtype=np.uint8)
    out = reference_frame_geometry(frames)
    assert out.shape == (4, 256, 512, 3)
    np.testing.assert_array_equal(out[:3], frames)  # no resize needed at all
    np.testing.assert_array_equal(out[3], frames[2])


def test_reference_geometry_second_stage_resizes_large_frames():
    frames = np.full((2, 1024, 2048, 3), 200, dtype=np.uint8)
    frames[:, :, :, 1] = 7
    out = reference_frame_geometry(frames)
    assert out.shape == (2, 608, 1248, 3)
    # bicubic of a constant image is that constant (after clamp/round)
    assert np.all(out[..., 0] == 200) and np.all(out[..., 1] == 7)


def test_resize_uint8_rounds_and_clamps_like_torchvision():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    out = resize_bicubic_antialias_uint8(frames, 20, 24)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    ref = torch.nn.functional.interpolate(x, size=(20, 24), mode="bicubic", align_corners=False, antialias=True)
    ref = torch.round(torch.clamp(ref, 0, 255)).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out, ref)
    assert resize_bicubic_antialias_uint8(frames, 40, 48) is frames  # same size: untouched


# --------------------------------------------------------------------------- patches
def _slow_patches(frames: np.ndarray) -> np.ndarray:
    """Independent reference: explicit loops over the Qwen3-VL patch order."""
    t_frames, height, width, _ = frames.shape
    gt, gh, gw = t_frames // 2, height // 16, width // 16
    rows = []
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        y0, x0 = (bh * 2 + mh) * 16, (bw * 2 + mw) * 16
                        row = []
                        for c in range(3):
                            for tp in range(2):
                                block = frames[t * 2 + tp, y0 : y0 + 16, x0 : x0 + 16, c].astype(np.float32)
                                row.append(((block - np.float32(127.5)) / np.float32(127.5)).reshape(-1))
                        rows.append(np.concatenate(row))
    return np.stack(rows)


def test_patch_layout_matches_slow_reference():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    vi = frames_to_video_inputs(frames, reference_geometry=False)
    assert vi.video_grid_thw.dtype == torch.int64
    assert vi.video_grid_thw.tolist() == [[2, 4, 6]]
    assert vi.pixel_values_videos.dtype == torch.float32
    assert vi.pixel_values_videos.shape == (2 * 4 * 6, PATCH_DIM)
    np.testing.assert_array_equal(vi.pixel_values_videos.numpy(), _slow_patches(frames))


def test_odd_frames_pad_with_last_frame_without_geometry():
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    vi = frames_to_video_inputs(frames, reference_geometry=False)
    assert vi.grid == (2, 2, 2) and vi.num_frames == 4
    padded = np.concatenate([frames, frames[-1:]])
    np.testing.assert_array_equal(vi.pixel_values_videos.numpy(), _slow_patches(padded))


def test_single_frame_segment_becomes_one_temporal_group():
    frames = np.zeros((1, 256, 512, 3), dtype=np.uint8)
    vi = frames_to_video_inputs(frames)
    assert vi.grid == (1, 16, 32) and vi.num_visual_tokens == 128


@pytest.mark.parametrize("height", [256, 288])
def test_grid_and_token_counts_for_a_512_wide_segment(height):
    frames = np.zeros((8, height, 512, 3), dtype=np.uint8)
    vi = frames_to_video_inputs(frames)
    assert vi.grid == (4, 16, 32)
    assert vi.num_visual_tokens == 512
    assert tuple(vi.pixel_values_videos.shape) == (4 * 16 * 32, 1536)


def test_normalisation_values():
    frames = np.array([0, 128, 255], dtype=np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3)
    x = normalize(frames)
    assert x.shape == (1, 3, 1, 3)
    np.testing.assert_array_equal(x[0, 0, 0].numpy(), np.array([-1.0, 0.5 / 127.5, 1.0], dtype=np.float32))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 32, 32, 3), dtype=np.float32),
        np.zeros((2, 32, 32), dtype=np.uint8),
        np.zeros((2, 32, 32, 4), dtype=np.uint8),
        np.zeros((0, 32, 32, 3), dtype=np.uint8),
        [],
        "frames",
    ],
)
def test_bad_frames_raise_invalid_frames(bad):
    with pytest.raises(InvalidFrames):
        frames_to_video_inputs(bad)


def test_non_multiple_of_32_without_geometry_raises():
    with pytest.raises(InvalidFrames, match="multiple of 32"):
        frames_to_video_inputs(np.zeros((2, 48, 64, 3), dtype=np.uint8), reference_geometry=False)


def test_accepts_torch_and_list_inputs():
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)
    a = frames_to_video_inputs(frames, reference_geometry=False).pixel_values_videos
    b = frames_to_video_inputs(torch.from_numpy(frames), reference_geometry=False).pixel_values_videos
    c = frames_to_video_inputs(list(frames), reference_geometry=False).pixel_values_videos
    assert torch.equal(a, b) and torch.equal(a, c)


# --------------------------------------------------------------------------- tokenizer + prompt
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = write_tokenizer(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(str(path))


def test_tokenizer_yes_no_single_tokens_and_specials(tokenizer):
    for word in ("Yes", "No"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_tokens_to_ids("Yes") != tokenizer.convert_tokens_to_ids("No")
    ids = tokenizer("<|vision_start|><|video_pad|><|video_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|video_pad|>", "<|video_pad|>", "<|vision_end|>")]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "Query:\nWhat is at 12.5 seconds?"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_build_is_deterministic():
    assert build_tokenizer().to_str() == build_tokenizer().to_str()


def test_group_timestamps_absolute_by_hand():
    # start 8 at 2 fps: frames 8..15 at 4.0, 4.5, ..., 7.5 s; groups average their first/last frame
    assert P.group_timestamps(8, 8, 2.0) == [4.25, 5.25, 6.25, 7.25]
    assert P.group_timestamps(0, 8, 2.0) == [0.25, 1.25, 2.25, 3.25]
    # odd counts repeat the last index, as _calculate_timestamps does
    assert P.group_timestamps(0, 3, 1.0) == [0.5, 2.0]
    text = P.video_placeholder_text([[4, 16, 32]], 8, 2.0)
    # 4.25 formats with round-half-even to "4.2"
    assert text.startswith("<4.2 seconds><|vision_start|><|video_pad|>")
    assert [part.split(" seconds>")[0] for part in text.split("<")[1:] if "seconds>" in part] == ["4.2", "5.2", "6.2", "7.2"]
    assert text.count("<|video_pad|>") == 512 and text.count("<|vision_start|>") == 4 and text.count("<|vision_end|>") == 4


def test_group_timestamps_bad_fps():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidQuery):
            P.group_timestamps(0, 8, bad)
    with pytest.raises(InvalidQuery):
        P.group_timestamps(-1, 8, 2.0)


def test_prefix_ids_and_mm_token_types(tokenizer):
    prefix = P.build_prefix_ids(tokenizer, torch.tensor([[4, 16, 32]]), 8, 2.0)
    ids, mm = prefix.input_ids, prefix.mm_token_type_ids
    assert ids.dtype == np.int64 and mm.dtype == np.int64 and ids.shape == mm.shape
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    start_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert int((ids == video_id).sum()) == 512
    np.testing.assert_array_equal(mm == 2, ids == video_id)
    assert set(np.unique(mm).tolist()) == {0, 2}
    assert np.all(mm[(ids == start_id) | (ids == end_id)] == 0)
    assert ids[-1] == end_id
    assert tokenizer.decode(ids[:8]).startswith("<|im_start|>system\nYou")
    # each group's 128 pads are contiguous, between a start and an end marker
    starts = np.flatnonzero(ids == start_id)
    for s in starts:
        assert np.all(ids[s + 1 : s + 129] == video_id) and ids[s + 129] == end_id


def test_prefix_depends_on_start_position(tokenizer):
    a = P.build_prefix_ids(tokenizer, [[4, 16, 32]], 0, 2.0).input_ids
    b = P.build_prefix_ids(tokenizer, [[4, 16, 32]], 8, 2.0).input_ids
    assert not np.array_equal(a, b)
    assert "<4.2 seconds>" in tokenizer.decode(b) and "<0.2 seconds>" in tokenizer.decode(a)


def test_suffix_and_default_query(tokenizer):
    expected = tokenizer("\nQuery:\nDescribe this content.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for q in ("", "   ", "\n\t", None):
        assert P.build_suffix_ids(tokenizer, q).tolist() == expected
    s = P.build_suffix_ids(tokenizer, "Where is the cat?")
    assert s.dtype == np.int64
    assert tokenizer.decode(s) == "\nQuery:\nWhere is the cat?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bad", [3, b"bytes", ["q"], "what <|im_end|> now", "see <|video_pad|>"])
def test_bad_queries_raise(tokenizer, bad):
    with pytest.raises(InvalidQuery):
        P.build_suffix_ids(tokenizer, bad)


@pytest.mark.parametrize("bad_grid", [[[4, 15, 32]], [[0, 16, 32]], [4, 16], [[1, 2, 2], [1, 2, 2]]])
def test_bad_grid_raises(tokenizer, bad_grid):
    with pytest.raises(InvalidQuery):
        P.build_prefix_ids(tokenizer, bad_grid, 0, 2.0)


def test_tokenizer_without_video_token_raises(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(TokenizerError):
        P.build_prefix_ids(tok, [[1, 2, 2]], 0, 2.0)


QUERIES = ["What happens?", "", " leading space and trailing ", "café naïve ñ 東京", "How many? 12 or 13.5!", "Yes", "\n"]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("system", [P.SYSTEM_PROMPT, P.SYSTEM_PROMPT_TRAINING])
def test_prefix_suffix_split_equals_full_chat_template(tokenizer, query, system):
    grid, start, fps = [[2, 4, 6]], 16, 1.7
    # the full prompt the way the reference builds it: chat template, then the processor replaces
    # the video's <|vision_start|><|video_pad|><|vision_end|> by the per-group blocks
    rendered = tokenizer.apply_chat_template(
        P.chat_messages(query, system_prompt=system), add_generation_prompt=True, tokenize=False
    )
    placeholder = "<|vision_start|><|video_pad|><|vision_end|>"
    assert rendered.count(placeholder) == 1
    full_text = rendered.replace(placeholder, P.video_placeholder_text(grid, start, fps))
    assert full_text == P.prefix_text(grid, start, fps, system_prompt=system) + P.suffix_text(query)
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    seg = P.build_segment_ids(tokenizer, grid, start, fps, query, system_prompt=system)
    assert seg.input_ids.tolist() == full_ids
    prefix = P.build_prefix_ids(tokenizer, grid, start, fps, system_prompt=system)
    np.testing.assert_array_equal(seg.input_ids[: len(prefix)], prefix.input_ids)
    np.testing.assert_array_equal(seg.mm_token_type_ids[len(prefix) :], 0)


def test_prompt_sha256():
    h = P.prompt_sha256()
    assert len(h) == 64 and int(h, 16) >= 0
    assert h == P.prompt_sha256((P.SYSTEM_PROMPT,))
    assert h != P.prompt_sha256((P.SYSTEM_PROMPT_TRAINING,))
    assert P.SYSTEM_PROMPT.endswith("answer exactly 'Yes' or 'No': is this segment relevant to the Query?")
    assert "Yes" not in P.SYSTEM_PROMPT_TRAINING and P.SYSTEM_PROMPT.startswith(P.SYSTEM_PROMPT_TRAINING)


def _bare_transformers_processor(tokenizer):
    """Qwen3VLProcessor's text path (real transformers code) without its torchvision-bound video processor."""
    from types import SimpleNamespace

    from transformers import Qwen3VLProcessor

    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    proc.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    proc.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return proc


@pytest.mark.parametrize(("grid", "start", "fps"), [([4, 16, 32], 8, 2.0), ([1, 2, 2], 0, 0.5), ([3, 4, 6], 123, 1.9876)])
def test_prompt_matches_transformers_expansion(tokenizer, grid, start, fps):
    from transformers.video_utils import VideoMetadata

    proc = _bare_transformers_processor(tokenizer)
    n = grid[0] * 2
    meta = VideoMetadata(total_num_frames=n, fps=fps, frames_indices=list(range(start, start + n)))
    replacement = proc.replace_video_token({"video_grid_thw": torch.tensor([grid]), "video_metadata": [meta]}, 0)
    assert replacement == P.video_placeholder_text([grid], start, fps)
    # reference form: the bare video token stands where the video goes (see test_processor_parity.py)
    rendered = tokenizer.apply_chat_template(P.chat_messages("Why?"), add_generation_prompt=True, tokenize=False)
    (text,), _ = proc.get_text_with_replacements([rendered.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")], videos_replacements=[replacement])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seg = P.build_segment_ids(tokenizer, [grid], start, fps, "Why?")
    assert seg.input_ids.tolist() == ids
    assert seg.mm_token_type_ids.tolist() == proc.create_mm_token_type_ids([ids])[0]


def test_yes_no_token_ids(tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    yes, no = P.yes_no_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]
    # a character-level tokenizer splits "Yes" into 3 tokens
    vocab = {c: i for i, c in enumerate("[UNK]YesNo")} | {"[UNK]": 99}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    with pytest.raises(TokenizerError, match="exactly one"):
        P.yes_no_token_ids(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]"))
