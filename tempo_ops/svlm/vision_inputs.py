"""Frames → Qwen3-VL video inputs (``pixel_values_videos``, ``video_grid_thw``), without torchvision.

Reproduces, exactly, what the reference ran (docs/METHOD.md, "Geometry"):

1. ``reference_frame_geometry``: the qwen-vl-utils 0.0.14 ``process_vision_info`` pass for a list
   of frames: per-frame PIL ``Image.resize`` (default filter, bicubic) to
   ``smart_resize(factor=64, min_pixels=4·64², max_pixels=16384·64²)``; frame count padded to even
   by repeating the last frame; then the stacked frames resized like torchvision's
   ``resize(..., BICUBIC, antialias=True)`` on uint8 (float32 interpolation, clamp to [0, 255],
   round half to even, back to uint8; no-op when the size is unchanged) to
   ``smart_resize(factor=32, min_pixels=128·32², max_pixels=max(min(768·32², total/n·2), int(1.05·min)))``
   with ``total = 128000·32²·0.9`` and ``n`` the padded frame count.
2. The HF Qwen3-VL video processor with ``do_resize=False``: rescale by 1/255 and normalise with
   mean = std = 0.5 fused as ``(x - 127.5) / 127.5`` in float32, pad T to a multiple of 2, and cut
   16×16×2 patches in the 2×2-merge order of ``Qwen3VLVideoProcessor.patchify``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tempo_ops.errors import AbsurdDimensions, InvalidFrames

PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
CHANNELS = 3
PATCH_DIM = CHANNELS * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1536
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1 / 255
MAX_ASPECT_RATIO = 200

# qwen-vl-utils 0.0.14 constants with image_patch_size=16 (see module docstring).
FRAME_FACTOR = 2
IMAGE_STAGE_FACTOR = 64  # fetch_image gets 16*2 as its "patch size" and multiplies by 2 again
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
VIDEO_FACTOR = 32
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
MODEL_SEQ_LEN = 128000


@dataclass(frozen=True)
class VideoInputs:
    """Qwen3-VL video inputs of one segment.

    Attributes:
        pixel_values_videos: ``(N, 1536) float32`` patches, N = t·h·w of the grid.
        video_grid_thw: ``(1, 3) int64`` grid ``(t, h, w)`` in patches (t = frames/2).
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor

    @property
    def grid(self) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in self.video_grid_thw[0].tolist())
        return t, h, w

    @property
    def num_frames(self) -> int:
        """Frames after even padding (= 2·t)."""
        return self.grid[0] * TEMPORAL_PATCH_SIZE

    @property
    def num_visual_tokens(self) -> int:
        """Merged visual tokens in the prompt: t·h·w/4."""
        t, h, w = self.grid
        return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor`` with area in [min_pixels, max_pixels].

    Each side is rounded to the nearest multiple with Python's ``round`` (halves to even:
    288/64 = 4.5 → 4), at least one factor; if the area exceeds ``max_pixels`` both sides are
    scaled by sqrt(area/max) and floored to the factor (at least one factor); if below
    ``min_pixels`` they are scaled up and ceiled.

    Raises:
        AbsurdDimensions: non-positive sides or aspect ratio above 200.
    """
    if height <= 0 or width <= 0:
        raise AbsurdDimensions(f"frame size must be positive, got {height}x{width} (HxW)", item="frame")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise AbsurdDimensions(
            f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT_RATIO}", item="frame"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_frames(frames: Any) -> np.ndarray:
    """Frames as a ``(T, H, W, 3) uint8`` numpy array, or ``InvalidFrames``."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise InvalidFrames("no frames", item="frames")
        frames = np.stack([np.asarray(f) for f in frames])
    if not isinstance(frames, np.ndarray):
        raise InvalidFrames(f"frames must be a numpy array, got {type(frames).__name__}", item="frames")
    if frames.dtype != np.uint8:
        raise InvalidFrames(f"frames must be uint8, got {frames.dtype}", item="frames")
    if frames.ndim != 4 or frames.shape[-1] != CHANNELS:
        raise InvalidFrames(f"frames must have shape (T, H, W, 3), got {frames.shape}", item="frames")
    if frames.shape[0] < 1:
        raise InvalidFrames("no frames", item="frames")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise InvalidFrames(f"empty frames of shape {frames.shape}", item="frames")
    return frames


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last frame so the frame count is even (``(T', H, W, 3)``, T' = T rounded up to 2)."""
    if frames.shape[0] % FRAME_FACTOR:
        pad = FRAME_FACTOR - frames.shape[0] % FRAME_FACTOR
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    return frames


def resize_bicubic_antialias_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision ``resize(uint8 tensor, BICUBIC, antialias=True)``: ``(T, H, W, 3) uint8`` → ``(T, height, width, 3) uint8``.

    float32 ``F.interpolate(mode="bicubic", align_corners=False, antialias=True)``, clamp to
    [0, 255], round (half to even), cast back to uint8. Unchanged size → the input, untouched.
    """
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32)
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    y = y.clamp(0, 255).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def video_max_pixels(n_frames: int) -> float:
    """qwen-vl-utils' per-frame pixel cap for a clip of ``n_frames`` (padded) frames."""
    min_pixels = VIDEO_MIN_TOKEN_NUM * VIDEO_FACTOR * VIDEO_FACTOR
    total_pixels = MODEL_SEQ_LEN * VIDEO_FACTOR * VIDEO_FACTOR * 0.9
    frame_max = VIDEO_MAX_TOKEN_NUM * VIDEO_FACTOR * VIDEO_FACTOR
    return max(min(frame_max, total_pixels / n_frames * FRAME_FACTOR), int(min_pixels * 1.05))


