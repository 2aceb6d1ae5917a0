"""One sanitising function for every key built from user data.

Video ids and query ids become Zarr group names, file names and WebDataset sample keys.
``sanitize_key`` maps any string to a key that

- contains only ``[A-Za-z0-9_-]`` and ``~`` (no ``/``, ``.``, ``..``, control characters,
  so it is a safe path component, a valid Zarr node name and a dot-free WebDataset key);
- is injective (collision-free) for keys up to ``MAX_PLAIN_LENGTH`` characters, because
  every other character is escaped as ``~XX`` (its UTF-8 bytes in hex) and ``~`` itself is
  escaped; such keys are reversible with ``unsanitize_key``;
- stays short: when the escaped form is longer than ``MAX_PLAIN_LENGTH`` it is cut and
  suffixed with ``~h`` plus 32 hex digits of the SHA-256 of the original (collision-free
  in practice; the original id is always stored in attributes beside the key, which is
  how readers map keys back).
"""

from __future__ import annotations

import hashlib
import re

from tempo_ops.errors import InputError

MAX_PLAIN_LENGTH = 120
_SAFE = re.compile(r"[A-Za-z0-9_-]")
_HASHED = "~h"


def sanitize_key(value: str) -> str:
    """Return the safe key for ``value`` (a non-empty str). Deterministic."""
    if not isinstance(value, str):
        raise InputError(f"key must be a string, got {type(value).__name__}", item=repr(value)[:80])
    if value == "":
        raise InputError("key must not be empty", item="''")
    out: list[str] = []
    for i, ch in enumerate(value):
        # A leading "_" is escaped too: Zarr v3 reserves node names starting with "__".
        if _SAFE.fullmatch(ch) and not (i == 0 and ch == "_"):
            out.append(ch)
        else:
            out.extend(f"~{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    key = "".join(out)
    if len(key) > MAX_PLAIN_LENGTH:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        head = key[: MAX_PLAIN_LENGTH - len(_HASHED) - 32]
        head = re.sub(r"~[0-9a-f]?$", "", head)  # never cut an escape in half
        key = f"{head}{_HASHED}{digest}"
    return key


def is_hashed_key(key: str) -> bool:
    """True when ``key`` was shortened with a hash (so it cannot be reversed by itself)."""
    return _HASHED in key


def unsanitize_key(key: str) -> str:
    """Invert ``sanitize_key`` for keys that were not shortened with a hash."""
    if is_hashed_key(key):
        raise InputError("key was shortened with a hash; read the original id from its attributes", item=key)
    raw = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "~":
            raw.append(int(key[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(key[i].encode("ascii"))
            i += 1
    return raw.decode("utf-8", "surrogatepass")
