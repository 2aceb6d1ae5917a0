"""Shared test fixtures."""

from __future__ import annotations

import os

# gcsfs probes the bucket type for ~60 s per filesystem unless this is off (DESIGN.md 5).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
