"""The training workers' read-ahead thread and its stall watchdog (data/prefetch.py), with real threads
and a producer that really blocks."""

from __future__ import annotations

import threading
import time

import pytest

from raytrain_speech.data.prefetch import DataStalled, WaitClock, prefetch, stall_message


def test_items_arrive_in_order_and_a_producer_error_reaches_the_consumer():
    assert list(prefetch(range(50), depth=3, stall_timeout_s=5)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("shard 7 unreadable")

    stream = prefetch(failing(), depth=2, stall_timeout_s=5)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="shard 7"):
        next(stream)


def test_a_producer_that_blocks_ends_the_wait_with_the_callers_line():
    never = threading.Event()
    started = time.monotonic()

    def stuck():
        yield "first"
        never.wait()  # a read that never returns
        yield "never"

    stream = prefetch(stuck(), depth=2, stall_timeout_s=0.5,
                      stalled=lambda waited_s: stall_message(1, "s3://b/corpus", "train", 3, waited_s))
    assert next(stream) == "first"
    with pytest.raises(DataStalled) as info:
        next(stream)
    message = str(info.value)
    assert "\n" not in message and message.startswith("rank 1 waited ")
    assert "s3://b/corpus split train, epoch 3" in message and "data.stall_timeout_s" in message
    assert time.monotonic() - started < 5
    never.set()


def test_no_timeout_waits_for_a_slow_producer_and_the_wait_is_counted():
    def slow():
        for i in range(3):
            time.sleep(0.2)
            yield i

    clock = WaitClock()
    assert list(clock.timed(prefetch(slow(), depth=1, stall_timeout_s=None))) == [0, 1, 2]
    assert clock.waited_s >= 0.5  # three 0.2 s reads, each waited for (minus scheduling slack)


def test_a_consumer_that_stops_early_stops_the_producer():
    produced = []

    def counting():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetch(counting(), depth=2, stall_timeout_s=5)
    assert next(stream) == 0
    stream.close()
    time.sleep(0.5)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count < 10  # stopped, a few items ahead at most
