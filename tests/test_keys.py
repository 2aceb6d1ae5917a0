"""tempo_ops.keys.sanitize_key: the only way user ids become paths and keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo_ops.errors import InputError
from tempo_ops.keys import MAX_PLAIN_LENGTH, is_hashed_key, sanitize_key, unsanitize_key

SAFE = re.compile(r"[A-Za-z0-9_~-]+")


def _assert_safe(key: str) -> None:
    assert SAFE.fullmatch(key), key
    assert "/" not in key and "." not in key and not key.startswith("_")
    assert len(key) <= MAX_PLAIN_LENGTH


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("video_01", "video_01"),
        ("A-b-9", "A-b-9"),
        ("a/b", "a~2fb"),
        (".", "~2e"),
        ("..", "~2e~2e"),
        ("../../etc/passwd", "~2e~2e~2f~2e~2e~2fetc~2fpasswd"),
        ("_private", "~5fprivate"),
        ("__zarr", "~5f_zarr"),  # only the leading "_" is escaped
        ("a~b", "a~7eb"),
        ("tab\there", "tab~09here"),
        ("nul\x00", "nul~00"),
        ("é", "~c3~a9"),
        ("日本", "~e6~97~a5~e6~9c~ac"),
        ("a b.mp4", "a~20b~2emp4"),
    ],
)
def test_hostile_ids_hand_computed(value, key):
    assert sanitize_key(value) == key
    _assert_safe(key)
    assert unsanitize_key(key) == value


def test_long_ids_are_hashed_and_bounded():
    long_id = "x" * 10_000
    key = sanitize_key(long_id)
    _assert_safe(key)
    assert is_hashed_key(key) and len(key) <= MAX_PLAIN_LENGTH
    assert sanitize_key(long_id) == key  # deterministic
    assert sanitize_key(long_id + "y") != key
    assert sanitize_key("x" * 9_999 + "z") != key  # same prefix, different tail
    with pytest.raises(InputError, match="hash"):
        unsanitize_key(key)
    escaped = sanitize_key("/" * 5000)  # escapes are never cut in half
    _assert_safe(escaped)
    assert not re.search(r"~[0-9a-f]?~h", escaped)


def test_boundary_length():
    exact = "a" * MAX_PLAIN_LENGTH
    assert sanitize_key(exact) == exact and not is_hashed_key(exact)
    assert is_hashed_key(sanitize_key(exact + "a"))


@pytest.mark.parametrize("bad", ["", None, 5, b"bytes"])
def test_invalid_values(bad):
    with pytest.raises(InputError):
        sanitize_key(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=60), min_size=2, max_size=30, unique=True))
def test_injective_and_reversible(values):
    keys = [sanitize_key(v) for v in values]
    assert len(set(keys)) == len(values)
    for v, k in zip(values, keys):
        _assert_safe(k)
        if not is_hashed_key(k):
            assert unsanitize_key(k) == v


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=400))
def test_any_text_gives_a_safe_key(value):
    _assert_safe(sanitize_key(value))
