"""CTC loss normalised by the global token count.

Ranks hold batches of different sizes (batches are cut by audio seconds), so each rank divides its
summed loss by the token count of the whole global batch; DDP's gradient averaging then yields the
true per-token mean over the global batch instead of a mean of per-rank means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytrain_speech.data.batching import Batch
from raytrain_speech.data.text import BLANK_ID


def units(batch: Batch) -> float:
    """Target tokens: the per-token mean over the global batch is what CTC recipes report."""
    return float(batch.target_lengths_B.sum())


def loss(batch: Batch, out: dict[str, torch.Tensor], global_tokens: float, world_size: int = 1,
         ) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to backpropagate, stats with the summed loss and token count of this rank)."""
    log_probs_TBV = out["log_probs_BTV"].float().transpose(0, 1)  # CTC has no bf16/fp16 kernels
    summed = F.ctc_loss(log_probs_TBV, batch.targets_BL, out["lengths_B"], batch.target_lengths_B,
                        blank=BLANK_ID, reduction="sum", zero_infinity=True)
    tokens = float(batch.target_lengths_B.sum())
    scaled = summed * (world_size / max(global_tokens, 1.0))
    return scaled, {"loss_sum": float(summed.detach()), "tokens": tokens}
