"""Corpus manifest (schemas/manifest.py), the sample corpus and the two CLI commands."""

from __future__ import annotations

import json
import os

import fsspec
import pytest

from pipelines import cli
from schemas.manifest import (
    MANIFEST_VERSION,
    ManifestProblem,
    QueryEntry,
    iter_manifest,
    load_validated,
    manifest_base,
    parse_manifest_line,
    resolve_uri,
    validate_manifest,
)
from tempo_ops.errors import ManifestError
from tempo_ops.synthetic import write_sample_corpus


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return str(path)


GOOD = [
    {"video_id": "a", "uri": "videos/a.mp4", "queries": [{"query_id": "q1", "text": "What?", "options": ["A. x", "B. y"], "answer": "A"}]},
    "",
    {"video_id": "b", "uri": "/abs/b.mp4", "metadata": {"k": 1}, "manifest_version": 1},
    {"video_id": "c", "uri": "gs://bucket/c.mp4", "queries": [{"query_id": "q1", "text": "Where?"}, {"query_id": "q2", "text": "Why?", "options": None, "answer": None}]},
]


def test_good_manifest_entries(tmp_path):
    url = _write(tmp_path / "manifest.jsonl", GOOD)
    assert MANIFEST_VERSION == 1
    assert validate_manifest(url) == []
    entries = list(iter_manifest(url))
    assert [e.video_id for e in entries] == ["a", "b", "c"]
    assert [e.line for e in entries] == [1, 3, 4]  # blank line 2 skipped, numbers are physical lines
    assert entries[0].uri == os.path.join(str(tmp_path), "videos", "a.mp4")
    assert entries[1].uri == "/abs/b.mp4" and entries[2].uri == "gs://bucket/c.mp4"
    assert entries[0].queries == [QueryEntry("q1", "What?", ["A. x", "B. y"], "A")]
    assert entries[1].queries == [] and entries[1].metadata == {"k": 1}
    assert entries[2].queries[0] == QueryEntry("q1", "Where?", None, None)
    assert load_validated(url) == entries
    assert entries[0].to_dict()["queries"][0]["options"] == ["A. x", "B. y"]


def test_relative_uris_resolve_against_urls():
    assert manifest_base("memory://corpus/sub/manifest.jsonl") == "memory://corpus/sub"
    assert resolve_uri("v/a.mp4", "memory://corpus/sub") == "memory://corpus/sub/v/a.mp4"
    assert resolve_uri("../a.mp4", "gs://bucket/dir") == "gs://bucket/a.mp4"
    assert resolve_uri("s3://x/y.mp4", "gs://bucket/dir") == "s3://x/y.mp4"
    assert resolve_uri("a.mp4", "/data/corpus") == "/data/corpus/a.mp4"


def test_memory_manifest():
    url = "memory://tempo-test-manifest/corpus/manifest.jsonl"
    with fsspec.open(url, "w") as fh:
        fh.write(json.dumps({"video_id": "x", "uri": "clips/x.mp4"}) + "\n")
    (entry,) = list(iter_manifest(url))
    assert entry.uri == "memory://tempo-test-manifest/corpus/clips/x.mp4"


