"""Parity with the real Hugging Face Qwen3-VL processor (and qwen-vl-utils where installed).

The HF video processor needs torchvision, which cannot be installed in this project's
environment (docs/METHOD.md "Environment"), so these tests are skipped here; run them wherever torchvision
imports (e.g. a GPU machine): ``pytest tests/test_processor_parity.py``.

Note on prompt expansion: the reference (transformers 4.57) replaced the chat template's whole
``<|vision_start|><|video_pad|><|vision_end|>`` by the per-group blocks; transformers 5.x replaces
only ``<|video_pad|>`` (leaving an outer vision_start/end pair). We reproduce the reference, so
the text given to the processor carries the bare ``<|video_pad|>`` where the video goes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from tempo_ops.svlm import prompt as P  # noqa: E402
from tempo_ops.svlm.tiny import make_tiny_models  # noqa: E402
from tempo_ops.svlm.vision_inputs import (  # noqa: E402
    frames_to_video_inputs,
    reference_frame_geometry,
    resize_bicubic_antialias_uint8,
)

TRIPLE = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_parity"), seed=0)


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny["svlm"])


def _run_processor(processor, frames: np.ndarray, start: int, fps: float, query: str):
    from transformers.video_utils import VideoMetadata

    rendered = processor.tokenizer.apply_chat_template(P.chat_messages(query), add_generation_prompt=True, tokenize=False)
    text = rendered.replace(TRIPLE, P.VIDEO_PAD)
    n = frames.shape[0]
    metadata = VideoMetadata(
        total_num_frames=n,
        fps=fps,
        width=frames.shape[2],
        height=frames.shape[1],
        frames_indices=list(range(start, start + n)),
    )
    return processor(
        text=[text],
        videos=[frames],
        video_metadata=[metadata],
        do_resize=False,
        do_sample_frames=False,
        return_tensors="pt",
    )


@pytest.mark.parametrize(("shape", "start", "fps"), [((8, 288, 512, 3), 8, 2.0), ((2, 256, 320, 3), 24, 1.5)])
def test_inputs_and_prompt_match_qwen3vl_processor(processor, shape, start, fps):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, shape, dtype=np.uint8)
    geom = reference_frame_geometry(frames)
    ours = frames_to_video_inputs(frames)
    ref = _run_processor(processor, geom, start, fps, "What happens here?")
    assert torch.equal(ours.video_grid_thw, ref["video_grid_thw"].to(torch.int64))
    assert ours.pixel_values_videos.dtype == ref["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(ours.pixel_values_videos, ref["pixel_values_videos"])
    seg = P.build_segment_ids(processor.tokenizer, ours.video_grid_thw, start, fps, "What happens here?")
    assert seg.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert seg.mm_token_type_ids.tolist() == ref["mm_token_type_ids"][0].tolist()


def test_patchify_matches_without_geometry_including_temporal_padding(processor):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    ours = frames_to_video_inputs(frames, reference_geometry=False)
    ref = processor.video_processor(
        videos=[frames], do_resize=False, do_sample_frames=False, return_tensors="pt"
    )
    assert torch.equal(ours.video_grid_thw, ref["video_grid_thw"].to(torch.int64))
    assert torch.equal(ours.pixel_values_videos, ref["pixel_values_videos"])


def test_stage_two_resize_matches_torchvision():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (2, 1024, 2048, 3), dtype=np.uint8)
    ours = resize_bicubic_antialias_uint8(frames, 608, 1248)
    ref = tvf.resize(
        torch.from_numpy(frames).permute(0, 3, 1, 2), [608, 1248], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())


def test_geometry_matches_qwen_vl_utils():
    qvu = pytest.importorskip("qwen_vl_utils")
    from PIL import Image

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (3, 1080, 1920, 3), dtype=np.uint8)
    messages = [
        {
            "role": "user",
            "content": [{"type": "video", "video": [Image.fromarray(f) for f in frames], "sample_fps": 2.0}],
        }
    ]
    result = qvu.process_vision_info(messages, image_patch_size=16)
    videos = result[1]
    video = videos[0][0] if isinstance(videos[0], tuple) else videos[0]
    ours = reference_frame_geometry(frames)
    assert ours.shape == (4, 640, 1152, 3)
    np.testing.assert_array_equal(torch.from_numpy(ours).permute(0, 3, 1, 2).float().numpy(), video.numpy())
