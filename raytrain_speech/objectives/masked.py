"""Masked log-mel reconstruction loss (WavLM family), normalised by the global masked-frame count.

Shapes: B = batch, T = encoder frames, P = predicted values per encoder frame (4 stacked log-mel
frames x mel bins).

A unit is one masked encoder frame: each frame's L1 error is averaged over its P values and the
frames are summed, so the reported loss is the mean absolute error per log-mel value over masked
frames, and long and short utterances weigh by their masked frames. Why L1 and not MSE: see
models/wavlm.py. The masks are drawn by the loop before the forward pass, so every rank knows the
global masked-frame count before backward (the Stepper's normaliser: objectives/__init__.py).
"""

from __future__ import annotations

import torch

from raytrain_speech.batch import Batch
from raytrain_speech.objectives import Objective


def units(batch: Batch) -> float:
    """Masked frames of this rank (``frame_span_mask`` marks only frames inside each row's length)."""
    if batch.mask_BT is None:
        raise ValueError("masked objective: batch.mask_BT is None; the training loop must draw the span "
                         "mask (data.augment.frame_span_mask over model.output_lengths) before units() and forward")
    return float(batch.mask_BT.sum())


def loss(batch: Batch, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(per-frame L1 summed over the masked, valid frames of ``out["mask_BT"]``, those frames, {})."""
    mask_BT = out["mask_BT"]
    error_BT = (out["pred_BTP"].float() - out["target_BTP"].float()).abs().mean(dim=-1)
    summed = torch.where(mask_BT, error_BT, 0.0).sum()  # not indexing: no mask still leaves a graph
    return summed, float(mask_BT.sum()), {}


def objective(model_cfg=None) -> Objective:
    """The masked-reconstruction objective (no settings of its own)."""
    return Objective("masked", units, loss)
