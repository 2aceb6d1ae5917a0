"""End-to-end tests of the compression job (Beam local runner, tiny models)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.cli import main as tempo
from tempo_ops.synthetic import write_test_video

REPO = Path(__file__).resolve().parents[1]
LONG_SEGMENTS = 34  # > one 32-segment cache shard: two work units


def _write_corpus(root: Path, *, bad: bool = True) -> Path:
    """A small corpus: a 2-unit video, a short one, one without queries, and (optionally) bad inputs."""
    root.mkdir(parents=True, exist_ok=True)
    # 2 fps source sampled at 2 fps: every frame is sampled; 34 segments of 8 frames.
    write_test_video(root / "long.mp4", n_frames=LONG_SEGMENTS * 8, fps=2, width=64, height=48, gop=8)
    write_test_video(root / "short.mp4", n_frames=40, fps=10, width=80, height=64)
    write_test_video(root / "noquery.mp4", n_frames=24, fps=8, width=48, height=48, codec="mpeg4")
    lines = [
        {
            "video_id": "long",
            "uri": "long.mp4",
            "queries": [
                {"query_id": "q1", "text": "What is shown?", "options": ["A", "B"], "answer": "A"},
                {"query_id": "q2", "text": "Is there a person?", "answer": "No"},
            ],
        },
        {"video_id": "short/clip", "uri": "short.mp4", "queries": [{"query_id": "q1", "text": "Count the blocks."}]},
        {"video_id": "noquery", "uri": "noquery.mp4"},
    ]
    if bad:
        data = (root / "short.mp4").read_bytes()
        (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
        (root / "notes.mp4").write_text("this is not a video\n")
        lines += [
            {"video_id": "truncated", "uri": "truncated.mp4", "queries": [{"query_id": "q1", "text": "x"}, {"query_id": "q2", "text": "y"}]},
            {"video_id": "missing", "uri": "missing.mp4", "queries": [{"query_id": "q1", "text": "x"}]},
            {"video_id": "text", "uri": "notes.mp4", "queries": [{"query_id": "q1", "text": "x"}]},
        ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def _compress_args(manifest: Path, cache: Path, models: dict, *extra: str) -> list[str]:
    return ["compress", "--manifest", str(manifest), "--cache", str(cache), "--svlm", models["svlm"], "--compressor", models["tempo"], *extra]


def _dead_letters(cache: Path) -> list[dict]:
    path = Path(str(cache) + ".deadletter.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(cache: Path) -> dict:
    return json.loads(Path(str(cache) + ".summary.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def full_run(tiny_models, corpus, tmp_path_factory):
    """One complete run over the corpus with bad inputs; returns (cache path, exit code)."""
    cache = tmp_path_factory.mktemp("run") / "cache.zarr"
    rc = tempo(_compress_args(corpus, cache, tiny_models))
    return cache, rc


def test_good_pairs_complete_and_bad_videos_dead_lettered_once(full_run):
    from tempo_ops.store import CacheReader

    cache, rc = full_run
    assert rc == 1  # some items failed
    reader = CacheReader(str(cache))
    assert sorted(reader.entries()) == sorted(
        [("long", "q1"), ("long", "q2"), ("short/clip", "q1"), ("noquery", "_generic")]
    )
    letters = _dead_letters(cache)
    by_video = {d["video_id"]: d for d in letters}
    assert len(letters) == len(by_video) == 3  # exactly one record per bad video
    assert by_video["missing"]["code"] == "video_not_found"
    assert by_video["truncated"]["code"] == "corrupt_container"
    assert by_video["text"]["code"] in ("corrupt_container", "no_video_stream")
    for d in letters:
        assert d["stage"] in ("probe", "decode")
        assert d["query_id"] is None
        assert d["video_id"] in d["message"] or "mp4" in d["message"]
        assert d["attempt"] >= 1
    summary = _summary(cache)
    assert summary["failures"]["items"] == 3
    assert summary["counts"]["queries_completed"] == 4
    assert summary["counts"]["segments_decoded"] > LONG_SEGMENTS
    assert summary["fingerprint"] == reader.fingerprint
    assert summary["timing"]["segments_per_s"] > 0


def test_outputs_equal_direct_tempo_ops(full_run, tiny_models, corpus):
    from tempo_ops import video
    from tempo_ops.store import CacheReader
    from tempo_ops.svlm.compressor import Compressor

    cache, _ = full_run
    reader = CacheReader(str(cache))
    compressor = Compressor.from_pretrained(tiny_models["svlm"], memory_tokens=tiny_models["tempo"])
    segments = list(video.iter_segments(str(corpus.parent / "short.mp4"), video.SamplingConfig()))
    direct = compressor.compress(segments, ["Count the blocks."])
    entry = reader.entry("short/clip", "q1")
    assert entry.n_segments == len(segments)
    np.testing.assert_allclose(entry.read_all().astype(np.float32), direct.candidates[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(entry.relevance(), direct.relevance[0], atol=1e-5)
    meta = reader.video_meta("short/clip")
    assert meta["timestamp_texts"] == [s.timestamp_text for s in segments]


def test_int8_storage_form_end_to_end(full_run, tiny_models, corpus, tmp_path):
    """`--storage-form int8`: channel-scaled int8 entries, within the cosine target of the float16
    run's tokens, and the summary's bytes_written counts what the form stores."""
    from schemas import cache_layout as L
    from tempo_ops.store import CacheReader

    lines = [json.loads(x) for x in corpus.read_text().splitlines()]
    manifest = tmp_path / "short.jsonl"
    short = next(x for x in lines if x["video_id"] == "short/clip")
    manifest.write_text(json.dumps(dict(short, uri=str(corpus.parent / short["uri"]))) + "\n")
    cache = tmp_path / "int8.zarr"
    assert tempo(_compress_args(manifest, cache, tiny_models, "--storage-form", "int8")) == 0
    reader = CacheReader(str(cache))
    assert reader.storage_form == "int8" and reader.root_attrs[L.ROOT_INT8_SCHEME] == "token_channel"
    entry = reader.entry("short/clip", "q1")
    assert entry.verify(full=True) == []
    got = entry.read_all()
    ref = CacheReader(str(full_run[0])).entry("short/clip", "q1").read_all().astype(np.float32)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.999
    k, d = entry.K, entry.D
    assert _summary(cache)["counts"]["bytes_written"] == entry.n_segments * (k * d + k * 4 + d + 4)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_two_local_workers_give_the_single_worker_results(full_run, tiny_models, corpus, tmp_path, mode):
    from tempo_ops.store import CacheReader

    reference, _ = full_run
    cache = tmp_path / "cache.zarr"
    rc = tempo(_compress_args(corpus, cache, tiny_models, "--local_workers", "2", "--local_mode", mode))
    assert rc == 1  # the same bad inputs fail, the rest completes
    assert sorted(d["video_id"] for d in _dead_letters(cache)) == ["missing", "text", "truncated"]
    ref, got = CacheReader(str(reference)), CacheReader(str(cache))
    assert sorted(got.entries()) == sorted(ref.entries())
    for video_id, query_id in ref.entries():
        a, b = ref.entry(video_id, query_id), got.entry(video_id, query_id)
        # Each worker runs torch on fewer threads: float sums may round differently.
        np.testing.assert_allclose(b.read_all().astype(np.float32), a.read_all().astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(b.relevance(), a.relevance(), atol=1e-5)
    summary = _summary(cache)
    assert summary["counts"]["queries_completed"] == 4 and summary["failures"]["items"] == 3


def test_compressor_is_safe_to_share_between_threads(tiny_models, corpus):
    """--local_mode threads shares one model between worker threads: concurrent calls must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    from tempo_ops import video
    from tempo_ops.svlm.compressor import Compressor

    compressor = Compressor.from_pretrained(tiny_models["svlm"], memory_tokens=tiny_models["tempo"])
    jobs = [
        (list(video.iter_segments(str(corpus.parent / "short.mp4"))), ["Count the blocks."]),
        (list(video.iter_segments(str(corpus.parent / "long.mp4"), segments=range(0, 6))), ["What is shown?", "Is there a person?"]),
        (list(video.iter_segments(str(corpus.parent / "noquery.mp4"))), ["Describe it."]),
    ] * 2
    alone = [compressor.compress(segments, queries) for segments, queries in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: compressor.compress(*job), jobs))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b.candidates, a.candidates, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.relevance, a.relevance, rtol=1e-5, atol=1e-7)


