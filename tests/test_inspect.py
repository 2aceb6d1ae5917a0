"""``tempo inspect CACHE [--json]``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_store_support import S, make_config, open_writer, write_entry

from pipelines.cli import main
from schemas import cache_layout as L


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    url = str(tmp_path / "cache")
    w = open_writer(url)
    write_entry(w, "video-A", "q1")
    write_entry(w, "video-A", "q2")
    write_entry(w, "video-B", "q1", units=[0])  # incomplete
    w.write_video("video-C\x1b[31m", {"uri": "c.mp4", "timestamps": [2.0], "timestamp_texts": ["<2.0 seconds>"]})
    return url


def _disk_bytes(root: str) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def test_inspect_json(cache: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", cache, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layout_version"] == L.LAYOUT_VERSION
    assert doc["fingerprint"] == L.config_fingerprint(make_config())
    assert doc["config"] == make_config()
    assert doc["counts"] == {"videos": 3, "queries": 3, "complete": 2, "incomplete": 1, "unreadable": 0}
    assert doc["total_bytes"] == _disk_bytes(cache)
    rows = {v["video_id"]: v for v in doc["videos"]}
    assert rows["video-A"]["queries_complete"] == 2 and rows["video-A"]["queries_total"] == 2
    assert rows["video-A"]["n_segments"] == S
    assert rows["video-A"]["bytes"] == _disk_bytes(str(Path(cache) / "videos" / "video-A"))
    assert (rows["video-B"]["queries_complete"], rows["video-B"]["queries_total"]) == (0, 1)
    assert rows["video-C\x1b[31m"]["queries_total"] == 0 and rows["video-C\x1b[31m"]["n_segments"] == 1
    assert doc["segments_per_shard"] == 4 and doc["token_chunk"] == 4


def test_inspect_text(cache: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", cache]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint:      {L.config_fingerprint(make_config())}" in out
    assert f"layout_version:   {L.LAYOUT_VERSION}" in out
    assert "queries:          3 (2 complete, 1 incomplete)" in out
    assert "memory_tokens_sha256: " + "2" * 64 in out
    assert "target_fps: 2.0" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("video-")}
    assert lines["video-A"][1:4] == [str(S), "2/2", str(_disk_bytes(str(Path(cache) / "videos" / "video-A")))]
    assert lines["video-B"][1:3] == [str(S), "0/1"]
    assert "\x1b" not in out, "control characters in ids are escaped"


def test_inspect_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "error [cache_layout]" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--storage-option", "novalue"]) == 2
    assert "error [config_error]" in capsys.readouterr().err
