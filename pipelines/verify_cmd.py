"""``tempo verify CACHE [--entries ...] [--quick] [--json]`` and ``tempo verify --shards DIR``.

Cache: lists corrupt (checksum, missing or out-of-range data), incomplete, missing (named but
absent) and unreadable (listed, metadata damaged) entries; ``tempo compress --repair``
recomputes them. Shards: checks every tar of each shard set under DIR against its recorded
size and sha256; a re-run of ``tempo shards`` rewrites the broken ones. Exit 0 when clean, 1
when something is wrong, 2 when the cache itself cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.job_support import add_storage_option_argument, parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", metavar="CACHE", nargs="?", help="cache URL or path")
    parser.add_argument("--shards", metavar="DIR", default=None, help="verify the shard sets under DIR instead")
    parser.add_argument(
        "--entries", nargs="+", default=None, metavar="ID", help="only these: VIDEO_ID (all its queries) or VIDEO_ID/QUERY_ID"
    )
    parser.add_argument("--quick", action="store_true", help="metadata, shard indexes and relevance only (no chunk data)")
    parser.add_argument("--json", action="store_true", help="emit one JSON document instead of text")
    parser.add_argument(
        "--prune-leftovers",
        action="store_true",
        help="first delete what crashed writes left behind (unreferenced entry versions, *.partial files) older than --older-than",
    )
    parser.add_argument(
        "--older-than",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="with --prune-leftovers: only leftovers at least this old (default 24; a running --force/--repair job's new version is unreferenced too)",
    )
    add_storage_option_argument(parser)


def shard_sets(out: str, storage_options: dict[str, Any] | None) -> list[str]:
    """Shard-set directories at or directly under ``out`` (those holding index.json or completion records)."""
    from tempo_ops.fs import is_local_url, url_to_fs

    fs, base = url_to_fs(out, storage_options)
    base = base.rstrip("/")

    def is_set(path: str) -> bool:
        return any(p.endswith((".done.json", "index.json")) for p in fs.ls(path, detail=False))

    if is_set(base):
        return [out.rstrip("/")]
    subdirs = sorted(p for p in fs.ls(base, detail=False) if fs.isdir(p))
    # fsspec lists absolute paths without the scheme: local ones are usable as they are
    return [p if is_local_url(out) else fs.unstrip_protocol(p) for p in subdirs if is_set(p)]


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    from tempo_ops.errors import ConfigError

    opts = parse_storage_options(args.storage_option) or None
    if args.shards:
        from tempo_ops.shards import verify_shard_set

        reports = [verify_shard_set(u, storage_options=opts) for u in shard_sets(args.shards, opts)]
        doc = {"shards": args.shards, "sets": reports, "clean": bool(reports) and not any(r["problems"] for r in reports)}
        if args.json:
            json.dump(doc, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        else:
            if not reports:
                print(f"{args.shards}: no shard sets found")
            for r in reports:
                print(f"{r['set']}: {r['ok']}/{r['shards']} shards intact" + ("" if r["index"] else " (no index.json)"))
                for p in r["problems"]:
                    print(f"  BROKEN {p['shard']}: {p['reason']}")
        return 0 if doc["clean"] else 1
    if not args.cache:
        raise ConfigError("give a CACHE, or --shards DIR", item="verify")
    from tempo_ops.cache_maintenance import prune_leftovers, verify_cache

    pruned = None
    if args.prune_leftovers:
        if args.older_than < 0:
            raise ConfigError(f"--older-than must be >= 0 hours, got {args.older_than}", item="verify")
        pruned = prune_leftovers(args.cache, opts, older_than_s=args.older_than * 3600.0)
    report = verify_cache(args.cache, opts, entries=args.entries, full=not args.quick)
    if pruned is not None:
        report["pruned"] = pruned
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        if pruned is not None:
            print(
                f"pruned {len(pruned['removed'])} leftover(s) older than {args.older_than:g} h "
                f"({pruned['removed_nbytes'] / 2**20:.1f} MiB); kept {len(pruned['kept'])} younger"
            )
        print(format_report(report))
    return 0 if report["clean"] else 1


def format_report(r: dict[str, Any]) -> str:
    """Human-readable ``verify_cache`` report."""
    lines = [
        f"{r['url']}: layout {r['layout_version']}, {r['storage_form']}, {'full' if r['full'] else 'quick'} check: "
        f"{r['ok']}/{r['checked']} entries intact, {len(r['corrupt'])} corrupt, {len(r['incomplete'])} incomplete, "
        f"{len(r['missing'])} missing, {len(r['unreadable'])} unreadable"
    ]
    for c in r["corrupt"]:
        for p in c["problems"]:
            lines.append(f"  CORRUPT {c['video_id']}/{c['query_id']}: {p['reason']}")
    lines += [f"  INCOMPLETE {i['video_id']}/{i['query_id']}" for i in r["incomplete"]]
    lines += [f"  MISSING {m}" for m in r["missing"]]
    lines += [f"  UNREADABLE {u['key']}: {u['reason']}" for u in r["unreadable"]]
    for x in r.get("leftovers", []):
        age = "age unknown" if x["age_s"] is None else f"{x['age_s'] / 3600:.1f} h old"
        what = "unreferenced version" if x["kind"] == "unreferenced_version" else "partial file"
        lines.append(f"  LEFTOVER {what} {x['key']} ({x['nbytes'] / 2**20:.1f} MiB, {age}; never read)")
    if r.get("leftovers"):
        lines.append("remove leftovers with: tempo verify CACHE --prune-leftovers [--older-than HOURS]")
    if not r["clean"]:
        lines.append("recompute with: tempo compress --repair ... (incomplete entries: any re-run)")
    return "\n".join(lines)
