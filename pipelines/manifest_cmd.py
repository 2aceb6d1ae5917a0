"""``tempo validate-manifest M``: report every problem of a corpus manifest.

Prints one ``line N: field: message`` row per problem and exits with status 2 when there
is any; prints the entry count and exits 0 when the manifest is valid.
"""

from __future__ import annotations

import argparse
import sys

from schemas.manifest import MANIFEST_VERSION, iter_manifest, validate_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help=f"manifest URL or path (JSON Lines, version {MANIFEST_VERSION})")


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    problems = validate_manifest(args.manifest)
    if problems:
        for problem in problems:
            print(str(problem))
        print(f"{args.manifest}: {len(problems)} problem(s)", file=sys.stderr)
        return 2
    n_entries = n_queries = 0
    for entry in iter_manifest(args.manifest):
        n_entries += 1
        n_queries += len(entry.queries)
    print(f"{args.manifest}: valid ({n_entries} videos, {n_queries} queries)")
    return 0
