"""Mask-CTC's joint loss: ``w * CTC + (1 - w) * cross-entropy of the refinement decoder's masked tokens``.

Both parts are sums over target tokens: CTC's by definition, the decoder's because each masked token
weighs L / n in its row (``models/mask_ctc.mask_tokens``), so a row contributes L x its mean over the
n tokens that were masked. The normaliser is then the global target-token count, known before the
forward pass like every objective's, although n is drawn inside the model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from raytrain_speech.batch import Batch
from raytrain_speech.objectives import Objective, ctc

EXTRA_STATS = ("ctc_loss", "mlm_loss", "mlm_accuracy")


def masked_lm_loss(batch: Batch, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted cross-entropy summed over masked tokens, weighted count of correct predictions)."""
    if "mlm_logits_BLV" not in out:  # a batch without transcripts (a filler step) has nothing to predict
        zero = out["log_probs_BTV"].sum() * 0.0
        return zero, zero.detach()
    logits_BLV, weights_BL = out["mlm_logits_BLV"], out["mlm_weights_BL"]
    targets_BL = batch.targets_BL.clamp(min=0)
    ce_BL = F.cross_entropy(logits_BLV.transpose(1, 2), targets_BL, reduction="none")
    with torch.no_grad():
        correct = ((logits_BLV.argmax(dim=-1) == targets_BL).float() * weights_BL).sum()
    return (ce_BL * weights_BL).sum(), correct


def loss(batch: Batch, out: dict[str, torch.Tensor], ctc_weight: float = 0.3,
         ) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(weighted sum of the summed CTC and masked-token losses, target tokens, their parts)."""
    ctc_sum, n, _ = ctc.loss(batch, out)
    mlm_sum, correct = masked_lm_loss(batch, out)
    summed = ctc_weight * ctc_sum + (1.0 - ctc_weight) * mlm_sum
    with torch.no_grad():
        parts = torch.stack([ctc_sum.detach().float(), mlm_sum.detach().float(), correct.float()]).tolist()
    return summed, n, {"ctc_loss_sum": parts[0], "mlm_loss_sum": parts[1], "mlm_accuracy_sum": parts[2]}


def objective(model_cfg) -> Objective:
    """The joint loss with the model's ``ctc_weight``; plain CTC when the model has no decoder."""
    if not model_cfg.decoder_layers:
        return ctc.objective()
    return Objective("mask_ctc", ctc.units, functools.partial(loss, ctc_weight=model_cfg.ctc_weight), EXTRA_STATS)
