"""malloc_trim gives freed, fragmented heap back: the CPU-worker memory growth it exists for."""

import numpy as np
import pytest

from raytrain_speech.train import memory


def test_rss_is_reported():
    assert memory.rss_mb() > 10


def test_trim_returns_fragmented_heap():
    if not memory.malloc_trim():
        pytest.skip("not glibc")
    # Freeing an mmapped 4 MB block raises glibc's mmap threshold, so the next blocks come from the heap
    # (what freed activations of a long batch do to a training worker) ...
    big = np.ones(4 << 20, np.uint8)
    del big
    rng = np.random.default_rng(0)
    blocks = [np.ones(int(n), np.uint8) for n in rng.integers(500_000, 1_000_000, size=400)]
    keep = blocks[::40]  # ... and a few survivors pin the heap top, so free() alone cannot shrink it.
    del blocks
    before = memory.rss_mb()
    memory.malloc_trim()
    after = memory.rss_mb()
    assert before - after > 100, (before, after)  # ~270 MB of the ~300 MB freed goes back
    assert sum(b.size for b in keep) > 0
