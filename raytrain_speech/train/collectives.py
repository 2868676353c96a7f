"""Collectives over the training ranks (torch.distributed), and no-ops in a single process.

Every function here is a collective when a process group is up: all ranks must call it at the same
point, which the Trainer guarantees by calling them only at steps every rank takes (lockstep).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from raytrain_speech.batch import Batch


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(device: torch.device) -> None:
    """Every rank waits here for every other (a one-element all-reduce on the training device)."""
    all_reduce_sum([0.0], device)


def all_gather(value, world: int) -> list:
    """Every rank's ``value`` (picklable), in rank order."""
    if world == 1 or not distributed():
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def broadcast(value, rank: int):
    """Rank 0's ``value`` on every rank."""
    if not distributed():
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_consumed(consumed: np.ndarray, device: torch.device) -> np.ndarray:
    """OR of every rank's consumed bitmap (an all-reduce MAX over uint8)."""
    t = torch.from_numpy(consumed.astype("uint8")).to(device)
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().numpy().astype(bool)


def lockstep(batches: Iterator[Batch], accum: int, device: torch.device, units: Callable[[Batch], float],
             ) -> Iterator[tuple[list[Batch], list[float]]]:
    """Yield (this rank's 0..accum micro-batches, [ranks_with_data, loss units, audio_s, utterances]
    summed over ranks) until every rank has run dry.

    One all-reduce before each optimizer step tells every rank whether any rank still has data and
    how many units the global batch holds; ranks short of ``accum`` batches step zero-gradient fillers
    (Stepper), so every rank reports at the same steps and nobody hangs in a barrier because bucketed
    shards came out uneven. ``units`` is the objective's normaliser (target tokens, masked frames).
    """
    it = iter(batches)
    while True:
        group = list(itertools.islice(it, accum))
        totals = all_reduce_sum([1.0 if group else 0.0, sum(units(b) for b in group),
                                 sum(b.audio_s for b in group), sum(b.size for b in group)], device)
        if totals[0] == 0:
            return
        yield group, totals
