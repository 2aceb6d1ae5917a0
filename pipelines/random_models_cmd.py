"""``tempo make-random-models --preset NAME DIR``: random-weight models of the released architectures.

``qwen3-vl-2b`` writes ``DIR/svlm`` (Qwen3-VL-2B-Instruct's published config and layout, ~4.3 GB);
``tempo-6b`` also writes ``DIR/tempo`` (the Tempo-6B layout: that SVLM, the projector 2048 → 2560
and Qwen3-4B, ~12.8 GB). Weights are bf16, written tensor by tensor (peak memory ≈ 0.8 GB).
Generated on demand for real-shape runs and benchmarks; never commit them. No network is used.
"""

from __future__ import annotations

import argparse
import json

from tempo_ops.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tempo_ops.model_presets import PRESETS, TEMPO_PROJECTOR_TYPES

    parser.add_argument("out_dir", metavar="DIR", help="output directory (gets svlm/ and, for tempo-6b, tempo/)")
    parser.add_argument("--preset", required=True, choices=PRESETS, help="which released architecture")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed; the same seed gives the same weights (default 0)")
    parser.add_argument("--projector", default="mlp2x_gelu", choices=TEMPO_PROJECTOR_TYPES,
                        help="Tempo projector type (Tempo-6B's is not published; default mlp2x_gelu)")
    parser.add_argument("--text-layers", type=int, default=None, help="fewer SVLM text layers (widths unchanged)")
    parser.add_argument("--vision-depth", type=int, default=None, help="fewer vision blocks (widths unchanged)")
    parser.add_argument("--llm-layers", type=int, default=None, help="fewer LLM layers (widths unchanged)")


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}", item="make-random-models")
    from tempo_ops.model_presets import make_random_models

    paths = make_random_models(
        args.out_dir,
        args.preset,
        seed=args.seed,
        text_layers=args.text_layers,
        vision_depth=args.vision_depth,
        llm_layers=args.llm_layers,
        projector=args.projector,
    )
    print(json.dumps(paths, indent=2))
    return 0
