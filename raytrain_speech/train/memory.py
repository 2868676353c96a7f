"""Worker memory: resident-set size for the run's metrics, and giving freed heap back to the OS.

Why trim: speech batches vary in length, so every step allocates and frees large CPU tensors of new
sizes. glibc's malloc raises its mmap threshold after such frees and then serves big blocks from the
heap, which fragments: a CPU worker pretraining wav2vec2-tiny on 60 s micro-batches grew from ~2 GB to
6.5 GB RSS in 700 steps (and kept growing) with nothing live behind it. ``malloc_trim(0)`` every few
steps returns the free pages and keeps RSS flat for ~10% of step time at every 10 steps (docs/LOG.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else False
    return _LIBC


def malloc_trim() -> bool:
    """Return free heap pages to the OS (glibc only; a no-op elsewhere). True when it ran."""
    lib = _libc()
    if not lib:
        return False
    lib.malloc_trim(0)
    return True


def rss_mb() -> float:
    """This process's resident set size in MiB (0.0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0
