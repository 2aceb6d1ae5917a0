"""Parity with the real Hugging Face processor chain the reference ran, in the parity venv.

Run with ``make parity``: it builds ``.venv-parity`` (torch 2.14.1 + torchvision 0.29.1,
transformers 4.57.1, qwen-vl-utils 0.0.14) and runs this file there. In the project's own
venv torchvision cannot be installed (it breaks transformers there), so ``make test`` skips
this file and says why; with ``TEMPO_PARITY=1`` (set by ``make parity``) a missing piece is
a failure instead of a skip.

Reference chain per segment: frames (as our video front end produces them) →
``qwen_vl_utils.process_vision_info(..., image_patch_size=16)`` → ``Qwen3VLProcessor`` with
``do_resize=False``, no frame sampling, ``fps = real_fps`` and frame indices offset by the
segment's start, on the chat template's text (4.57 replaces the whole
``<|vision_start|><|video_pad|><|vision_end|>`` by one timestamped block per temporal group).
Ours: ``frames_to_video_inputs`` and ``prompt.build_segment_ids``. Both must be equal, bit for
bit, on the tiny models' processor files. The reference numerics pieces are compared with
4.57's own bf16 vision code as well, and the whole tiny vision tower run by our Compressor in
the project venv (transformers 5.x, ``numerics="reference"``, via ``tests/parity_main_venv.py``)
must give 4.57's bf16 output bit for bit.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch


def _missing() -> str | None:
    for module in ("torchvision", "qwen_vl_utils"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken install is as missing as an absent one
            return f"{module} does not import here ({type(exc).__name__})"
    import transformers

    if not transformers.__version__.startswith("4.57."):
        return f"transformers {transformers.__version__} is not the reference's 4.57"
    return None


_MISSING = _missing()
if _MISSING and os.environ.get("TEMPO_PARITY"):
    raise RuntimeError(f"TEMPO_PARITY is set but the parity venv is incomplete: {_MISSING}")
if _MISSING:
    pytest.skip(f"processor parity runs in the parity venv (`make parity`): {_MISSING}", allow_module_level=True)

from PIL import Image  # noqa: E402
from qwen_vl_utils import process_vision_info  # noqa: E402

from tempo_ops import numerics as num  # noqa: E402
from tempo_ops.query_text import render_query  # noqa: E402
from tempo_ops.svlm import prompt as P  # noqa: E402
from tempo_ops.svlm.tiny import write_processor_files  # noqa: E402
from tempo_ops.svlm.vision_inputs import frames_to_video_inputs  # noqa: E402

QUERY = render_query("What is added first?", ["salt", "oil", "sugar", "flour"], "videomme")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    out = write_processor_files(tmp_path_factory.mktemp("tiny_processor"))
    return AutoProcessor.from_pretrained(str(out))


def reference_inputs(processor, frames: np.ndarray, start: int, fps: float, query: str):
    """The reference chain on one segment's frames ``(T, H, W, 3) uint8``."""
    from transformers.video_utils import VideoMetadata

    messages = [{"role": "user", "content": [{"type": "video", "video": [Image.fromarray(f) for f in frames], "sample_fps": fps}]}]
    _, videos = process_vision_info(messages, image_patch_size=16)
    video = videos[0]
    n = int(video.shape[0])
    text = processor.tokenizer.apply_chat_template(P.chat_messages(query), add_generation_prompt=True, tokenize=False)
    metadata = VideoMetadata(
        total_num_frames=n, fps=fps, width=int(video.shape[3]), height=int(video.shape[2]), frames_indices=list(range(start, start + n))
    )
    return processor(
        text=[text], videos=[video], video_metadata=[metadata], do_resize=False, do_sample_frames=False, return_tensors="pt"
    )


def assert_segment_parity(processor, frames: np.ndarray, start: int, fps: float, query: str = QUERY) -> None:
    ref = reference_inputs(processor, frames, start, fps, query)
    ours = frames_to_video_inputs(frames)
    assert torch.equal(torch.as_tensor(ours.video_grid_thw), ref["video_grid_thw"].to(torch.int64))
    ref_pixels = ref["pixel_values_videos"]
    assert ours.pixel_values_videos.dtype == ref_pixels.dtype == torch.float32
    assert torch.equal(ours.pixel_values_videos, ref_pixels)
    seg = P.build_segment_ids(processor.tokenizer, ours.video_grid_thw, start, fps, query)
    assert seg.input_ids.tolist() == ref["input_ids"][0].tolist()
    video_id = processor.tokenizer.convert_tokens_to_ids(P.VIDEO_PAD)
    assert seg.mm_token_type_ids.tolist() == [P.MM_VIDEO if t == video_id else P.MM_TEXT for t in ref["input_ids"][0].tolist()]


