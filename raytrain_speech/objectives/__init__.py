"""Training objectives: ``units(batch)`` (this rank's loss normaliser) and ``loss(batch, out, global_units,
world_size)``; the registry pairs each model family with one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raytrain_speech.data.batching import Batch


@dataclass(frozen=True)
class Objective:
    """What the train step needs from an objective (plain functions, so the step stays generic)."""

    name: str
    units: Callable[[Batch], float]
    loss: Callable[[Batch, dict, float, int], tuple[torch.Tensor, dict]]
    extra_stats: tuple[str, ...] = ()
    """``<name>_sum`` stats the loop reports as ``<name>`` per unit; fixed per objective because every
    rank must all-reduce the same list, including a rank whose window held only filler steps."""
