"""Training objectives: ``units(batch)`` (this rank's loss normaliser, known before the forward pass) and
``loss(batch, out) -> (loss_sum, units, stats)``, the loss summed over this rank's batch, its unit
count and float statistics. The registry pairs each model family with one.

Normalising is the Stepper's, once for every objective (train/step.py): ranks hold batches of
different sizes (batches are cut by audio seconds), so each rank backpropagates
``loss_sum * world_size / global_units``, the global unit count of the whole step; DDP's gradient
averaging then yields the exact per-unit mean over the global batch, not a mean of per-rank means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raytrain_speech.batch import Batch

LossFn = Callable[[Batch, dict], tuple[torch.Tensor, float, dict[str, float]]]


@dataclass(frozen=True)
class Objective:
    """What the train step needs from an objective (plain functions, so the step stays generic)."""

    name: str
    units: Callable[[Batch], float]
    loss: LossFn
    extra_stats: tuple[str, ...] = ()
    """``<name>_sum`` stats the loop reports as ``<name>`` per unit; fixed per objective because every
    rank must all-reduce the same list, including a rank whose window held only filler steps."""
