"""The ``tempo`` command line.

Each subcommand lives in its own module that defines ``add_arguments(parser)`` and
``run(args, extra_args) -> int`` (``extra_args`` are unrecognised arguments, passed on to
Beam by the jobs that accept pipeline options). Modules are imported only when their
subcommand runs, so ``tempo --help`` stays fast.

Expected failures (``TempoError``) are printed as one line ``error [code]: message`` and
exit with status 2; no traceback reaches the user for them. SIGINT (Ctrl-C) and SIGTERM
print one line and exit 130 / 143 (128 + the signal number); the jobs write a partial
summary first (``pipelines/job_support.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tempo_ops.errors import TempoError

# name -> (module, help, accepts extra (Beam) arguments)
SUBCOMMANDS: dict[str, tuple[str, str, bool]] = {
    "probe": ("pipelines.probe_cmd", "probe, sample and segment videos; print a per-video summary", False),
    "validate-manifest": ("pipelines.manifest_cmd", "check a corpus manifest and report every problem", False),
    "make-tiny-models": ("pipelines.tiny_models_cmd", "build tiny random-weight models offline (tests, demo)", False),
    "make-random-models": (
        "pipelines.random_models_cmd",
        "write random-weight models of the released architectures (qwen3-vl-2b, tempo-6b; GBs)",
        False,
    ),
    "compress": ("pipelines.compress", "run the compression job: manifest -> Zarr token cache", True),
    "index": ("pipelines.index", "run the index job: manifest -> segment index (decode + vision encoder once)", True),
    "ask": ("pipelines.ask_cmd", "answer one new question about an indexed video (index -> cache -> LLM)", False),
    "inspect": ("pipelines.inspect_cache", "show a token cache's configuration, counts and entries", False),
    "shards": ("pipelines.build_shards", "cut WebDataset training shards from a cache", True),
    "verify": ("pipelines.verify_cmd", "check a cache's (or shard set's) checksums; list corrupt, missing, incomplete", False),
    "migrate": ("pipelines.migrate_cmd", "convert a layout-v1 token cache to layout v2 (new store, then swap)", False),
    "eval": ("pipelines.evaluate", "evaluate the LLM stage at budgets x policies from a cache or shards", True),
    "train": ("pipelines.train", "train the LLM stage on cached-token shards (torchrun for DDP; resumable)", False),
    "demo-train": ("pipelines.demo_train", "prove that training learns: a generated colour task, train/val split by video", False),
    "demo": ("pipelines.demo", "run the whole pipeline on generated sample videos and tiny models", False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempo", description="Tempo Pipeline: offline query-aware long-video compression.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text, _extra) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _quiet_third_party() -> None:
    """Jobs print their own progress; hub/transformers progress bars would only interleave with it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # read by transformers at import


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"tempo: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text, accepts_extra = SUBCOMMANDS[name]
    _quiet_third_party()
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"tempo {name}", description=help_text)
    module.add_arguments(sub_parser)
    if accepts_extra:
        args, extra = sub_parser.parse_known_args(rest)
    else:
        args, extra = sub_parser.parse_args(rest), []
    from pipelines.job_support import JobInterrupted, sigterm_raises

    try:
        with sigterm_raises():  # before a job's own handling starts (model load...), SIGTERM is one line too
            return int(module.run(args, extra) or 0)
    except TempoError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, JobInterrupted) as exc:
        code = exc.exit_code if isinstance(exc, JobInterrupted) else 130
        sig = exc.signal_name if isinstance(exc, JobInterrupted) else "SIGINT"
        print(f"tempo {name}: interrupted by {sig}; completed work is kept, re-run to resume", file=sys.stderr)
        if as_program:
            # Runner threads may still be busy: end now rather than wait for them at exit.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
