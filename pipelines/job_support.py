"""Behaviour every ``tempo`` job shares (Beam-free): runs, summaries with history, signals,
storage options, output-location checks, stale temporary folders.

A job does::

    run = JobRun.start("compress", base=cache_url)          # run id, history location
    check_output_location(cache_url, {"--manifest": manifest}, what="--cache")
    with run.interruptible(partial=lambda: {...}):          # SIGINT/SIGTERM → JobInterrupted
        ... run the pipeline ...
    run.write_summary({...})                                 # history + latest copy

Files beside an output ``base`` (``{base}`` is the cache URL or the shards ``--out``):

- ``{base}.runs/{run_id}.summary.json`` and ``{base}.runs/{run_id}.deadletter.jsonl``: one
  pair per run, never overwritten (the history; run ids sort by start time);
- ``{base}.summary.json`` and ``{base}.deadletter.jsonl``: copies of the latest run's (the
  ``latest`` pointer; object stores have no symbolic links).

A job whose output is a directory of its own (``tempo eval --out DIR``) keeps them inside it
instead (``inside=True``): ``DIR/summary.json``, ``DIR/deadletter.jsonl`` and the history
``DIR/runs/{run_id}.summary.json``... Each summary names its
  ``run_id`` and ``status``: ``complete``, ``items_failed`` (some items dead-lettered, the
  rest done), ``failed`` (stopped by a fatal error such as ``disk_full``) or ``interrupted``
  (SIGINT/SIGTERM; counts are what this process saw so far).

Every file is written whole (:func:`tempo_ops.fs.write_bytes_atomic`): a temporary file
renamed into place locally, one PUT on object stores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tempo_ops.errors import ConfigError, OutputOverlapsInput, TempoError
from tempo_ops.fs import is_local_url, storage_error, url_to_fs, write_bytes_atomic

# Exit statuses: 0 all done, 1 some items dead-lettered, 2 configuration/fatal error,
# 128 + signal number when interrupted (130 SIGINT, 143 SIGTERM), as shells report them.
EXIT_OK, EXIT_ITEMS_FAILED, EXIT_ERROR = 0, 1, 2


class JobInterrupted(BaseException):
    """SIGINT or SIGTERM arrived during a job (a BaseException: ``except Exception`` in DoFns lets it pass)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signal_name}")


# --------------------------------------------------------------------------- storage options
def add_storage_option_argument(parser) -> None:
    """``--storage-option KEY=VALUE`` (repeatable): fsspec options for every URL the job touches."""
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for remote URLs (repeatable), e.g. endpoint_url=http://127.0.0.1:4443, "
        "token=anon, project=my-project",
    )


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["token=anon", "project=p"]`` → ``{"token": "anon", "project": "p"}``; ConfigError when malformed."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option must be KEY=VALUE, got {pair!r}", item="--storage-option")
        out[key.strip()] = value
    return out


def use_storage_options(args, urls: Iterable[str | None]) -> dict[str, Any]:
    """Parse ``args.storage_option`` and apply it to the given URLs' protocols; returns the options."""
    options = parse_storage_options(getattr(args, "storage_option", None) or [])
    apply_storage_options(options, [u for u in urls if u])
    return options


def _protocol(url: str) -> str | None:
    return None if is_local_url(url) else url.split("://", 1)[0]


def apply_storage_options(options: dict[str, Any], urls: Iterable[str]) -> None:
    """Make ``options`` the defaults of every remote protocol among ``urls`` (gs, s3, memory...).

    Sets fsspec's configuration (so every filesystem this process opens gets them, whichever
    module opens it) and the matching ``FSSPEC_<PROTOCOL>`` environment variable (so local
    worker subprocesses, which import fsspec afresh, get them too). Cluster workers read
    their own credentials.
    """
    if not options:
        return
    import fsspec.config

    for proto in sorted({p for p in (_protocol(u) for u in urls) if p}):
        names = {"gs", "gcs"} if proto in ("gs", "gcs") else {proto}
        for name in names:
            fsspec.config.conf.setdefault(name, {}).update(options)
            current = json.loads(os.environ.get(f"FSSPEC_{name.upper()}", "{}") or "{}")
            current.update(options)
            os.environ[f"FSSPEC_{name.upper()}"] = json.dumps(current)


# --------------------------------------------------------------------------- output locations
def _normalise(url: str) -> str:
    if is_local_url(url):
        path = url[len("file://") :] if url.startswith("file://") else url
        return os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    proto, _, rest = url.partition("://")
    return f"{proto}://{posixpath.normpath(rest).lstrip('/')}"


def _inside(child: str, parent: str) -> bool:
    return child.startswith(parent.rstrip("/") + "/")