def test_every_problem_is_reported(tmp_path):
    lines = [
        "{not json",  # 1
        {"uri": "a.mp4"},  # 2 missing video_id
        {"video_id": "", "uri": "a.mp4"},  # 3 empty id
        {"video_id": "v4", "uri": 5},  # 4 uri type
        {"video_id": "v5", "uri": "a.mp4", "queries": "what?"},  # 5 queries type
        {"video_id": "v6", "uri": "a.mp4", "queries": [{"query_id": "q", "text": "t"}, {"query_id": "q", "text": "u"}]},  # 6 dup query
        {"video_id": "v7", "uri": "a.mp4", "queries": [{"query_id": "q", "text": "t", "options": "A"}]},  # 7 options
        {"video_id": "v8", "uri": "a.mp4", "queries": [{"query_id": "q", "text": "t", "answer": 3}]},  # 8 answer
        {"video_id": "v9", "uri": "a.mp4", "metadata": [1]},  # 9 metadata
        {"video_id": "v10", "uri": "a.mp4", "quries": []},  # 10 unknown key
        {"video_id": "v11", "uri": "a.mp4", "manifest_version": 2},  # 11 version
        {"video_id": "v4", "uri": "b.mp4"},  # 12 duplicate video id
        [1, 2],  # 13 not an object
        {"video_id": "v14", "uri": "a.mp4", "queries": [{"text": "no id"}, {"query_id": "q", "text": None}, 7]},  # 14
        {"video_id": "v15", "uri": "a.mp4", "queries": [{"query_id": "q", "text": "t", "options": ["a", 2], "hint": 1}]},  # 15
    ]
    url = _write(tmp_path / "bad.jsonl", lines)
    problems = validate_manifest(url)
    got = {(p.line, p.field) for p in problems}
    expected = {
        (1, "<line>"),
        (2, "video_id"),
        (3, "video_id"),
        (4, "uri"),
        (5, "queries"),
        (6, "queries[1].query_id"),
        (7, "queries[0].options"),
        (8, "queries[0].answer"),
        (9, "metadata"),
        (10, "quries"),
        (11, "manifest_version"),
        (12, "video_id"),
        (13, "<line>"),
        (14, "queries[0].query_id"),
        (14, "queries[1].text"),
        (14, "queries[2]"),
        (15, "queries[0].options[1]"),
        (15, "queries[0].hint"),
    }
    assert got == expected
    by_line = {p.line: p for p in problems}
    assert "duplicate video_id 'v4' (first on line 4)" in by_line[12].message
    assert "unsupported version 2" in by_line[11].message
    assert all(isinstance(p, ManifestProblem) for p in problems)
    with pytest.raises(ManifestError) as err:
        load_validated(url)
    assert len(err.value.problems) == len(problems) and err.value.code == "manifest_invalid"
    assert url in str(err.value) and "18 problem(s)" in str(err.value)
    with pytest.raises(ManifestError, match="line 1"):
        list(iter_manifest(url))  # fail fast on the first bad line


def test_prompt_template_field(tmp_path):
    url = _write(tmp_path / "m.jsonl", [
        {"video_id": "a", "uri": "a.mp4", "prompt_template": "videomme"},
        {"video_id": "b", "uri": "b.mp4", "prompt_template": None},
        {"video_id": "c", "uri": "c.mp4"},
    ])
    assert validate_manifest(url) == []
    entries = list(iter_manifest(url))
    assert [e.prompt_template for e in entries] == ["videomme", None, None]
    assert entries[0].to_dict()["prompt_template"] == "videomme"
    bad = _write(tmp_path / "bad.jsonl", [
        {"video_id": "a", "uri": "a.mp4", "prompt_template": "VideoMME"},
        {"video_id": "b", "uri": "b.mp4", "prompt_template": 3},
    ])
    problems = validate_manifest(bad)
    assert [(p.line, p.field) for p in problems] == [(1, "prompt_template"), (2, "prompt_template")]
    assert "unknown prompt template 'VideoMME'" in problems[0].message and "longvideobench" in problems[0].message
    with pytest.raises(ManifestError, match="prompt_template"):
        parse_manifest_line(json.dumps({"video_id": "a", "uri": "a.mp4", "prompt_template": "nope"}), "/base", 1)


def test_iter_manifest_rejects_duplicates(tmp_path):
    url = _write(tmp_path / "dup.jsonl", [{"video_id": "a", "uri": "x"}, {"video_id": "a", "uri": "y"}])
    it = iter_manifest(url)
    assert next(it).uri.endswith("x")
    with pytest.raises(ManifestError, match="duplicate video_id 'a'"):
        next(it)


def test_missing_empty_and_binary_manifests(tmp_path):
    assert [p.field for p in validate_manifest(str(tmp_path / "none.jsonl"))] == ["<file>"]
    with pytest.raises(ManifestError, match="not found"):
        list(iter_manifest(str(tmp_path / "none.jsonl")))
    empty = _write(tmp_path / "empty.jsonl", ["", "   "])
    assert validate_manifest(empty) == [ManifestProblem(0, "<file>", "manifest has no entries")]
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    (problem,) = validate_manifest(str(tmp_path / "bin.jsonl"))
    assert problem.line == 1 and "UTF-8" in problem.message  # the line it is on


