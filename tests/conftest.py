"""Shared test fixtures."""

from __future__ import annotations

import os

# gcsfs probes the bucket type for ~60 s per filesystem unless this is off (docs/METHOD.md "Environment").
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI explores the same examples on every run (no flaky reds); local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random-weight models built locally once per test session: {"svlm": dir, "tempo": dir}."""
    from tempo_ops.svlm.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)
