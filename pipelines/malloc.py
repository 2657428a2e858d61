"""glibc malloc settings for processes that run the model on the CPU (the pose and detector
actors).

By default glibc serves large blocks (from 128 kB up, a threshold it raises as blocks are freed)
with mmap and hands freed memory back to the kernel, so a forward pass that allocates and frees
the same large activations every batch pays page faults for them every batch. On the CPU machine
the tiny pose model ran 30.5 persons/s so and 40 with the settings below (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30  # blocks up to this size come from the heap and stay there when freed


def keep_freed_memory() -> bool:
    """Serve blocks up to KEEP_BYTES from the heap and do not return freed heap memory to the
    kernel: the process keeps its peak working set and reuses it. False where the C library is
    not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_BYTES) == 1
    # one arena: a thread started from now on (a Serve replica's `asyncio.to_thread`, Ray Data's
    # and Ray Train's call threads) allocates from the main heap too, which the thresholds keep;
    # its own arena's heaps (64 MB at most each) came and went with every batch's activations:
    # the tiny pose model on 1 thread, batches of 32, 26.0 persons/s in a second thread against
    # 34.4 in the main one; 31.8 and 32.5 so (session 14)
    ok = ok and mallopt(_M_ARENA_MAX, 1) == 1
    if not ok:
        log.info("mallopt refused the thresholds: the C library's defaults stay")
    return ok