def test_plain_zarr_sees_complete_markers(full_run):
    cache, _ = full_run
    root = zarr.open_group(str(cache), mode="r")
    assert root.attrs["layout_version"] >= 1


def test_rerun_skips_complete_pairs(full_run, tiny_models, corpus):
    cache, _ = full_run
    rc = tempo(_compress_args(corpus, cache, tiny_models))
    assert rc == 1  # the bad videos fail again, and only they
    summary = _summary(cache)
    assert summary["counts"]["queries_skipped_complete"] == 4
    assert summary["counts"].get("segments_compressed", 0) == 0
    assert summary["counts"].get("queries_completed", 0) == 0
    assert len(_dead_letters(cache)) == 3


def test_limit_then_resume_and_force(tiny_models, tmp_path):
    manifest = _write_corpus(tmp_path / "c", bad=False)
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress_args(manifest, cache, tiny_models, "--limit", "1")) == 0
    from tempo_ops.store import CacheReader

    assert sorted(CacheReader(str(cache)).entries()) == [("long", "q1"), ("long", "q2")]
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 0
    s = _summary(cache)
    assert s["counts"]["queries_skipped_complete"] == 2
    assert s["counts"]["queries_completed"] == 2
    assert tempo(_compress_args(manifest, cache, tiny_models, "--force", "--limit", "2")) == 0
    s = _summary(cache)
    assert s["counts"].get("queries_skipped_complete", 0) == 0
    assert s["counts"]["queries_completed"] == 3