def test_parse_manifest_line():
    assert parse_manifest_line("  \n", "/base") is None
    entry = parse_manifest_line('{"video_id": "v", "uri": "a.mp4"}', "/base", 7)
    assert entry.uri == "/base/a.mp4" and entry.line == 7
    with pytest.raises(ManifestError, match="line 3"):
        parse_manifest_line('{"video_id": "v"}', "/base", 3)


def test_hostile_ids_are_accepted_as_data(tmp_path):
    url = _write(tmp_path / "m.jsonl", [{"video_id": "../../etc/passwd", "uri": "a.mp4"}, {"video_id": "a/b.c", "uri": "b.mp4"}])
    assert validate_manifest(url) == []
    assert [e.video_id for e in iter_manifest(url)] == ["../../etc/passwd", "a/b.c"]  # keys are made later by sanitize_key


def test_large_manifest_streams_lazily(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(200_000):
            fh.write(f'{{"video_id": "v{i}", "uri": "videos/v{i}.mp4"}}\n')
        fh.write("{broken\n")
    problems = validate_manifest(str(path))
    assert problems == [ManifestProblem(200_001, "<line>", problems[0].message)]

    import schemas.manifest as manifest_module

    lines_read = []
    real_open = manifest_module.fsspec.open

    class CountingFile:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            self.inner = self.fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def __iter__(self):
            for line in self.inner:
                lines_read.append(1)
                yield line

    monkeypatch.setattr(manifest_module.fsspec, "open", lambda *a, **k: CountingFile(real_open(*a, **k)))
    it = iter_manifest(str(path))
    first = [next(it) for _ in range(3)]
    assert [e.video_id for e in first] == ["v0", "v1", "v2"]
    assert len(lines_read) == 3  # line by line: nothing beyond what was asked has been read
    it.close()


# --------------------------------------------------------------------------- sample corpus + CLI
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_sample_corpus(tmp_path_factory.mktemp("corpus"))


def test_sample_corpus(corpus):
    assert validate_manifest(corpus) == []
    entries = list(iter_manifest(corpus))
    assert len(entries) == 4
    assert all(2 <= len(e.queries) <= 3 for e in entries[:3])
    assert any(q.options and q.answer for e in entries for q in e.queries)
    assert all(os.path.exists(e.uri) for e in entries)


def test_probe_cli(corpus, capsys):
    rc = cli.main(["probe", "--manifest", corpus])
    out = capsys.readouterr().out
    assert rc == 1  # the corrupt entry fails, the others are still reported
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"kitchen_short", "street_walk", "phone_portrait", "broken_upload"}
    assert "error [corrupt_container]" in rows["broken_upload"]
    assert "640x360" in rows["street_walk"] and "512x288" in rows["street_walk"]
    # 360x202 coded, shown upright as 202x360: longer side <= 512 px, so not resized at all
    assert " 90 " in rows["phone_portrait"] and rows["phone_portrait"].split()[4:6] == ["360x202", "202x360"]
    rc = cli.main(["probe", "--json", "--target-fps", "1", str(os.path.join(os.path.dirname(corpus), "videos", "kitchen_short.mp4"))])
    rec = json.loads(capsys.readouterr().out.strip())
    assert rc == 0
    assert rec["resized"] == [320, 240] and rec["display_size"] == [320, 240]
    assert rec["n_sampled"] == 8 and rec["duration_s"] == 6.0 and rec["n_segments"] == 1 and rec["first_timestamp"] == "<3.0 seconds>"  # real_fps = 8 / 6 s


def test_probe_cli_bad_options(capsys):
    assert cli.main(["probe", "--window", "0", "x.mp4"]) == 2
    assert "error [config_error]" in capsys.readouterr().err
    assert cli.main(["probe"]) == 2


def test_validate_manifest_cli(tmp_path, corpus, capsys):
    assert cli.main(["validate-manifest", corpus]) == 0
    assert "valid (4 videos, 8 queries)" in capsys.readouterr().out
    bad = _write(tmp_path / "bad.jsonl", [{"video_id": "a"}, "nope"])
    assert cli.main(["validate-manifest", bad]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == ["line 1: uri: missing", out[1]] and out[1].startswith("line 2: <line>: invalid JSON")
