"""Process-level settings that make CPU training faster.

glibc's ``malloc`` hands freed memory back to the operating system when the top of the heap is free ("trimming")
and serves large blocks with fresh ``mmap`` calls. A training step frees most of its activations at the end of
the backward pass and allocates them again in the next forward, so with the defaults every step can page-fault
the same memory back in: on MiniLM (batch 16, sequence 128) tens of thousands of page faults per step, 10-20 % of
the step time. How often it happens depends on the order of allocations, so it hits some training setups and
not others (see BENCHMARKS.md).

:func:`retain_freed_memory` keeps freed memory in the process instead. The cost: the resident size stays at its
peak. :func:`deltatune.train.train` calls it on CPU unless ``TrainArgs(retain_freed_memory=False)``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit systems
_done = False


def retain_freed_memory() -> bool:
    """Tell glibc ``malloc`` never to trim the heap and to serve blocks below 32 MB from it (not from ``mmap``).

    Process-wide and not undoable; idempotent. Returns True if applied, False where it does not apply (not Linux,
    or a C library without ``mallopt``).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
    return _done


__all__ = ["retain_freed_memory"]
