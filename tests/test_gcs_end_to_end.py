"""``tempo compress`` and ``tempo shards`` end to end on gs:// (fake-gcs-server): manifest,
videos, cache, shards, dead letters and summaries all in the bucket, exit codes as locally."""

from __future__ import annotations

import json
import uuid

import fsspec
from gcs_emulator import gcs_server  # noqa: F401 - pytest fixture

from pipelines.cli import main as tempo
from tempo_ops.synthetic import write_test_video


def test_compress_and_shards_on_gcs(gcs_server, tiny_models, tmp_path, capsys):  # noqa: F811 - fixture
    bucket = f"tempo-{uuid.uuid4().hex[:8]}"
    gcs_server.create_bucket(bucket)
    opts = gcs_server.storage_options
    fs = fsspec.filesystem("gs", **opts)
    write_test_video(tmp_path / "v.mp4", n_frames=40, fps=10, width=48, height=32)
    fs.put_file(str(tmp_path / "v.mp4"), f"{bucket}/corpus/v.mp4")
    lines = [
        {"video_id": "v", "uri": "v.mp4", "queries": [{"query_id": "q1", "text": "What?", "options": ["A. a", "B. b"], "answer": "A"}]},
        {"video_id": "gone", "uri": "gone.mp4", "queries": [{"query_id": "q1", "text": "Where?", "answer": "B"}]},
    ]
    fs.pipe_file(f"{bucket}/corpus/manifest.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    # Stale temporary folder of an older version's interrupted run: removed by the next run.
    fs.pipe_file(f"{bucket}/beam-temp-cache.zarr.deadletter.jsonl-0123/x", b"")
    storage = [a for k, v in opts.items() for a in ("--storage-option", f"{k}={v}")]
    manifest, cache, out = f"gs://{bucket}/corpus/manifest.jsonl", f"gs://{bucket}/cache.zarr", f"gs://{bucket}/shards"

    rc = tempo(["compress", "--manifest", manifest, "--cache", cache, "--svlm", tiny_models["svlm"],
                "--compressor", tiny_models["tempo"], *storage])
    err = capsys.readouterr().err
    assert rc == 1, err  # the missing video is dead-lettered, the other compressed
    assert "Traceback" not in err
    summary = json.loads(fs.cat_file(f"{bucket}/cache.zarr.summary.json"))
    assert summary["status"] == "items_failed" and summary["counts"]["queries_completed"] == 1
    (letter,) = [json.loads(x) for x in fs.cat_file(f"{bucket}/cache.zarr.deadletter.jsonl").decode().splitlines()]
    assert (letter["video_id"], letter["code"]) == ("gone", "video_not_found")
    assert fs.exists(f"{bucket}/cache.zarr.runs/{summary['run_id']}.summary.json")

    rc = tempo(["shards", "--cache", cache, "--manifest", manifest, "--out", out, "--budgets", "64", *storage])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "64-ata: 1 samples" in captured.out
    index = json.loads(fs.cat_file(f"{bucket}/shards/64-ata/index.json"))
    assert index["total_samples"] == 1
    shard_summary = json.loads(fs.cat_file(f"{bucket}/shards.summary.json"))
    assert shard_summary["status"] == "complete" and shard_summary["failures"] == 0
    assert fs.cat_file(f"{bucket}/shards.deadletter.jsonl") == b""
    fs.invalidate_cache()
    assert not [p for p in fs.find(bucket) if "beam-temp" in p]
