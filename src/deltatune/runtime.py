"""Process-level settings that make CPU training faster.

glibc's ``malloc`` hands freed memory back to the operating system when the top of the heap is free ("trimming")
and serves large blocks with fresh ``mmap`` calls. A training step frees most of its activations at the end of
the backward pass and allocates them again in the next forward, so with the defaults every step can page-fault
the same memory back in: on MiniLM (batch 16, sequence 128) tens of thousands of page faults per step, 10-20 % of
the step time. How often it happens depends on the order of allocations, so it hits some training setups and
not others (see BENCHMARKS.md).

:func:`retain_freed_memory` keeps freed memory in the process instead; the cost is that the resident size stays
at its peak. :func:`release_freed_memory` hands the retained memory back and lets the heap shrink again (freed
blocks above 64 MB at its top are returned). :func:`deltatune.train.train` retains on CPU while it trains and
releases when it returns, unless ``TrainArgs(retain_freed_memory=False)``.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit systems


@functools.lru_cache(maxsize=1)
def _mallopt():
    """glibc's ``(mallopt, malloc_trim)``, or None where they are missing (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib.mallopt, lib.malloc_trim


def retain_freed_memory() -> bool:
    """Tell glibc ``malloc`` to serve blocks below 32 MB from its heap (not from fresh ``mmap`` calls) and never to
    trim the heap. Process-wide; idempotent. Returns False where it does not apply (not Linux/glibc)."""
    fns = _mallopt()
    if fns is None:
        return False
    mallopt, _ = fns
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Return the memory kept by :func:`retain_freed_memory` to the system and let the heap shrink again (trim
    threshold 64 MB, twice the mmap threshold, as glibc's own adaptive setting reaches). False where not glibc."""
    fns = _mallopt()
    if fns is None:
        return False
    mallopt, malloc_trim = fns
    ok = bool(mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX))
    malloc_trim(0)
    return ok


@contextlib.contextmanager
def freed_memory_retained():
    """``with freed_memory_retained(): ...`` retains freed memory inside the block and releases it after."""
    retained = retain_freed_memory()
    try:
        yield retained
    finally:
        if retained:
            release_freed_memory()


__all__ = ["freed_memory_retained", "release_freed_memory", "retain_freed_memory"]
