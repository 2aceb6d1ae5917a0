"""The evaluation output directory: prediction parts, the merged ``predictions.jsonl``, the run config.

Layout under ``DIR`` (local path or fsspec URL)::

    eval_config.json        what the predictions depend on (LLM, source, pack mode, k_min/k_max,
                            max length); a re-run with another config is refused (or --force)
    parts/<sha>.jsonl       one file per evaluated batch, written whole by its worker
                            (temporary name, then moved), so a crash loses at most open batches
    predictions.jsonl       all rows, one per prediction key, sorted; merged from the parts by
                            the driver at the end of a run, after which the parts are removed

Resume: the keys present in ``predictions.jsonl`` or in any part are done and are skipped.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec

from tempo_ops.errors import ConfigError

PREDICTIONS = "predictions.jsonl"
PARTS = "parts"
CONFIG = "eval_config.json"


class PredictionStore:
    """Reads and writes one evaluation output directory (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _write_atomic(self, name: str, data: bytes) -> None:
        self.fs.makedirs(self._p(name).rsplit("/", 1)[0], exist_ok=True)
        tmp = self._p(f"{name}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, self._p(name))

    # -- config
    def check_config(self, config: dict[str, Any], *, force: bool) -> None:
        """Write ``eval_config.json``, or check it equals an existing one (ConfigError unless ``force``).

        With ``force`` all earlier predictions are removed first.
        """
        name = self._p(CONFIG)
        if force:
            self.clear()
        elif self.fs.exists(name):
            with self.fs.open(name, "rb") as fh:
                old = json.loads(fh.read().decode("utf-8"))
            if old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ConfigError(
                    f"holds predictions made with another configuration (differs in {diff}); "
                    "use --force to redo them or another --out",
                    item=self.url,
                )
            return
        self.fs.makedirs(self.root, exist_ok=True)
        self._write_atomic(CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def clear(self) -> None:
        """Remove predictions, parts and the config (``--force``)."""
        for name in (PREDICTIONS, CONFIG):
            if self.fs.exists(self._p(name)):
                self.fs.rm(self._p(name))
        if self.fs.exists(self._p(PARTS)):
            self.fs.rm(self._p(PARTS), recursive=True)

    # -- rows
    def write_part(self, rows: Sequence[dict[str, Any]]) -> str | None:
        """Write one batch's rows as a part (named by the digest of its keys); returns its name."""
        if not rows:
            return None
        keys = sorted(r["key"] for r in rows)
        digest = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:24]
        name = f"{PARTS}/{digest}.jsonl"
        self._write_atomic(name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8"))
        return name

    def _read_lines(self, path: str) -> Iterable[dict[str, Any]]:
        try:
            with self.fs.open(path, "rb") as fh:
                text = fh.read().decode("utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line of an interrupted write: that prediction is redone

    def _part_paths(self) -> list[str]:
        if not self.fs.exists(self._p(PARTS)):
            return []
        return sorted(p for p in self.fs.ls(self._p(PARTS), detail=False) if str(p).endswith(".jsonl"))

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row written so far, by key (parts override the merged file)."""
        out = {r["key"]: r for r in self._read_lines(self._p(PREDICTIONS)) if "key" in r}
        for part in self._part_paths():
            out.update({r["key"]: r for r in self._read_lines(part) if "key" in r})
        return out

    def merge(self) -> list[dict[str, Any]]:
        """Merge the parts into ``predictions.jsonl`` (sorted by key), remove the parts; returns all rows."""
        parts = self._part_paths()
        rows = self.rows()
        ordered = [rows[k] for k in sorted(rows)]
        if parts or not self.fs.exists(self._p(PREDICTIONS)):
            self._write_atomic(PREDICTIONS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered).encode("utf-8"))
        for part in parts:
            self.fs.rm(part)
        return ordered

    def write_file(self, name: str, data: bytes) -> str:
        """Write a report file (summary, plot) into the directory; returns its URL."""
        self._write_atomic(name, data)
        return self.path(name)