def check_output_location(output: str, inputs: dict[str, str], *, what: str, storage_options: dict | None = None) -> None:
    """Refuse an ``output`` directory that is a file, or is, contains or lies inside an input.

    ``inputs`` maps an option name (``"--cache"``) to its URL. Raises OutputOverlapsInput
    (``output_overlaps_input``) or ConfigError naming both.
    """
    out = _normalise(output)
    for name, url in inputs.items():
        inp = _normalise(url)
        if out == inp:
            raise OutputOverlapsInput(f"{what} is the same location as {name} ({url}); it would overwrite it", item=output)
        if _inside(out, inp):
            raise OutputOverlapsInput(f"{what} lies inside {name} ({url}); outputs must not be written into an input", item=output)
        if _inside(inp, out):
            raise OutputOverlapsInput(f"{what} contains {name} ({url}); outputs must not enclose an input", item=output)
    if is_local_url(output):
        _check_local_writable(out, output, what)
        return
    try:
        fs, path = url_to_fs(output, storage_options)
        is_file = fs.isfile(path)
    except Exception:  # noqa: BLE001 - unreachable locations fail later with their own typed error
        return
    if is_file:
        raise ConfigError(f"{what} must be a directory, but a file is there", item=output)


def _check_local_writable(path: str, output: str, what: str) -> None:
    """A local output directory: not a file, and creatable/writable (checked before any work)."""
    from tempo_ops.errors import CacheNotWritable

    if os.path.isfile(path):
        raise ConfigError(f"{what} must be a directory, but a file is there", item=output)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        raise CacheNotWritable(f"{what} cannot be created: {probe} is a file, not a directory", item=output)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheNotWritable(f"{what} is not writable (no write permission on {probe})", item=output)


# --------------------------------------------------------------------------- temporary folders
def remove_stale_temp(base: str, storage_options: dict | None = None) -> list[str]:
    """Remove ``beam-temp-<name>*`` folders beside ``base`` left by interrupted runs; returns their paths.

    (Older versions wrote dead letters with Beam's ``WriteToText``, whose temporary folder an
    interrupted run leaves behind; none of today's jobs creates one.)
    """
    try:
        fs, path = url_to_fs(base.rstrip("/"), storage_options)
        parent, name = posixpath.split(path.rstrip("/"))
        if not fs.isdir(parent):
            return []
        removed = []
        for entry in fs.ls(parent, detail=False):
            if posixpath.basename(entry.rstrip("/")).startswith(f"beam-temp-{name}"):
                fs.rm(entry, recursive=True)
                removed.append(entry)
        return removed
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


# --------------------------------------------------------------------------- runs and summaries
def new_run_id() -> str:
    """``20261202T071500-1a2b3c4d``: sorts by start time (UTC), unique across concurrent runs."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def sidecar_url(base: str, suffix: str, run_id: str | None = None, *, inside: bool = False) -> str:
    """``{base}.{suffix}`` (latest) or ``{base}.runs/{run_id}.{suffix}`` (history); with
    ``inside``, ``{base}/{suffix}`` and ``{base}/runs/{run_id}.{suffix}``."""
    base = base.rstrip("/")
    sep = "/" if inside else "."
    return f"{base}{sep}runs/{run_id}.{suffix}" if run_id else f"{base}{sep}{suffix}"


def write_sidecar(
    base: str, suffix: str, data: bytes, run_id: str, storage_options: dict | None = None, *, inside: bool = False
) -> str:
    """Write ``data`` as this run's history file and as the latest copy; returns the history URL."""
    history = sidecar_url(base, suffix, run_id, inside=inside)
    write_bytes_atomic(history, data, storage_options)
    write_bytes_atomic(sidecar_url(base, suffix, inside=inside), data, storage_options)
    return history


def find_fatal(exc: BaseException) -> TempoError | None:
    """The typed error behind ``exc`` however a runner wrapped it: a fatal one (full disk,
    read-only output...) first, else any TempoError in the chain; None for a plain bug."""
    seen = set()
    typed: TempoError | None = None
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        found = storage_error(cur)
        if found is not None:
            return found
        if typed is None and isinstance(cur, TempoError):
            typed = cur
        cur = cur.__cause__ or cur.__context__
    if typed is not None:
        return typed
    # Some runners re-raise a worker's error as text only: recognise the stable codes.
    text = str(exc)
    from tempo_ops.errors import CacheNotWritable, DiskFull

    for cls in (DiskFull, CacheNotWritable):
        marker = f"{cls.__name__}: "
        if marker in text:
            reason = text.split(marker, 1)[1].splitlines()[0]
            return cls(reason.split(" [while running", 1)[0].strip())
    return None


