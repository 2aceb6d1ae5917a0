"""Atomic, resumable training checkpoints.

``RUN/checkpoint-{step}/`` holds the model in the released Tempo layout (written by
``TempoLLM.save_pretrained``, so ``TempoLLM.from_pretrained`` and ``tempo eval --llm`` load
it directly) plus the trainer state beside it:

- ``trainer_state.pt``: optimizer and scheduler state dicts and every rank's torch RNG
  state (tensors and plain containers only: loaded with ``torch.load(weights_only=True)``);
- ``trainer_state.json``: step, every rank's data position, the run's settings, written
  last.

A checkpoint is written under ``RUN/.checkpoint-{step}.tmp-{random}`` and renamed into place
only when complete, so a run killed at any moment leaves either a whole checkpoint or a
temp directory that ``cleanup_partial_checkpoints`` removes; ``latest_checkpoint`` only
returns renamed directories that hold ``trainer_state.json``. Local run directories only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tempo_ops.errors import CheckpointFormatError, ConfigError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
TRAINER_STATE_VERSION = 1
_NAME_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_MARK = ".tmp-"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps: ``checkpoint-{step}``."""
    return f"checkpoint-{int(step)}"


def _local_dir(run_dir: str | os.PathLike) -> Path:
    text = os.fspath(run_dir)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError("training run directories must be local paths", item=text)
    return Path(text.removeprefix("file://"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    write_model: Callable[[Path], Any],
    state: dict[str, Any],
    tensors: dict[str, Any],
) -> Path:
    """Write ``RUN/checkpoint-{step}`` atomically and return its path.

    ``write_model(tmp_dir)`` writes the model files; ``tensors`` goes to ``trainer_state.pt``
    and ``state`` (JSON-serialisable) to ``trainer_state.json``, last. The finished temp
    directory is renamed into place (an older directory of the same name is replaced).
    """
    run = _local_dir(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / checkpoint_name(step)
    tmp = run / f".{checkpoint_name(step)}{_TMP_MARK}{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        write_model(tmp)
        torch.save(tensors, tmp / STATE_TENSORS)
        doc = dict(state, step=int(step), trainer_state_version=TRAINER_STATE_VERSION)
        with open(tmp / STATE_JSON, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            old = run / f".{checkpoint_name(step)}{_TMP_MARK}old-{uuid.uuid4().hex}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, ``(step, path)`` by increasing step."""
    run = _local_dir(run_dir)
    if not run.is_dir():
        return []
    found = []
    for child in run.iterdir():
        m = _NAME_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_JSON).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def cleanup_partial_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temp directories left by a killed writer; returns what was removed."""
    run = _local_dir(run_dir)
    removed = []
    if run.is_dir():
        for child in run.iterdir():
            if child.name.startswith(".checkpoint-") and _TMP_MARK in child.name:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def load_trainer_state(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state JSON, tensors)`` of a complete checkpoint (``torch.load(weights_only=True)``).

    Raises ``CheckpointFormatError`` when the files are missing, unreadable or of another version.
    """
    path = Path(checkpoint)
    try:
        doc = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        tensors = torch.load(path / STATE_TENSORS, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointFormatError(f"unreadable trainer state: {exc}", item=str(path)) from exc
    if doc.get("trainer_state_version") != TRAINER_STATE_VERSION:
        raise CheckpointFormatError(
            f"trainer state version {doc.get('trainer_state_version')!r}, this code reads {TRAINER_STATE_VERSION}",
            item=str(path),
        )
    return doc, tensors
