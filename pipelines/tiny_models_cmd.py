"""``tempo make-tiny-models DIR [--seed N]``: build tiny random-weight models offline.

Writes ``DIR/svlm`` (tiny Qwen3-VL + tokenizer + processor files) and ``DIR/tempo`` (tiny
checkpoint in the Tempo-6B layout) for tests and the demo; no network is used.
"""

from __future__ import annotations

import argparse
import json

from tempo_ops.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="DIR", help="output directory (gets svlm/ and tempo/)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed; the same seed gives the same weights (default 0)")


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}", item="make-tiny-models")
    from tempo_ops.svlm.tiny import make_tiny_models

    paths = make_tiny_models(args.out_dir, seed=args.seed)
    print(json.dumps(paths, indent=2))
    return 0
