"""Run every benchmark under bench/ (``make bench``); each writes bench/results/<name>.json.

``python -m bench.run_all [name ...]`` runs only the named ones (e.g. ``video allocation``).
Each benchmark runs in its own Python process, so one's imports, caches and peak memory
never leak into another's figures.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    wanted = set(sys.argv[1:] if argv is None else argv)
    names = sorted(m.name for m in pkgutil.iter_modules([str(ROOT)]) if m.name.startswith("bench_"))
    failed = []
    for name in names:
        short = name[len("bench_") :]
        if wanted and short not in wanted:
            continue
        print(f"=== bench {short}", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT.parent)
        if proc.returncode != 0:
            print(f"benchmark {short} failed with exit status {proc.returncode}", file=sys.stderr)
            failed.append(short)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
