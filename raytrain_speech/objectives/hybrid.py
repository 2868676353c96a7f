"""Hybrid CTC/attention loss (ESPnet's joint training): ``w * CTC + (1 - w) * attention CE``.

Both parts are summed over this rank and divided by one global normaliser, the attention decoder's
predicted-token count (characters + one end-of-text per row), so the weight ``w`` means what it
says; CTC's per-character mean is therefore scaled by n / (n + 1) per row (~2% for 50-character
transcripts), which the weight absorbs.
"""

from __future__ import annotations

import functools

import torch

from raytrain_speech.batch import Batch
from raytrain_speech.objectives import Objective, ctc, seq2seq

units = seq2seq.units
EXTRA_STATS = ("ctc_loss", "attention_loss", "accuracy")


def loss(batch: Batch, out: dict[str, torch.Tensor], ctc_weight: float = 0.3,
         ) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(weighted sum of the summed CTC and attention losses, predicted tokens, their parts)."""
    ctc_sum, _, _ = ctc.loss(batch, out)
    att_sum, n, att_stats = seq2seq.loss(batch, out)
    summed = ctc_weight * ctc_sum + (1.0 - ctc_weight) * att_sum
    with torch.no_grad():
        parts = torch.stack([ctc_sum.detach().float(), att_sum.detach().float()]).tolist()  # one device sync
    return summed, n, {"ctc_loss_sum": parts[0], "attention_loss_sum": parts[1],
                       "accuracy_sum": att_stats["accuracy_sum"]}


def objective(model_cfg) -> Objective:
    """The hybrid loss with the model's ``ctc_weight``."""
    return Objective("hybrid", units, functools.partial(loss, ctc_weight=model_cfg.ctc_weight), EXTRA_STATS)