def reference_frame_geometry(frames: Any) -> np.ndarray:
    """The qwen-vl-utils 0.0.14 geometry pass: ``(T, H, W, 3) uint8`` → ``(T', H', W', 3) uint8``.

    T' is T padded to even; H', W' multiples of 32 (a 512×288 input ends as 512×256).
    """
    from PIL import Image

    frames = _check_frames(frames)
    _, h, w, _ = frames.shape
    ih, iw = smart_resize(
        h,
        w,
        factor=IMAGE_STAGE_FACTOR,
        min_pixels=IMAGE_MIN_TOKEN_NUM * IMAGE_STAGE_FACTOR**2,
        max_pixels=IMAGE_MAX_TOKEN_NUM * IMAGE_STAGE_FACTOR**2,
    )
    if (ih, iw) != (h, w):
        # PIL's default resize filter for RGB images is bicubic.
        frames = np.stack([np.asarray(Image.fromarray(f, mode="RGB").resize((iw, ih))) for f in frames])
    frames = pad_to_even(frames)
    vh, vw = smart_resize(
        ih,
        iw,
        factor=VIDEO_FACTOR,
        min_pixels=VIDEO_MIN_TOKEN_NUM * VIDEO_FACTOR**2,
        max_pixels=video_max_pixels(frames.shape[0]),
    )
    return resize_bicubic_antialias_uint8(frames, vh, vw)


def normalize(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3) uint8`` → ``(T, 3, H, W) float32``: rescale 1/255 and normalise (mean = std = 0.5),
    fused as the HF processor does: ``(x - 127.5) / 127.5``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32) * (1.0 / RESCALE_FACTOR)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32) * (1.0 / RESCALE_FACTOR)
    return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def patchify(video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut ``(T, 3, H, W)`` float32 (T even, H and W multiples of 32) into ``(t·h·w, 1536)`` patches.

    Order of ``Qwen3VLVideoProcessor.patchify``: rows are (t, h-block, w-block, h-in-merge,
    w-in-merge); each row is (channel, frame-in-temporal-patch, y, x).
    """
    t_frames, c, height, width = video.shape
    gt, gh, gw = t_frames // TEMPORAL_PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE
    patches = video.reshape(
        gt, TEMPORAL_PATCH_SIZE, c, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE
    )
    # (gt, gh/m, gw/m, m, m, c, tp, p, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(gt * gh * gw, c * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)
    return flat.contiguous(), (gt, gh, gw)


def frames_to_video_inputs(frames: Any, *, reference_geometry: bool = True) -> VideoInputs:
    """One segment's frames → Qwen3-VL video inputs.

    Args:
        frames: ``(T, H, W, 3) uint8`` RGB frames (T ≥ 1).
        reference_geometry: apply ``reference_frame_geometry`` first (what the released checkpoint
            saw). Without it, H and W must already be multiples of 32; T is padded to even.
    Returns:
        ``VideoInputs``: ``pixel_values_videos (N, 1536) float32``, ``video_grid_thw (1, 3) int64``.
        A 512×256 8-frame segment gives grid (4, 16, 32) and 512 merged visual tokens.
    Raises:
        InvalidFrames: wrong type/dtype/shape, or (without reference geometry) sides not multiples of 32.
        AbsurdDimensions: aspect ratio above 200.
    """
    frames = _check_frames(frames)
    if reference_geometry:
        frames = reference_frame_geometry(frames)
    else:
        factor = PATCH_SIZE * MERGE_SIZE
        if frames.shape[1] % factor or frames.shape[2] % factor:
            raise InvalidFrames(
                f"frame size {frames.shape[2]}x{frames.shape[1]} (WxH) is not a multiple of {factor}; "
                "use reference_geometry=True or resize first",
                item="frames",
            )
        frames = pad_to_even(frames)
    pixel_values, grid = patchify(normalize(frames))
    return VideoInputs(pixel_values_videos=pixel_values, video_grid_thw=torch.tensor([grid], dtype=torch.int64))
