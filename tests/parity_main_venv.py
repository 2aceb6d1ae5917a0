"""The project-venv half of the cross-version parity check (run by tests/test_processor_parity.py).

``python tests/parity_main_venv.py OUT_DIR`` builds the tiny models, loads the compressor in bf16
with ``numerics="reference"`` and with ``numerics="exact"`` (transformers 5.x), and writes
``OUT_DIR/outputs.safetensors`` next to the tiny models (``OUT_DIR/models``): for each mode the
vision tower's output and DeepStack features on fixed pixels, and the whole SVLM's final hidden
states and relevance on one segment prompt (the inputs are stored too). The parity venv then
runs transformers 4.57 on the same weights and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tempo_ops.svlm import prompt as P
from tempo_ops.svlm.compressor import Compressor
from tempo_ops.svlm.tiny import make_tiny_models
from tempo_ops.svlm.vision_inputs import frames_to_video_inputs

GRID = [[4, 16, 32]]  # an 8-frame 512x256 segment: 2048 patches


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    models = make_tiny_models(out / "models", seed=0)
    grid = torch.tensor(GRID)
    pixels = torch.randn((int(grid.prod()), 1536), generator=torch.Generator().manual_seed(1))
    frames = np.random.default_rng(0).integers(0, 256, (8, 288, 512, 3), dtype=np.uint8)
    vi = frames_to_video_inputs(frames)
    seg_grid = torch.as_tensor(vi.video_grid_thw).reshape(1, 3)
    tensors = {"pixels": pixels, "grid": grid, "seg_pixels": vi.pixel_values_videos, "seg_grid": seg_grid}
    for mode in ("reference", "exact"):
        comp = Compressor.from_pretrained(models["svlm"], device="cpu", dtype=torch.bfloat16, numerics=mode)
        seg = P.build_segment_ids(comp.tokenizer, vi.video_grid_thw, 8, 2.0, "What is on the table?")
        ids = torch.as_tensor(seg.input_ids)[None]
        with torch.inference_mode():
            vision = comp.model.model.get_video_features(pixels, grid, return_dict=True)
            hidden = comp.model.model(
                input_ids=ids,
                mm_token_type_ids=torch.as_tensor(seg.mm_token_type_ids)[None],
                pixel_values_videos=vi.pixel_values_videos,
                video_grid_thw=seg_grid,
            ).last_hidden_state[0]
            relevance = comp._relevance(hidden[-1:])
        tensors["ids"] = ids
        tensors[f"{mode}_out"] = torch.cat(vision.pooler_output).float()
        tensors[f"{mode}_deepstack"] = torch.cat(vision.deepstack_features[0]).float()
        tensors[f"{mode}_hidden"] = hidden.float()
        tensors[f"{mode}_relevance"] = relevance.float()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "outputs.safetensors"))
    print(models["svlm"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