def test_dry_run_prints_plan_and_writes_nothing(tiny_models, corpus, tmp_path, capsys):
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress_args(corpus, cache, tiny_models, "--dry-run")) == 0
    out = capsys.readouterr()
    assert "long" in out.out and "video_not_found" in out.out
    plan = json.loads(out.err.strip().splitlines()[-1])["dry_run"]
    assert plan["segments"] >= LONG_SEGMENTS + 1
    assert plan["units"] == 2 + 1 + 1
    assert plan["failed"] == 3
    assert not cache.exists()


def test_manifest_errors_fail_before_any_work(tiny_models, tmp_path, capsys):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"video_id": "a", "uri": "a.mp4"}\n{"video_id": "a", "uri": ""}\nnot json\n')
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 2
    err = capsys.readouterr().err
    assert "manifest_invalid" in err and "line 2" in err and "line 3" in err
    assert not cache.exists()


def test_unwritable_cache_location(tiny_models, corpus, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = tempo(_compress_args(corpus, blocker / "cache.zarr", tiny_models))
    assert rc == 2
    assert "error [cache_" in capsys.readouterr().err


def test_bad_convert_threads_refused_before_any_work(tiny_models, corpus, tmp_path, capsys):
    cache = tmp_path / "cache.zarr"
    rc = tempo(_compress_args(corpus, cache, tiny_models, "--convert-threads", "-1"))
    assert rc == 2
    assert "--convert-threads must be 0 (inline) or more" in capsys.readouterr().err
    assert not cache.exists()


def test_fingerprint_mismatch_refused(full_run, tiny_models, corpus, capsys):
    cache, _ = full_run
    rc = tempo(_compress_args(corpus, cache, tiny_models, "--max-frames", "64"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "fingerprint_mismatch" in err and "max_frames" in err


def _cache_files(cache: Path) -> dict[str, bytes]:
    """Relative path → bytes; entry version names (random per computation) replaced by VERSION."""
    return {
        re.sub(r"/v[0-9a-f]{16}/", "/VERSION/", str(p.relative_to(cache))): p.read_bytes()
        for p in sorted(cache.rglob("*"))
        if p.is_file()
    }


def _strip_times(doc: bytes) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith("_at") and k not in ("version", "pending_version")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(doc))


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_models, tmp_path):
    manifest = _write_corpus(tmp_path / "c", bad=False)
    reference = tmp_path / "reference.zarr"
    assert tempo(_compress_args(manifest, reference, tiny_models)) == 0

    cache = tmp_path / "cache.zarr"
    cmd = [sys.executable, "-m", "pipelines.cli", *_compress_args(manifest, cache, tiny_models)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TEMPO_PROGRESS_INTERVAL_S="0")
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stderr:
            # Blocks land unit by unit, all queries of a unit in a row: after 2 blocks at least
            # one unit has landed for every query (2 of the corpus's 6 blocks).
            if "blocks 2/" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed part-way"

    assert tempo(_compress_args(manifest, cache, tiny_models)) == 0
    summary = _summary(cache)
    assert summary["counts"]["units_skipped_landed"] >= 1  # landed work was not recomputed
    assert summary["counts"]["units_planned"] + summary["counts"]["units_skipped_landed"] == 4
    assert summary["counts"]["queries_completed"] == 4

    ref_files, got_files = _cache_files(reference), _cache_files(cache)
    assert sorted(ref_files) == sorted(got_files)
    for name, data in ref_files.items():
        if name.endswith("zarr.json"):
            assert _strip_times(data) == _strip_times(got_files[name]), name
        else:
            assert data == got_files[name], name  # array data byte-identical


def test_pipeline_constructs_for_remote_runners(tiny_models, corpus, tmp_path):
    """Dataflow / Spark / Flink: the graph builds with each runner's options (no cluster here)."""
    import apache_beam as beam

    from pipelines.beam_support import pipeline_options_from_args
    from pipelines.compress import CompressJob, ModelSpec, build_pipeline
    from tempo_ops.video import SamplingConfig

    job = CompressJob(
        manifest=str(corpus),
        cache="gs://bucket/cache.zarr",
        sampling=SamplingConfig(),
        model=ModelSpec("gs://bucket/svlm", None, 0, None, None, 16384, None),
        config={"compressor": {}, "sampling": {}, "stored_dtype": "float16"},
        unit_segments=32,
    )
    runner_args = {
        "DataflowRunner": [
            "--runner=DataflowRunner",
            "--project=p",
            "--region=us-central1",
            "--temp_location=gs://bucket/tmp",
            f"--setup_file={REPO / 'setup.py'}",
            "--machine_type=g2-standard-8",
            "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
        ],
        "FlinkRunner": ["--runner=FlinkRunner", "--flink_master=localhost:8081", "--environment_type=DOCKER"],
        "SparkRunner": ["--runner=SparkRunner", "--spark_master_url=spark://localhost:7077", "--environment_type=DOCKER"],
        "PortableRunner": ["--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=DOCKER"],
    }
    for name, args in runner_args.items():
        options = pipeline_options_from_args(args, job_name="tempo-compress")
        pipeline = beam.Pipeline(runner=beam.runners.DirectRunner(), options=options)  # never submitted
        build_pipeline(pipeline, job)
        labels = {t.full_label for t in pipeline.transforms_stack[0].parts}
        assert {"ReadManifest", "PlanVideo", "SpreadUnits", "CompressUnit", "WriteBlock", "FinalizeEntry"} <= labels, name
        proto = pipeline.to_runner_api()
        assert proto.components.transforms, name


def test_sdist_contains_everything_workers_import(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=REPO, check=True, capture_output=True)
    import tarfile

    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {str(p.relative_to(REPO)) for d in ("tempo_ops", "pipelines", "schemas") for p in (REPO / d).rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert "schemas/CACHE_LAYOUT.md" in names
    assert "constraints.txt" in names


class _WrappedCompressor:
    """The real compressor, calling ``before(queries)`` first on every ``compress``."""

    def __init__(self, inner, before):
        self.inner, self.before = inner, before

    def fingerprint(self):
        return self.inner.fingerprint()

    def compress(self, segments, queries):
        self.before(queries)
        return self.inner.compress(segments, queries)


def _wrap_compressor(monkeypatch, before) -> None:
    import pipelines.units as units_module  # the model stages load through pipelines.units

    real_load = units_module.load_compressor
    monkeypatch.setattr(units_module, "load_compressor", lambda spec: _WrappedCompressor(real_load(spec), before))


def test_model_and_write_failures_are_isolated(tiny_models, tmp_path, monkeypatch):
    """A model error of one query and a write error of one video become one dead letter each."""
    from tempo_ops.errors import CacheWriteError, InferenceError
    from tempo_ops.store import CacheReader, CacheWriter

    def fail_on_short_clip(queries):
        if "Count the blocks." in queries:
            raise InferenceError("out of memory (injected)", item="segment 0")

    _wrap_compressor(monkeypatch, fail_on_short_clip)
    real_write = CacheWriter.write_block

    def write_block(self, video_id, query_id, *args, **kwargs):
        if video_id == "noquery":
            raise CacheWriteError("gave up after 5 attempts: 503 (injected)", item=f"{video_id}/{query_id}")
        return real_write(self, video_id, query_id, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    manifest = _write_corpus(tmp_path / "c", bad=False)
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 1
    letters = {(d["video_id"], d["query_id"]): d for d in _dead_letters(cache)}
    assert set(letters) == {("short/clip", "q1"), ("noquery", "_generic")}
    assert letters[("short/clip", "q1")]["stage"] == "model"
    assert letters[("short/clip", "q1")]["code"] == "inference_error"
    assert letters[("noquery", "_generic")]["stage"] == "write"
    assert letters[("noquery", "_generic")]["code"] == "cache_write_error"
    assert sorted(CacheReader(str(cache)).entries()) == [("long", "q1"), ("long", "q2")]
    summary = _summary(cache)
    assert summary["failures"] == {"items": 2, "by_code": {"cache_write_error": 1, "inference_error": 1}}
    assert summary["counts"]["queries_failed"] == 2


def test_queries_are_rendered_with_the_prompt_template(tiny_models, tmp_path, monkeypatch):
    """The compressor reads the full benchmark prompt; the cache stores it and the template; the
    template is part of the entry's identity (``--prompt-template`` overrides the manifest)."""
    from tempo_ops.query_text import render_query
    from tempo_ops.store import CacheReader

    root = tmp_path / "c"
    root.mkdir()
    write_test_video(root / "a.mp4", n_frames=40, fps=10, width=80, height=64)
    write_test_video(root / "b.mp4", n_frames=24, fps=8, width=48, height=48)
    q = {"query_id": "q1", "text": "What is added first?", "options": ["salt", "oil", "sugar", "flour"], "answer": "B"}
    many = {"query_id": "q2", "text": "Which?", "options": [f"o{i}" for i in range(27)]}  # more options than letters
    lines = [
        {"video_id": "a", "uri": "a.mp4", "queries": [q], "prompt_template": "videomme"},
        {"video_id": "b", "uri": "b.mp4"},  # generic entry
        {"video_id": "c", "uri": "a.mp4", "queries": [many], "prompt_template": "lvbench"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seen: list[str] = []
    _wrap_compressor(monkeypatch, seen.extend)
    cache = tmp_path / "cache.zarr"
    videomme = render_query(q["text"], q["options"], "videomme")
    assert videomme.startswith("Select the best answer") and "\nB. oil\n" in videomme
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 1  # line c cannot be rendered
    (letter,) = _dead_letters(cache)
    assert (letter["video_id"], letter["stage"], letter["code"]) == ("c", "plan", "config_error")
    assert sorted(seen) == sorted([videomme, ""])
    reader = CacheReader(str(cache))
    e = reader.entry("a", "q1")
    assert (e.query_text, e.prompt_template) == (videomme, "videomme")
    g = reader.entry("b", "_generic")
    assert (g.query_text, g.prompt_template) == ("", "plain")
    # same template again: reused
    seen.clear()
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 1
    assert seen == [] and _summary(cache)["counts"]["queries_skipped_complete"] == 2
    # the override renders the same query under another template: a new entry; the generic one is kept
    assert tempo(_compress_args(manifest, cache, tiny_models, "--prompt-template", "longvideobench")) == 1
    lvb = render_query(q["text"], q["options"], "longvideobench")
    assert seen == [lvb] and lvb.endswith("Answer with the option's letter from the given choices directly.\n")
    e = CacheReader(str(cache)).entry("a", "q1")
    assert (e.query_text, e.prompt_template) == (lvb, "longvideobench")
    counts = _summary(cache)["counts"]
    assert counts["queries_completed"] == 1 and counts["queries_skipped_complete"] == 1


def test_unknown_prompt_template_and_numerics_flags_are_refused(tiny_models, corpus, tmp_path, capsys):
    for flag, value in (("--prompt-template", "nope"), ("--numerics", "fast")):
        with pytest.raises(SystemExit) as err:
            tempo(_compress_args(corpus, tmp_path / "x.zarr", tiny_models, flag, value))
        assert err.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()


def test_corrupt_entry_verify_dead_letter_repair_and_stale_inputs(tiny_models, tmp_path, capsys):
    """A flipped byte is reported by `tempo verify`, dead-lettered by a plain re-run, recomputed by --repair;
    a changed query text or video file makes the entry stale, recomputed."""
    from schemas import cache_layout as L
    from tempo_ops.store import CacheReader

    root = tmp_path / "c"
    root.mkdir()
    write_test_video(root / "short.mp4", n_frames=40, fps=10, width=80, height=64)
    manifest = root / "manifest.jsonl"

    def write_manifest(text: str) -> None:
        line = {"video_id": "short/clip", "uri": "short.mp4", "queries": [{"query_id": "q1", "text": text}]}
        manifest.write_text(json.dumps(line) + "\n")

    write_manifest("Count the blocks.")
    cache = tmp_path / "cache.zarr"
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 0
    original = CacheReader(str(cache)).entry("short/clip", "q1").read_all()
    version = CacheReader(str(cache)).entry("short/clip", "q1").version
    shard = cache / L.candidates_shard_key("short/clip", "q1", 0, version)
    data = bytearray(shard.read_bytes())
    data[123] ^= 0x04
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert tempo(["verify", str(cache)]) == 1
    assert "CORRUPT short/clip/q1" in capsys.readouterr().out
    # --repair checks every chunk crc32c and recomputes the corrupt entry (a plain re-run checks metadata,
    # indexes and relevance only)
    assert tempo(_compress_args(manifest, cache, tiny_models, "--repair")) == 0
    s = _summary(cache)
    assert s["counts"]["queries_corrupt_repaired"] == 1 and s["counts"]["queries_completed"] == 1
    assert tempo(["verify", str(cache)]) == 0
    e = CacheReader(str(cache)).entry("short/clip", "q1")
    np.testing.assert_array_equal(e.read_all(), original)
    assert e.version != version and e.inputs["video"]["size"] == (root / "short.mp4").stat().st_size
    # relevance damage is caught by the quick check of a plain re-run: dead letter, nothing recomputed
    rel = cache / L.relevance_chunk_key("short/clip", "q1", 0, e.version)
    rel.write_bytes(rel.read_bytes()[:-1] + bytes([rel.read_bytes()[-1] ^ 1]))
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 1
    assert [d["code"] for d in _dead_letters(cache)] == ["cache_corrupt"]
    assert tempo(_compress_args(manifest, cache, tiny_models, "--repair")) == 0
    # changed inputs: stale, recomputed
    write_manifest("Count the red blocks.")
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 0
    s = _summary(cache)
    assert s["counts"]["queries_stale_recomputed"] == 1 and s["counts"]["queries_completed"] == 1
    assert CacheReader(str(cache)).entry("short/clip", "q1").query_text == "Count the red blocks."
    os.utime(root / "short.mp4", (1_000_000_000, 1_000_000_000))  # the video file was replaced
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 0
    assert _summary(cache)["counts"]["queries_stale_recomputed"] == 1
    assert tempo(_compress_args(manifest, cache, tiny_models)) == 0
    assert _summary(cache)["counts"]["queries_skipped_complete"] == 1
