"""``tempo migrate CACHE [--storage-form F] [--delete-backup]``: convert a layout-v1 cache to v2.

Builds the new store beside the old one, verifies it, then swaps (old kept as ``CACHE.v1-backup``
unless ``--delete-backup``). See ``tempo_ops.cache_maintenance.migrate_cache``.
"""

from __future__ import annotations

import argparse
import json

from pipelines.job_support import add_storage_option_argument, parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", metavar="CACHE", help="layout-v1 cache URL or path")
    parser.add_argument(
        "--storage-form",
        choices=("float16", "bfloat16", "int8"),
        default="float16",
        help="form of the new store (float16, the default, keeps v1 values bit-exact)",
    )
    parser.add_argument("--delete-backup", action="store_true", help="delete the v1 store after a verified swap")
    add_storage_option_argument(parser)


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    from tempo_ops.cache_maintenance import migrate_cache

    result = migrate_cache(
        args.cache, parse_storage_options(args.storage_option) or None, form=args.storage_form, keep_backup=not args.delete_backup
    )
    print(json.dumps(result, sort_keys=True))
    return 0
