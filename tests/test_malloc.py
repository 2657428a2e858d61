"""`keep_freed_memory`: after it, a freed 64 MB block stays in the process for reuse (without it
glibc unmaps it on free), and a thread started later allocates from the main arena; run in fresh
interpreters, the test process keeps its defaults."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import os, sys
import numpy as np
from pipelines.actors import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if sys.argv[1] == "keep":
    assert keep_freed_memory()
block = np.ones(64 * 2**20, np.uint8)  # touched: resident
before_free = rss_mb()
del block
print(before_free - rss_mb())  # MB given back to the kernel by the free
"""


def _given_back_mb(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_blocks_stay_in_the_process():
    assert _given_back_mb("default") > 60  # glibc's default: a block this large is unmapped
    assert _given_back_mb("keep") < 4  # kept for the next batch's activations


THREAD = """
import ctypes, sys, threading
import numpy as np
from pipelines.actors import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()

def work():  # as a Serve replica's asyncio.to_thread, Ray's call threads
    block = np.ones(2**20, np.uint8)
    del block

thread = threading.Thread(target=work)
thread.start()
thread.join()
ctypes.CDLL(None).malloc_stats()  # each arena's figures, on stderr
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_a_thread_started_after_it_allocates_from_the_main_arena():
    def arenas(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", THREAD, mode], capture_output=True, text=True, check=True
        )
        return sum(line.startswith("Arena ") for line in done.stderr.splitlines())

    assert arenas("default") == 2  # the thread's own arena, whose heaps come and go
    assert arenas("keep") == 1