# (T, H, W) of the frames our front end hands the SVLM (longer side <= 512), start, real_fps.
GEOMETRIES = [
    pytest.param((8, 288, 512), 8, 2.0, id="16x9-512x288"),
    pytest.param((8, 512, 288), 0, 2.0, id="portrait-288x512"),
    pytest.param((8, 120, 160), 16, 1.5, id="small-160x120-not-resized"),
    pytest.param((8, 100, 300), 24, 2.0, id="sides-not-multiples-of-16"),
    pytest.param((8, 112, 512), 0, 1.987, id="wide-512x112"),
    pytest.param((8, 360, 480), 1000, 2.0, id="4x3-480x360-late-start"),
    pytest.param((1, 240, 320), 40, 2.0, id="one-frame"),
    pytest.param((7, 270, 480), 56, 2.0, id="seven-frames"),
    pytest.param((3, 97, 203), 8, 0.5, id="odd-sides-three-frames"),
    pytest.param((2, 64, 96), 0, 2.0, id="tiny-upscaled"),
    pytest.param((8, 512, 512), 0, 2.0, id="square-512"),
]


@pytest.mark.parametrize(("shape", "start", "fps"), GEOMETRIES)
def test_pixels_grid_and_prompt_ids_match_the_reference_chain(processor, shape, start, fps):
    rng = np.random.default_rng(sum(shape) + start)
    frames = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert_segment_parity(processor, frames, start, fps)


def test_plain_and_empty_queries_match(processor):
    frames = np.random.default_rng(5).integers(0, 256, (8, 288, 512, 3), dtype=np.uint8)
    assert_segment_parity(processor, frames, 0, 2.0, render_query("Where is the cat?"))
    assert_segment_parity(processor, frames, 0, 2.0, "")  # → "Describe this content."


def test_segments_of_a_decoded_video_match(processor, tmp_path):
    """Frames straight from our decoder and resize (tempo_ops.video), incl. a 1-frame tail padded to 2."""
    from tempo_ops import video
    from tempo_ops.synthetic import write_test_video

    path = write_test_video(tmp_path / "v.mp4", n_frames=85, fps=10.0, width=530, height=110)
    segments = list(video.iter_segments(path, video.SamplingConfig()))
    assert [s.frames.shape[0] for s in segments] == [8, 8, 2]  # 17 sampled frames: 8 + 8 + 1 (padded)
    plan = video.plan_video(path, video.SamplingConfig())
    for seg in segments:
        assert_segment_parity(processor, seg.frames, seg.start_position, plan.real_fps)


# --------------------------------------------------------------------------- numerics vs 4.57 in bf16
@pytest.fixture(scope="module")
def vision_457():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cfg = Qwen3VLVisionConfig(
        depth=1, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=2304, deepstack_visual_indexes=[0],
    )
    torch.manual_seed(0)
    model = Qwen3VLVisionModel._from_config(cfg).eval()
    exact_inv_freq = model.rotary_pos_emb.inv_freq.clone()
    model.to(torch.bfloat16)  # what the reference does after loading
    return model, exact_inv_freq


GRIDS = [[(4, 16, 32)], [(1, 8, 6), (2, 10, 4)], [(2, 36, 20)]]


@pytest.mark.parametrize("grids", GRIDS)
def test_pos_embed_interpolation_equals_457_bf16(vision_457, grids):
    model, _ = vision_457
    grid = torch.tensor(grids)
    with torch.no_grad():
        theirs = model.fast_pos_embed_interpolate(grid)
    ours = num.reference_pos_embed_interpolate(model.pos_embed.weight, grid, model.num_grid_per_side, 2)
    assert theirs.dtype == ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("grids", GRIDS)
