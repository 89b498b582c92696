"""One C heap for a prediction process (glibc), set at the process's entry point.

Imports nothing but ctypes, so `know predict` can call it before torch, zarr or Prefect start
a thread.
"""
from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameter number for the arena limit (malloc.h: M_ARENA_MAX)
_M_ARENA_MAX = -8


def one_heap() -> bool:
    """Stop glibc from giving new threads heaps (arenas) of their own, for the rest of the process.

    By default each thread that allocates gets an arena of its own (up to 8 per core), and an
    arena keeps what is freed in it for its own thread's next allocations. A streamed
    prediction allocates block-sized buffers from the task's thread, zarr's threads and
    torch's, so each arena ended up holding about a block it no longer used: the process grew
    by ~300 MB over its first blocks before it levelled off (1B parameters: 1350 MB peak).
    With the limit, freed memory is reused by whichever thread asks next, and the peak stays
    at the first block's (benchmarks/bench_stream.py; docs/performance.md), at the same speed.

    One-way and process-wide, and it only helps before threads have made their arenas: call
    it first thing in a process that will predict (`know predict` does). `MALLOC_ARENA_MAX=1`
    in the environment does the same from the start, for any process. Returns False, doing
    nothing, where glibc's mallopt is not there (another C library, or another allocator
    preloaded, which has its own settings).
    """
    if os.environ.get("LD_PRELOAD") or not hasattr(os, "confstr"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError, ValueError):
        return False
    return bool(mallopt(_M_ARENA_MAX, 1))
