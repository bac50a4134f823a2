"""Process-wide settings of the host a training runs on (pure standard library, no torch).

:func:`tune_allocator` keeps glibc's allocator from handing large freed blocks back to the kernel
between training steps. A CPU training step frees and re-allocates the same large activation and
gradient buffers every step; with glibc's defaults each of them is a fresh ``mmap`` (above the
dynamic mmap threshold) or is trimmed off the heap top after ``free``, so every step page-faults
(and the kernel zeroes) the same memory again. ``bench/training_steps.py`` measures what it pays.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("podium.host")

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Free memory at the top of the heap is returned to the OS only beyond this much, so the buffers one
# step frees stay mapped for the next (glibc's default: 128 KiB, raised dynamically to at most 32 MiB).
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
# Allocations below this come from the heap, not from a fresh mmap each time (default: 128 KiB,
# dynamic). Setting either threshold also switches glibc's dynamic adjustment of both off.
MMAP_THRESHOLD_BYTES = 256 * 1024 * 1024


def tune_allocator() -> bool:
    """Set glibc's trim and mmap thresholds (:data:`TRIM_THRESHOLD_BYTES`, :data:`MMAP_THRESHOLD_BYTES`)
    for this whole process; it cannot be undone. True when glibc's ``mallopt`` was found and both
    calls returned 1; False (and nothing changed) elsewhere, e.g. musl or macOS.

    Call it early, before the large tensors are allocated: it changes how later allocations are served.
    The cost is memory: up to the trim threshold of freed memory stays with the process.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        # glibc answers gnu_get_libc_version; musl has a mallopt stub that does nothing and returns 0
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    if not (trimmed and mapped):
        log.warning("mallopt refused a threshold (trim %s, mmap %s): allocator left partly tuned", trimmed, mapped)
    return trimmed and mapped
