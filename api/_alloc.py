"""Keep glibc from handing large buffers back to the kernel after every use (``headwater perf``).

glibc serves an allocation above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised by its own heuristic)
with a fresh ``mmap`` and unmaps it when freed, and gives freed heap memory above ``M_TRIM_THRESHOLD``
back to the kernel. Either way the next buffer of that size starts on untouched pages, which the
kernel faults in and zeroes on first write. A client reading at full speed moves megabyte buffers
all the time (fetch answers, record batches), and on a virtual machine those faults cost: the perf
consumer spent a third of its CPU time in the kernel. Fixing the thresholds (32 MiB, 256 MiB) made
it 9% faster (median of five interleaved runs each: 285 against 262 MiB/s).

The cost is memory: the process keeps that much freed memory for reuse. This is a setting for a
process that streams data, like the perf tool, which calls it at start, as it tunes the garbage
collector. The library never changes it by itself; an application may set
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456`` in its environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_large_buffers"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest
TRIM_THRESHOLD_BYTES = 256 << 20


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds; False (and nothing changed) on another C library."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
