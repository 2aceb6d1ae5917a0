"""``tempo inspect CACHE [--json]``: a token cache's configuration, fingerprint, counts and entries.

Reads only metadata (group ``zarr.json`` objects and object sizes), never array data.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.job_support import add_storage_option_argument, parse_storage_options
from tempo_ops.store import cache_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", metavar="CACHE", help="cache URL or path (local, memory://, gs://...)")
    parser.add_argument("--json", action="store_true", help="emit one JSON document instead of text")
    add_storage_option_argument(parser)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report of a ``cache_summary`` dict."""
    c = summary["counts"]
    cfg = summary["config"]
    lines = [
        f"cache:            {summary['url']}",
        f"layout_version:   {summary['layout_version']}",
        f"fingerprint:      {summary['fingerprint']}",
        f"written by:       tempo_ops {summary['tempo_ops_version']} at {summary['created_at']}",
        f"shards:           {summary['segments_per_shard']} segments/shard, {summary['token_chunk']} tokens/chunk",
        f"storage form:     {summary['storage_form']}" + (f" (scheme {summary['int8_scheme']})" if summary.get("int8_scheme") else ""),
        "compressor:",
        *(f"  {k}: {v}" for k, v in sorted(cfg.get("compressor", {}).items())),
        "sampling:",
        *(f"  {k}: {v}" for k, v in sorted(cfg.get("sampling", {}).items())),
        f"videos:           {c['videos']}",
        f"queries:          {c['queries']} ({c['complete']} complete, {c['incomplete']} incomplete)",
        *(f"UNREADABLE:       {u['key']}: {u['reason']}" for u in summary.get("unreadable", [])),
        f"total size:       {_size(summary['total_bytes'])} ({summary['total_bytes']} bytes)",
    ]
    if summary["videos"]:
        width = max(8, *(len(str(v["video_id"])) for v in summary["videos"]))
        lines.append("")
        lines.append(f"{'video_id':<{width}}  {'segments':>8}  {'queries':>9}  {'bytes':>12}")
        for v in summary["videos"]:
            q = f"{v['queries_complete']}/{v['queries_total']}"
            seg = "?" if v["n_segments"] is None else v["n_segments"]
            vid = str(v["video_id"])
            vid = vid if vid.isprintable() else ascii(vid)  # never send control characters to a terminal
            lines.append(f"{vid:<{width}}  {seg!s:>8}  {q:>9}  {v['bytes']:>12}")
    return "\n".join(lines)


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    summary = cache_summary(args.cache, parse_storage_options(args.storage_option) or None)
    if args.json:
        json.dump(summary, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(format_summary(summary))
    return 0
