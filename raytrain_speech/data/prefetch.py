"""A training worker's row stream read ahead in a background thread, with a stall watchdog.

Both backends hand the Trainer its rows through ``prefetch``: the local backend decodes and
preprocesses in the thread (decoding and the front end release the GIL), the Ray backend pulls Ray
Data's ``iter_batches`` there. The consumer waits at most ``stall_timeout_s`` for each item; past that
the stream raises ``DataStalled`` with the caller's one-line explanation instead of blocking forever
(a pipeline with no CPU to run on, a data node gone without notice, storage that accepts connections
and never answers within its own timeouts). Under Ray Train the error fails the attempt like a worker
crash (retried up to ``run.max_failures``, from the last committed checkpoint); on the local backend
it ends the run with that line.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

_DONE = object()


class DataStalled(RuntimeError):
    """No item arrived within the stall timeout; the message says what was waited for and the fix."""


def prefetch(items: Iterable, depth: int, stall_timeout_s: float | None = None,
             stalled: Callable[[float], str] | None = None) -> Iterator:
    """``items`` produced by a background thread, at most ``depth`` ahead of the consumer.

    An error in the producer is raised in the consumer, and a consumer that stops early stops the
    producer (at its next item). ``stall_timeout_s`` bounds each wait of the consumer (None: no bound);
    ``stalled(waited_s)`` gives the ``DataStalled`` message. A producer stuck inside a read is left
    behind (a daemon thread): the attempt is ending anyway.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as err:  # handed to the consumer, which raises it
            q.put(err)

    thread = threading.Thread(target=produce, daemon=True, name="rts-data-prefetch")
    thread.start()
    try:
        while True:
            started = time.monotonic()
            try:
                item = q.get(timeout=stall_timeout_s)
            except queue.Empty:
                waited_s = time.monotonic() - started
                raise DataStalled(stalled(waited_s) if stalled else
                                  f"no data for {waited_s:.0f} s (data.stall_timeout_s)") from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class WaitClock:
    """Seconds a consumer spent waiting in ``next()`` on a stream: a worker's data wait, the time
    its step had nothing to train on (pipeline fill, epoch boundaries, too few data CPUs)."""

    def __init__(self) -> None:
        self.waited_s = 0.0

    def timed(self, items: Iterable) -> Iterator:
        it = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.waited_s += time.perf_counter() - started
            yield item


def stall_message(rank: int, root: str, split: str, epoch: int, waited_s: float) -> str:
    """The one line a stalled training worker fails with: what it waited for, how long, what to check."""
    return (f"rank {rank} waited {waited_s:.0f} s for its next training batch ({root} split {split}, epoch {epoch}) "
            "and none came: the data pipeline is stalled (Ray Data tasks with no free CPU, a data node lost without "
            "notice, storage that stopped answering); check `ray status` for free CPUs and the storage endpoint, "
            "or raise data.stall_timeout_s (null waits forever)")
