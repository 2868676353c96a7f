"""Teacher-forced token cross-entropy for encoder-decoder models, normalised by the global token count.

Shapes: B = batch, L = target tokens (char tokenizer, padded), P = prompt (prefix) tokens,
V = decoder vocabulary.

Each row is trained to emit its transcript and then end-of-text, so a row of n characters carries
n + 1 predicted tokens; the prompt (start-of-transcript, language, task) is given, never predicted.
The Stepper divides the sum by the global predicted-token count (objectives/__init__.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytrain_speech.batch import IGNORE_ID, Batch
from raytrain_speech.objectives import Objective


def units(batch: Batch) -> float:
    """Predicted tokens on this rank: every target character plus one end-of-text per row."""
    return float(batch.target_lengths_B.sum()) + batch.target_lengths_B.shape[0]


def loss(batch: Batch, out: dict[str, torch.Tensor], label_smoothing: float = 0.0,
         ) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(summed cross-entropy, predicted tokens, {accuracy_sum}); reads ``out["logits_BLV"]`` and
    ``out["decoder_targets_BL"]``.

    The model builds ``decoder_targets_BL`` with ``models.layers.teacher_forcing`` (it owns the special
    token ids), so this function needs no knowledge of the prompt layout.
    """
    logits_BLV = out["logits_BLV"].float()  # bf16 log-softmax over a large vocabulary loses precision
    targets_BL = out["decoder_targets_BL"]
    summed = F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten(), ignore_index=IGNORE_ID,
                             reduction="sum", label_smoothing=label_smoothing)
    valid_BL = targets_BL != IGNORE_ID
    correct = float(((logits_BLV.detach().argmax(-1) == targets_BL) & valid_BL).sum())
    return summed, units(batch), {"accuracy_sum": correct}
EXTRA_STATS = ("accuracy",)
"""Reported as next-token accuracy (correct / predicted tokens)."""


def objective(model_cfg=None) -> Objective:
    """Teacher-forced cross-entropy (no label smoothing in the recipes)."""
    return Objective("seq2seq", units, loss, EXTRA_STATS)
