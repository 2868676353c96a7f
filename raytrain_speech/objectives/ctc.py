"""CTC loss summed over target tokens (the Stepper divides by the global token count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytrain_speech.batch import BLANK_ID, Batch
from raytrain_speech.objectives import Objective


def units(batch: Batch) -> float:
    """Target tokens: the per-token mean over the global batch is what CTC recipes report."""
    return float(batch.target_lengths_B.sum())


def loss(batch: Batch, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(CTC loss summed over this batch, its target tokens, {})."""
    log_probs_TBV = out["log_probs_BTV"].float().transpose(0, 1)  # CTC has no bf16/fp16 kernels
    summed = F.ctc_loss(log_probs_TBV, batch.targets_BL, out["lengths_B"], batch.target_lengths_B,
                        blank=BLANK_ID, reduction="sum", zero_infinity=True)
    return summed, units(batch), {}


def objective(model_cfg=None) -> Objective:
    """The CTC objective (no settings of its own)."""
    return Objective("ctc", units, loss)
