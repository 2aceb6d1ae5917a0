"""Corpus manifest: JSON Lines, one video per line (format version ``MANIFEST_VERSION``).

A line is a JSON object::

    {"video_id": "cooking_01", "uri": "videos/cooking_01.mp4",
     "queries": [{"query_id": "q1", "text": "What is added first?",
                  "options": ["A. salt", "B. oil"], "answer": "B"}],
     "metadata": {"source": "..."}, "prompt_template": "videomme", "manifest_version": 1}

- ``video_id`` (non-empty str, unique in the file) and ``uri`` (non-empty str) are required.
  A relative ``uri`` resolves against the manifest's directory (also for URLs such as
  ``memory://corpus/manifest.jsonl`` or ``gs://bucket/corpus/manifest.jsonl``).
- ``queries``: optional list (default ``[]``) of objects with ``query_id`` (non-empty str,
  unique within the video), ``text`` (non-empty str, not only whitespace: a video without
  questions omits ``queries`` and gets the query-agnostic entry), optional ``options``
  (non-empty list of str, or null) and ``answer`` (str or null).
- ``metadata``: optional JSON object (default ``{}``), passed through untouched.
- Every string (keys included) must be valid Unicode: a lone surrogate such as ``"\ud800"``
  (valid JSON, but not storable as UTF-8 in a cache, a tar member name or a summary) is an
  error. ``NaN``/``Infinity`` (accepted by Python's JSON reader, not by the JSON standard)
  are errors anywhere in a line.
- A line that is not valid UTF-8 is reported with its own line number.
- ``prompt_template``: optional name of the benchmark prompt template the line's queries are
  rendered with (``tempo_ops.query_text.TEMPLATES``: ``plain``, ``videomme``, ``lvbench``,
  ``mlvu``, ``longvideobench``; null or absent → ``plain``). A corpus names its benchmark's
  template on every line; ``tempo compress --prompt-template NAME`` overrides it for a run.
  The compressor reads ``render_query(text, options, template)``, and the cache stores that
  text and the template name with the entry. An unknown name is a manifest error.
- ``manifest_version``: optional int, default 1; any other version is rejected.
- Unknown keys (top level or in a query) are errors: they are usually typos
  (``"quries"``) that would otherwise silently drop data.
- Blank lines are skipped; line numbers in problems are 1-based physical lines.

Reading streams line by line through fsspec, so manifests with millions of lines are
never held in memory (only the seen video ids and their line numbers are kept, to find
duplicates). ``limit=N`` stops reading after the first N entries (``tempo compress
--limit``): only those lines are read and validated.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec

from tempo_ops.errors import InputError, ManifestError
from tempo_ops.keys import sanitize_key
from tempo_ops.query_text import TEMPLATES

MANIFEST_VERSION = 1
_TOP_KEYS = {"video_id", "uri", "queries", "metadata", "prompt_template", "manifest_version"}
_QUERY_KEYS = {"query_id", "text", "options", "answer"}


@dataclass(frozen=True)
class QueryEntry:
    """One question about a video. options: multiple-choice texts or None; answer: str or None."""

    query_id: str
    text: str
    options: list[str] | None = None
    answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "text": self.text, "options": self.options, "answer": self.answer}


@dataclass(frozen=True)
class VideoEntry:
    """One manifest line. ``uri`` is already resolved; ``line`` is the 1-based line number;
    ``prompt_template``: the line's template name, or None (the job's default applies)."""

    video_id: str
    uri: str
    queries: list[QueryEntry] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    prompt_template: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "video_id": self.video_id,
            "uri": self.uri,
            "queries": [q.to_dict() for q in self.queries],
            "metadata": self.metadata,
            "line": self.line,
            "prompt_template": self.prompt_template,
        }


class ManifestProblem(NamedTuple):
    """One problem: ``line`` (1-based; 0 = the file itself), ``field`` (dotted path) and ``message``."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


# --------------------------------------------------------------------------- paths
def manifest_base(url: str | os.PathLike) -> str:
    """The directory against which the manifest's relative ``uri``s resolve."""
    url = os.fspath(url)
    if "://" in url:
        head, _, _ = url.rstrip("/").rpartition("/")
        return head
    return os.path.dirname(os.path.abspath(url))


def resolve_uri(uri: str, base: str) -> str:
    """``uri`` unchanged when absolute (a URL or ``/path``), else joined to ``base``."""
    if "://" in uri or uri.startswith("/"):
        return uri
    if "://" in base:
        protocol, _, rest = base.partition("://")
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, uri))}" if rest else f"{protocol}://{uri}"
    return os.path.normpath(os.path.join(base, uri))


