"""Run every benchmark under bench/ (``make bench``); each writes bench/results/<name>.json.

``python -m bench.run_all [name ...]`` runs only the named ones (e.g. ``video allocation``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    wanted = set(sys.argv[1:] if argv is None else argv)
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    failed = []
    for name in names:
        short = name[len("bench_") :]
        if wanted and short not in wanted:
            continue
        print(f"=== bench {short}", flush=True)
        try:
            importlib.import_module(f"bench.{name}").main()
        except Exception as exc:  # noqa: BLE001 - report and go on with the other benchmarks
            print(f"benchmark {short} failed: {exc!r}", file=sys.stderr)
            failed.append(short)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