def test_vision_rope_table_equals_457_bf16(vision_457, grids):
    model, exact_inv_freq = vision_457
    grid = torch.tensor(grids)
    with torch.no_grad():
        theirs = model.rot_pos_emb(grid)  # (N, head_dim / 2) bf16: [h angles, w angles]
    coords = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // 2, 1, 2, 1).expand(h // 2, w // 2, 2, 2).reshape(-1)
        cols = torch.arange(w).view(1, w // 2, 1, 2).expand(h // 2, w // 2, 2, 2).reshape(-1)
        coords.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    ours = num.reference_vision_rope_angles(torch.cat(coords), exact_inv_freq).flatten(1)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.cos(), theirs.cos())


def test_text_rope_inv_freq_equals_457_bf16_buffer():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = Qwen3VLTextConfig(
        hidden_size=128, num_attention_heads=1, head_dim=128, rope_theta=5000000.0,
        rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    )
    rope = Qwen3VLTextRotaryEmbedding(cfg)
    ours = torch.nn.Module()
    ours.rotary_emb = Qwen3VLTextRotaryEmbedding(cfg)
    assert num.round_rope_inv_freq_bf16(ours) == ["rotary_emb"]
    rope.to(torch.bfloat16)
    assert ours.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(ours.rotary_emb.inv_freq, rope.inv_freq.float())
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.arange(0, 9000, 37)[None].expand(3, 1, -1)
    cos_ref, _ = rope(x, pos)  # 4.57: float32 cos of the bf16-rounded frequencies
    cos_ours, _ = ours.rotary_emb(x, pos)
    assert torch.equal(cos_ref, cos_ours)


# --------------------------------------------------------------------------- whole vision tower, 5.x hooks vs 4.57
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_PYTHON = os.environ.get("TEMPO_MAIN_PYTHON", os.path.join(REPO, ".venv", "bin", "python"))


def _457_svlm_dir(svlm, out):
    """A copy of the tiny SVLM whose config 4.57 reads (it wants ``rope_scaling`` / ``rope_theta``)."""
    import json
    import shutil

    shutil.copytree(svlm, out)
    config = json.loads((out / "config.json").read_text())
    rope = config["text_config"]["rope_parameters"]
    config["text_config"]["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["text_config"]["rope_theta"] = rope["rope_theta"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_reference_numerics_equal_457_bf16_bit_for_bit(tmp_path):
    """Our Compressor (transformers 5.x + reference numerics, bf16) runs the tiny SVLM to exactly
    the bits 4.57 produces from the same weights loaded in fp16 and cast to bf16 — the vision
    tower, the whole model's final hidden states on a segment prompt, and the relevance; exact
    numerics do not."""
    import subprocess

    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from tempo_ops.svlm.checkpoints import single_token_id

    if not os.path.exists(MAIN_PYTHON):
        pytest.skip(f"needs the project venv's python ({MAIN_PYTHON}; `make venv`) for the transformers 5.x side")
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("TEMPO_PARITY", None)
    done = subprocess.run(
        [MAIN_PYTHON, os.path.join(REPO, "tests", "parity_main_venv.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    svlm = _457_svlm_dir(tmp_path / "models" / "svlm", tmp_path / "svlm_457")
    # the reference: loaded in fp16 (rope inv_freq stays float32), then the whole model cast to bf16
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(svlm), torch_dtype=torch.float16).eval()
    model.to(torch.bfloat16)
    ours = load_file(str(tmp_path / "outputs.safetensors"))
    with torch.no_grad():
        out, deepstack = model.model.visual(ours["pixels"].to(torch.bfloat16), grid_thw=ours["grid"])
        hidden = model.model(
            input_ids=ours["ids"], pixel_values_videos=ours["seg_pixels"], video_grid_thw=ours["seg_grid"]
        ).last_hidden_state[0]
    tok = AutoTokenizer.from_pretrained(str(svlm))
    rows = model.lm_head.weight[[single_token_id(tok, "Yes", item="t"), single_token_id(tok, "No", item="t")]]
    relevance = torch.sigmoid(hidden[-1:].float() @ (rows[0] - rows[1]).float())  # bf16 rows, bf16 difference
    assert torch.equal(out.float(), ours["reference_out"])
    assert torch.equal(deepstack[0].float(), ours["reference_deepstack"])
    assert torch.equal(hidden.float(), ours["reference_hidden"])
    assert torch.equal(relevance, ours["reference_relevance"])
    # transformers 5.x as is: not the reference's bits
    assert not torch.equal(out.float(), ours["exact_out"])
    assert not torch.equal(hidden.float(), ours["exact_hidden"])
