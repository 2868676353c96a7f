"""wav2vec 2.0's objective: InfoNCE over masked frames + codebook diversity + feature penalty.

Shapes: N = masked frames of this rank, K = negatives per frame, F = compared width.

A unit is one masked (valid) encoder frame. The contrastive term is summed over masked frames; the
two auxiliary terms are per-batch scalars that fairseq multiplies by the masked-frame count
(``sample_size``) before adding, so after the Stepper's division by the global masked-frame count every
term is a per-frame quantity, as in fairseq. Logits are cosine similarities / temperature in float32
(even under autocast); a negative that equals its positive (the same codevectors were picked) is
removed from the softmax, as fairseq does, so it is neither rewarded nor punished.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytrain_speech.batch import Batch
from raytrain_speech.objectives import Objective

EXTRA_STATS = ("accuracy", "contrastive", "diversity", "perplexity", "code_perplexity", "feature_penalty")
"""Reported per masked frame: accuracy (positive ranked first), the InfoNCE term alone, the diversity
loss (G x V - perplexity) / (G x V), the soft and hard codebook perplexities, the feature penalty."""


def units(batch: Batch) -> float:
    """Masked frames of this rank (``frame_span_mask`` marks only frames inside each row's length)."""
    if batch.mask_BT is None:
        raise ValueError("contrastive objective: batch.mask_BT is None; the training loop must draw the span "
                         "mask (data.augment.frame_span_mask over model.output_lengths) before units() and forward")
    return float(batch.mask_BT.sum())


def logits(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 1 + K) float32 logits, positive first; negatives identical to their positive are -inf."""
    context_NF, targets_NF, negatives_NKF = out["context_NF"], out["targets_NF"], out["negatives_NKF"]
    candidates_NJF = torch.cat([targets_NF[:, None], negatives_NKF], dim=1).float()
    logits_NJ = F.cosine_similarity(context_NF.float()[:, None], candidates_NJF, dim=-1)
    logits_NJ = logits_NJ / out["logit_temperature"].float()
    neg_is_pos_NK = (negatives_NKF == targets_NF[:, None]).all(dim=-1)
    return torch.cat([logits_NJ[:, :1], logits_NJ[:, 1:].masked_fill(neg_is_pos_NK, float("-inf"))], dim=1)


def loss(batch: Batch, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(summed loss, masked frames, stats); see the module docstring for the terms and their scaling."""
    logits_NJ = logits(out)
    n = logits_NJ.shape[0]
    contrastive = F.cross_entropy(logits_NJ, torch.zeros(n, dtype=torch.long, device=logits_NJ.device),
                                  reduction="sum")
    num_codevectors = out["num_codevectors"].float()
    diversity = (num_codevectors - out["prob_perplexity"].float()) / num_codevectors
    penalty = out["feature_penalty"].float()
    summed = (contrastive + out["diversity_weight"].float() * diversity * n
              + out["feature_penalty_weight"].float() * penalty * n)
    with torch.no_grad():
        best_N = logits_NJ.argmax(dim=-1) == 0
        all_equal_N = logits_NJ.argmin(dim=-1) == 0  # argmax = argmin = 0: every logit ties, not a success
        values = torch.stack([(best_N & ~all_equal_N).sum().float(), contrastive.detach(),
                              diversity * n, out["prob_perplexity"].float() * n,
                              out["code_perplexity"].float() * n, penalty * n]).tolist()  # one device sync
    names = ("accuracy_sum", "contrastive_sum", "diversity_sum", "perplexity_sum", "code_perplexity_sum",
             "feature_penalty_sum")
    return summed, float(n), dict(zip(names, values))


def objective(model_cfg=None) -> Objective:
    """wav2vec 2.0's contrastive objective (its weights travel in the model's outputs)."""
    return Objective("contrastive", units, loss, EXTRA_STATS)
