"""torch's intra-op thread count for the calling thread only.

``torch.set_num_threads`` is process-wide: changing it for a moment would also slow the model
running in another thread of the same worker. With torch's OpenMP backend the count torch
uses is the calling thread's own OpenMP setting (``omp_get_max_threads``), so setting that
through the OpenMP runtime torch loaded changes this thread alone.

The cache writer uses it to run its float16/bfloat16 casts on one core while a writer thread
checksums and writes on the other (``tempo_ops.fs.put_local_files``): with torch's two
workers spinning beside the writer thread, the pipelined write was slower than no pipeline.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from typing import Any


@functools.cache
def _openmp() -> Any:
    """The OpenMP runtime torch calls (``omp_get_max_threads`` / ``omp_set_num_threads``), or None."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        lib = ctypes.CDLL(torch._C.__file__)  # symbol lookup covers its dependencies: torch's own libgomp
        lib.omp_get_max_threads.restype = ctypes.c_int
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return lib


@contextlib.contextmanager
def this_thread_torch_threads(n: int) -> Iterator[bool]:
    """Run torch ops of the calling thread on ``n`` intra-op threads inside the block; other
    threads keep theirs. Yields True when applied, False where the runtime does not allow it
    (torch without OpenMP, or a symbol not found): then nothing changes."""
    lib = _openmp()
    if lib is None:
        yield False
        return
    import torch

    # torch sets a thread's OpenMP count from its process-wide setting at the thread's first
    # call: make that call now, so it cannot undo ours later
    torch.get_num_threads()
    before = lib.omp_get_max_threads()
    lib.omp_set_num_threads(n)
    try:
        applied = torch.get_num_threads() == n
        if not applied:
            lib.omp_set_num_threads(before)
        yield applied
    finally:
        lib.omp_set_num_threads(before)
