"""Hybrid CTC/attention loss (ESPnet's joint training): ``w * CTC + (1 - w) * attention CE``.

Both parts are summed over this rank and divided by one global normaliser, the attention decoder's
predicted-token count (characters + one end-of-text per row), so the weight ``w`` means what it
says; CTC's per-character mean is therefore scaled by n / (n + 1) per row (~2% for 50-character
transcripts), which the weight absorbs.
"""

from __future__ import annotations

import functools

import torch

from raytrain_speech.data.batching import Batch
from raytrain_speech.objectives import Objective, ctc, seq2seq

units = seq2seq.units
EXTRA_STATS = ("ctc_loss", "attention_loss", "accuracy")


def loss(batch: Batch, out: dict[str, torch.Tensor], global_units: float, world_size: int = 1,
         ctc_weight: float = 0.3) -> tuple[torch.Tensor, dict[str, float]]:
    ctc_scaled, ctc_stats = ctc.loss(batch, out, global_units, world_size)
    att_scaled, att_stats = seq2seq.loss(batch, out, global_units, world_size)
    scaled = ctc_weight * ctc_scaled + (1.0 - ctc_weight) * att_scaled
    return scaled, {
        "loss_sum": ctc_weight * ctc_stats["loss_sum"] + (1.0 - ctc_weight) * att_stats["loss_sum"],
        "tokens": units(batch), "ctc_loss_sum": ctc_stats["loss_sum"], "attention_loss_sum": att_stats["loss_sum"],
        "accuracy_sum": att_stats["accuracy_sum"],
    }


def from_config(model_cfg) -> Objective:
    return Objective("hybrid", units, functools.partial(loss, ctc_weight=model_cfg.ctc_weight), EXTRA_STATS)
