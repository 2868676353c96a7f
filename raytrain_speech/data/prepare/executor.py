"""A map over prepare's task functions: in this process, or as Ray tasks.

This is the only module of the prepare package that imports Ray, and only when ``workers`` is not 0
(lazily): the survey, plan and writers are plain functions, and ``workers=0`` runs them all in this
process. Task functions and their jobs must be importable and picklable (module-level functions of
layouts.py, probe.py and write.py, and tuples of plain data). Jobs may come from a generator: both
maps take the next job only when it is due, so it can depend on the results already handed back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from raytrain_speech.config import ConfigError
from raytrain_speech.storage import StorageError


def serial_map(fn: Callable, jobs: Iterable) -> Iterator[tuple[int, object]]:
    """(job number, result) of each job in turn, in this process (``workers=0``); each job is taken
    from ``jobs`` only after the previous result was consumed."""
    for i, job in enumerate(jobs):
        yield i, fn(job)


def _ray_map(ray, in_flight: int, fn: Callable, jobs: Iterable) -> Iterator[tuple[int, object]]:
    """(job number, result) in completion order, at most ``in_flight`` tasks at a time so that a
    corpus of thousands of shards never holds more than a few shards' audio in memory. Jobs are taken
    from ``jobs`` one at a time as slots free up, after the results before were consumed, so a job may
    depend on them (write.py numbers a shard from the shards finished before it)."""
    remote = ray.remote(num_cpus=1)(fn)
    pending: dict = {}
    queue = enumerate(jobs)
    exhausted = False
    while not exhausted or pending:
        while not exhausted and len(pending) < in_flight:
            try:
                i, job = next(queue)
            except StopIteration:
                exhausted = True
                break
            pending[remote.remote(job)] = i
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, (StorageError, ConfigError)):
                raise cause from None  # one line for the CLI, not a remote traceback
            raise
        yield i, result


@contextmanager
def executor(workers: int | None):
    """A map over jobs: in this process (workers=0), or as Ray tasks on the cluster already joined,
    on $RAY_ADDRESS, or on a local Ray started here (and shut down after)."""
    if workers == 0:
        yield serial_map
        return
    import ray

    from raytrain_speech import ray_session

    started = ray_session.connect(num_cpus=workers or os.cpu_count() or 1, object_store_mb=256, dashboard=False)
    try:
        in_flight = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield lambda fn, jobs: _ray_map(ray, in_flight, fn, jobs)
    finally:
        if started:
            ray.shutdown()