# --------------------------------------------------------------------------- parsing
def _check_line(obj: Any, line_no: int) -> list[ManifestProblem]:
    """Problems of one decoded line, without cross-line checks."""
    problems: list[ManifestProblem] = []

    def bad(fld: str, msg: str) -> None:
        problems.append(ManifestProblem(line_no, fld, msg))

    if not isinstance(obj, dict):
        bad("<line>", f"expected a JSON object, got {type(obj).__name__}")
        return problems
    for where, msg in _unstorable(obj, ""):
        bad(where or "<line>", msg)
    if problems:
        return problems  # the other checks would trip over the same values
    for key in sorted(set(obj) - _TOP_KEYS):
        bad(key, f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
    version = obj.get("manifest_version", MANIFEST_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        bad("manifest_version", f"must be an integer, got {version!r}")
    elif version != MANIFEST_VERSION:
        bad("manifest_version", f"unsupported version {version} (this reader knows {MANIFEST_VERSION})")
    for key in ("video_id", "uri"):
        value = obj.get(key)
        if key not in obj:
            bad(key, "missing")
        elif not isinstance(value, str):
            bad(key, f"must be a string, got {type(value).__name__}")
        elif not value.strip():
            bad(key, "must not be empty")
    if isinstance(obj.get("video_id"), str) and obj["video_id"]:
        try:
            sanitize_key(obj["video_id"])
        except InputError as exc:
            bad("video_id", exc.reason)
    template = obj.get("prompt_template")
    if template is not None and (not isinstance(template, str) or template not in TEMPLATES):
        bad("prompt_template", f"unknown prompt template {template!r} (known: {', '.join(TEMPLATES)})")
    metadata = obj.get("metadata", {})
    if metadata is not None and not isinstance(metadata, dict):
        bad("metadata", f"must be an object, got {type(metadata).__name__}")
    queries = obj.get("queries", [])
    if queries is None:
        queries = []
    if not isinstance(queries, list):
        bad("queries", f"must be a list, got {type(queries).__name__}")
        return problems
    seen: dict[str, int] = {}
    for i, q in enumerate(queries):
        where = f"queries[{i}]"
        if not isinstance(q, dict):
            bad(where, f"must be an object, got {type(q).__name__}")
            continue
        for key in sorted(set(q) - _QUERY_KEYS):
            bad(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(_QUERY_KEYS))})")
        qid = q.get("query_id")
        if "query_id" not in q:
            bad(f"{where}.query_id", "missing")
        elif not isinstance(qid, str):
            bad(f"{where}.query_id", f"must be a string, got {type(qid).__name__}")
        elif not qid.strip():
            bad(f"{where}.query_id", "must not be empty")
        elif qid in seen:
            bad(f"{where}.query_id", f"duplicate query_id {qid!r} (also queries[{seen[qid]}])")
        else:
            seen[qid] = i
        if "text" not in q:
            bad(f"{where}.text", "missing")
        elif not isinstance(q["text"], str):
            bad(f"{where}.text", f"must be a string, got {type(q['text']).__name__}")
        elif not q["text"].strip():
            bad(f"{where}.text", "must not be empty (a video without questions omits 'queries': it gets the query-agnostic entry)")
        options = q.get("options")
        if options is not None:
            if not isinstance(options, list) or not options:
                bad(f"{where}.options", "must be a non-empty list of strings or null")
            else:
                for j, opt in enumerate(options):
                    if not isinstance(opt, str):
                        bad(f"{where}.options[{j}]", f"must be a string, got {type(opt).__name__}")
        answer = q.get("answer")
        if answer is not None and not isinstance(answer, str):
            bad(f"{where}.answer", f"must be a string or null, got {type(answer).__name__}")
    return problems


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unstorable(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(field, message) for every string with a lone surrogate and every non-finite number in ``value``."""
    if isinstance(value, str):
        if _has_lone_surrogate(value):
            yield where, f"contains a lone surrogate ({ascii(value)[:60]}): not valid Unicode, cannot be stored"
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield where, f"non-finite number {value!r} is not valid JSON"
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{where}.{k}" if where else str(k)
            if _has_lone_surrogate(k):
                yield ascii(sub), f"key contains a lone surrogate ({ascii(k)[:60]}): not valid Unicode"
                continue
            yield from _unstorable(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _unstorable(v, f"{where}[{i}]")


def _decode(line: str | None, line_no: int, error: str | None = None) -> tuple[Any, list[ManifestProblem]]:
    if line is None:
        return None, [ManifestProblem(line_no, "<line>", error or "unreadable line")]
    try:
        return json.loads(line), []
    except json.JSONDecodeError as exc:
        return None, [ManifestProblem(line_no, "<line>", f"invalid JSON: {exc.msg} at column {exc.colno}")]


def _entry(obj: dict[str, Any], line_no: int, base: str) -> VideoEntry:
    queries = [
        QueryEntry(
            query_id=q["query_id"],
            text=q["text"],
            options=list(q["options"]) if q.get("options") is not None else None,
            answer=q.get("answer"),
        )
        for q in (obj.get("queries") or [])
    ]
    return VideoEntry(
        video_id=obj["video_id"],
        uri=resolve_uri(obj["uri"], base),
        queries=queries,
        metadata=dict(obj.get("metadata") or {}),
        line=line_no,
        prompt_template=obj.get("prompt_template"),
    )


def parse_manifest_line(line: str, base: str, line_no: int = 0) -> VideoEntry | None:
    """Parse one manifest line (None for a blank line); raise ManifestError if it is invalid.

    ``base`` is :func:`manifest_base` of the manifest. Cross-line checks (duplicate
    video ids) are not done here; :func:`validate_manifest` does them.
    """
    if not line.strip():
        return None
    obj, problems = _decode(line, line_no)
    problems = problems or _check_line(obj, line_no)
    if problems:
        raise ManifestError(f"invalid manifest line {line_no}: {problems[0].field}: {problems[0].message}", item=f"line {line_no}", problems=problems)
    return _entry(obj, line_no, base)


def _lines(url: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) per line, streamed; (line number, None, reason) for a line that is not UTF-8."""
    try:
        with fsspec.open(url, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                try:
                    yield n, raw.decode("utf-8"), None
                except UnicodeDecodeError as exc:
                    yield n, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except FileNotFoundError:
        raise ManifestError("manifest not found", item=url) from None
    except IsADirectoryError:
        raise ManifestError("manifest path is a directory", item=url) from None
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest: {exc}", item=url) from None


class _SeenIds:
    """Video ids seen so far → their first line (for duplicate detection)."""

    def __init__(self) -> None:
        self._first: dict[str, int] = {}

    def check(self, video_id: str, line: int) -> ManifestProblem | None:
        first = self._first.setdefault(video_id, line)
        if first == line:
            return None
        return ManifestProblem(line, "video_id", f"duplicate video_id {video_id!r} (first on line {first})")


def iter_manifest(url: str | os.PathLike, *, limit: int | None = None) -> Iterator[VideoEntry]:
    """Stream the manifest's entries (relative ``uri``s resolved); stop reading after ``limit`` entries.

    Fails fast: raises ManifestError at the first invalid line or duplicate video id.
    Use :func:`validate_manifest` to list every problem.
    """
    url = os.fspath(url)
    base = manifest_base(url)
    seen = _SeenIds()
    count = 0
    if limit is not None and limit <= 0:
        return
    for n, text, error in _lines(url):
        if text is None:
            problem = ManifestProblem(n, "<line>", error or "unreadable line")
            raise ManifestError(f"invalid manifest line {n}: {problem.message}", item=url, problems=[problem])
        entry = parse_manifest_line(text, base, n)
        if entry is None:
            continue
        duplicate = seen.check(entry.video_id, n)
        if duplicate is not None:
            raise ManifestError(f"invalid manifest line {n}: {duplicate.message}", item=url, problems=[duplicate])
        yield entry
        count += 1
        if limit is not None and count >= limit:
            return


def validate_manifest(url: str | os.PathLike, *, limit: int | None = None) -> list[ManifestProblem]:
    """Every problem of the manifest (empty list: valid). Streams; never raises for content.

    ``limit``: validate only the first ``limit`` entries and stop reading there.
    A missing or unreadable manifest is reported as one problem on line 0.
    """
    url = os.fspath(url)
    problems: list[ManifestProblem] = []
    seen = _SeenIds()
    n_entries = 0
    try:
        for n, text, error in _lines(url):
            if limit is not None and n_entries >= limit:
                break
            if text is not None and not text.strip():
                continue
            obj, line_problems = _decode(text, n, error)
            if not line_problems:
                line_problems = _check_line(obj, n)
            problems.extend(line_problems)
            n_entries += 1
            vid = obj.get("video_id") if isinstance(obj, dict) else None
            if isinstance(vid, str) and vid:
                duplicate = seen.check(vid, n)
                if duplicate is not None:
                    problems.append(duplicate)
    except ManifestError as exc:
        problems.append(ManifestProblem(0, "<file>", exc.reason))
        return problems
    if n_entries == 0:
        problems.append(ManifestProblem(0, "<file>", "manifest has no entries"))
    return problems


def manifest_error(url: str | os.PathLike, problems: list[ManifestProblem]) -> ManifestError:
    """A ManifestError for ``url`` listing ``problems`` (first few in the message)."""
    url = os.fspath(url)
    shown = "; ".join(str(p) for p in problems[:5])
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    return ManifestError(f"{len(problems)} problem(s): {shown}{more}", item=url, problems=list(problems))


def load_validated(url: str | os.PathLike) -> list[VideoEntry]:
    """Validate the whole manifest, then return its entries; ManifestError lists every problem."""
    problems = validate_manifest(url)
    if problems:
        raise manifest_error(url, problems)
    return list(iter_manifest(url))