@dataclass
class JobRun:
    """One run of a job writing beside ``base``: its id, start time and summary/dead-letter files."""

    job: str
    base: str
    run_id: str = field(default_factory=new_run_id)
    started: float = field(default_factory=time.time)
    storage_options: dict[str, Any] | None = None
    inside: bool = False  # summary and history inside ``base`` (a directory), not beside it

    @classmethod
    def start(cls, job: str, base: str, storage_options: dict | None = None, *, inside: bool = False) -> JobRun:
        """A new run; removes stale temporary folders of earlier, interrupted runs."""
        run = cls(job, base.rstrip("/"), storage_options=storage_options, inside=inside)
        remove_stale_temp(run.base, storage_options)
        return run

    @property
    def summary_url(self) -> str:
        return sidecar_url(self.base, "summary.json", inside=self.inside)

    @property
    def dead_letter_url(self) -> str:
        return sidecar_url(self.base, "deadletter.jsonl", inside=self.inside)

    @property
    def history_url(self) -> str:
        return f"{self.base}/runs/" if self.inside else f"{self.base}.runs/"

    @property
    def own_dead_letter_url(self) -> str:
        """This run's dead letters (the latest copy may already be a concurrent run's)."""
        return sidecar_url(self.base, "deadletter.jsonl", self.run_id, inside=self.inside)

    def elapsed(self) -> float:
        return time.time() - self.started

    def write_summary(self, doc: dict[str, Any], *, status: str = "complete") -> dict[str, Any]:
        """Add run id, job, status and times to ``doc`` and write it (history + latest)."""
        doc = {
            "job": self.job,
            "run_id": self.run_id,
            "status": status,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "history": self.history_url,
            **doc,
        }
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        write_sidecar(self.base, "summary.json", data, self.run_id, self.storage_options, inside=self.inside)
        return doc

    @contextlib.contextmanager
    def interruptible(
        self, partial: Callable[[], dict[str, Any]] | None = None, cleanup: Callable[[], Any] | None = None
    ) -> Iterator[None]:
        """Run the block with SIGINT/SIGTERM turned into :class:`JobInterrupted`; fatal errors typed.

        On a signal: a partial summary (``partial()`` plus ``status: interrupted``) is written,
        stale temporary folders are removed, and JobInterrupted is raised (the CLI prints one
        line and exits 130/143). On a fatal storage error hidden in a runner's exception: the
        summary says ``status: failed`` with the error, and the typed error is raised.
        ``cleanup()`` runs in both cases (e.g. releasing this run's leases).
        """
        state = _SignalState()
        with _signals_raise(state):
            try:
                yield
                return
            except BaseException as exc:  # noqa: BLE001 - classified below, always re-raised
                if state.signum is None and isinstance(exc, KeyboardInterrupt):
                    state.signum = signal.SIGINT
                if state.signum is not None:
                    failure: BaseException = JobInterrupted(state.signum)
                    status, extra = "interrupted", {"signal": signal.Signals(state.signum).name}
                else:
                    fatal = find_fatal(exc)
                    if fatal is None:
                        raise
                    failure, status, extra = fatal, "failed", {"error": fatal.to_record()}
        # Outside the handlers: a second Ctrl-C during clean-up is ignored, not a traceback.
        with _signals_ignored():
            doc = {"wall_s": round(self.elapsed(), 3), **extra}
            try:
                doc.update(partial() if partial else {})
            except Exception as exc:  # noqa: BLE001 - the summary says what could not be gathered
                doc["partial_counts_error"] = repr(exc)
            try:
                self.write_summary(doc, status=status)
            except Exception as exc:  # noqa: BLE001 - e.g. the disk is full: say so, keep the first error
                print(f"[{self.job}] could not write the summary: {exc}", file=sys.stderr)
            remove_stale_temp(self.base, self.storage_options)
            if cleanup is not None:
                try:
                    cleanup()
                except Exception as exc:  # noqa: BLE001 - best effort; leases lapse by themselves
                    print(f"[{self.job}] clean-up incomplete: {exc}", file=sys.stderr)
        raise failure from None


class _SignalState:
    signum: int | None = None


_pending_signum: int | None = None  # the signal the running job is unwinding from (set by the handler below)


def pending_interrupt() -> int | None:
    """The signal (SIGINT/SIGTERM) this process's running job received, or None.

    The handler raises JobInterrupted wherever the main thread is; a C library running a Python
    callback there (PyAV's I/O callbacks) swallows it and reports its own error instead (a
    "corrupt" video). So an item that fails while this is set may have failed *because* of the
    signal: ``DeadLetter.from_exception`` then raises JobInterrupted rather than record it.
    """
    return _pending_signum


@contextlib.contextmanager
def _signals_raise(state: _SignalState) -> Iterator[None]:
    """SIGINT/SIGTERM raise JobInterrupted in the main thread (once; later ones are ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        global _pending_signum
        if state.signum is not None:
            return
        state.signum = _pending_signum = signum
        # Runners log the exception of every step it unwinds through: the one line is ours.
        logging.disable(logging.CRITICAL)
        raise JobInterrupted(signum)

    # Our JobInterrupted, raised inside a C library's callback that cannot propagate it, is
    # printed by the library (PyAV's I/O callbacks: a traceback through sys.excepthook, then
    # "Exception ignored in: 'av.container.pyio.pyio_seek'" through sys.unraisablehook). The job
    # unwinds anyway (pending_interrupt), so both stay quiet about it.
    previous_excepthook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb) -> None:
        if not isinstance(value, JobInterrupted):
            previous_excepthook(kind, value, tb)

    def unraisable(info) -> None:
        if not isinstance(info.exc_value, JobInterrupted):
            previous_unraisable(info)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.excepthook, sys.unraisablehook = excepthook, unraisable
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sys.excepthook, sys.unraisablehook = previous_excepthook, previous_unraisable
        if state.signum is not None:
            global _pending_signum
            _pending_signum = None
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises JobInterrupted in the main thread (as SIGINT raises KeyboardInterrupt) inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise JobInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
