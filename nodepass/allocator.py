"""The C allocator's thresholds for a relaying process.

The data path allocates and frees buffers of 64-256 KiB many thousand times
a second (a ``recv`` of up to 64 KiB on every readable socket, up to
256 KiB of decrypted data per TLS read).  glibc's ``malloc`` serves blocks
above its mmap threshold (128 KiB at start, raised on the fly) with a fresh
``mmap`` and gives them back with ``munmap``, and it returns free memory at
the top of its heap to the system as soon as more than its trim threshold
(twice the mmap threshold) is free.  For such buffers both mean new pages
from the kernel, zeroed and faulted in, for every chunk relayed: measured
with a TLS pool (``tls=1``), that was 30-40 % of the CPU time per byte.

:func:`tune_allocator` fixes the mmap threshold at :data:`MMAP_THRESHOLD`
(blocks up to 1 MiB come from the heap and are reused) and the trim
threshold at :data:`TRIM_THRESHOLD` (at most that much free memory is kept
at the top of the heap), once, at start.  It does nothing where the C
library is not glibc, and leaves a threshold alone that the environment sets
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``; see ``mallopt(3)``).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: Blocks up to this size are served from the heap.
MMAP_THRESHOLD = 1 << 20
#: Free memory at the top of the heap kept for reuse, at most.
TRIM_THRESHOLD = 4 << 20

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> dict[str, int]:
    """Set the thresholds described in the module docstring; return those set."""
    if platform.libc_ver()[0] != "glibc":
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done: dict[str, int] = {}
    for env, param, value in (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ):
        if env in os.environ:
            continue
        if mallopt(param, value) == 1:
            done[env] = value
    return done
