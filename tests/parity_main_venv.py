"""The project-venv half of the cross-version parity check (run by tests/test_processor_parity.py).

``python tests/parity_main_venv.py OUT_DIR`` builds the tiny models, loads the compressor in bf16
with ``numerics="reference"`` and with ``numerics="exact"`` (transformers 5.x), runs the vision
tower of each on fixed pixels, and writes ``OUT_DIR/tower.safetensors`` (pixels, grid, both
outputs and their DeepStack features) next to the tiny models (``OUT_DIR/models``). The parity
venv then runs transformers 4.57's vision tower on the same weights and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tempo_ops.svlm.compressor import Compressor
from tempo_ops.svlm.tiny import make_tiny_models

GRID = [[4, 16, 32]]  # an 8-frame 512x256 segment: 2048 patches


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    models = make_tiny_models(out / "models", seed=0)
    grid = torch.tensor(GRID)
    pixels = torch.randn((int(grid.prod()), 1536), generator=torch.Generator().manual_seed(1))
    tensors = {"pixels": pixels, "grid": grid}
    for mode in ("reference", "exact"):
        comp = Compressor.from_pretrained(models["svlm"], device="cpu", dtype=torch.bfloat16, numerics=mode)
        with torch.inference_mode():
            vision = comp.model.model.get_video_features(pixels, grid, return_dict=True)
        tensors[f"{mode}_out"] = torch.cat(vision.pooler_output).float()
        tensors[f"{mode}_deepstack"] = torch.cat(vision.deepstack_features[0]).float()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tower.safetensors"))
    print(models["svlm"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
