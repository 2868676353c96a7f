"""Teacher-forced token cross-entropy for encoder-decoder models, normalised by the global token count.

Shapes: B = batch, L = target tokens (char tokenizer, padded), P = prompt (prefix) tokens,
V = decoder vocabulary.

Each row is trained to emit its transcript and then end-of-text, so a row of n characters carries
n + 1 predicted tokens; the prompt (start-of-transcript, language, task) is given, never predicted.
As in CTC, each rank divides its summed loss by the global count so that DDP's gradient averaging
yields the exact per-token mean over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytrain_speech.data.batching import Batch

IGNORE_ID = -100
"""Decoder-output positions that carry no loss (prompt predictions and padding): F.cross_entropy's default."""


def teacher_forcing(targets_BL: torch.Tensor, target_lengths_B: torch.Tensor, prefix_BP: torch.Tensor,
                    eot_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder input, decoder output), both (B, P + L): the one place the shift is defined.

    input  = prefix, targets[:n], pad ...
    output = IGNORE x (P - 1), targets[:n], eot, IGNORE ...
    so output[i] is the token that must follow input[:i + 1].
    """
    b, length = targets_BL.shape
    p = prefix_BP.shape[1]
    if p < 1:
        raise ValueError("teacher_forcing needs a prefix of at least one token (start-of-transcript)")
    pos_BL = torch.arange(length, device=targets_BL.device)[None, :].expand(b, length)
    lengths_B1 = target_lengths_B.to(targets_BL.device)[:, None]
    real_BL = pos_BL < lengths_B1
    body_in_BL = torch.where(real_BL, targets_BL, torch.full_like(targets_BL, pad_id))
    decoder_in_BL = torch.cat([prefix_BP.to(targets_BL), body_in_BL], dim=1)
    # Output columns P-1 .. P+L-1: targets, then eot at column (P - 1 + n), then ignore.
    body_out_BL = torch.where(real_BL, targets_BL, torch.full_like(targets_BL, IGNORE_ID))
    body_out_BL = torch.cat([body_out_BL, torch.full_like(targets_BL[:, :1], IGNORE_ID)], dim=1)  # B, L + 1
    body_out_BL.scatter_(1, lengths_B1, eot_id)
    head_BL = torch.full((b, p - 1), IGNORE_ID, dtype=targets_BL.dtype, device=targets_BL.device)
    decoder_out_BL = torch.cat([head_BL, body_out_BL], dim=1)
    return decoder_in_BL, decoder_out_BL


def units(batch: Batch) -> float:
    """Predicted tokens on this rank: every target character plus one end-of-text per row."""
    return float(batch.target_lengths_B.sum()) + batch.target_lengths_B.shape[0]


def loss(batch: Batch, out: dict[str, torch.Tensor], global_units: float, world_size: int = 1,
         label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to backpropagate, stats); reads ``out["logits_BLV"]`` and ``out["decoder_targets_BL"]``.

    The model builds ``decoder_targets_BL`` with :func:`teacher_forcing` (it owns the special token
    ids), so this function needs no knowledge of the prompt layout.
    """
    logits_BLV = out["logits_BLV"].float()  # bf16 log-softmax over a large vocabulary loses precision
    targets_BL = out["decoder_targets_BL"]
    summed = F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten(), ignore_index=IGNORE_ID,
                             reduction="sum", label_smoothing=label_smoothing)
    valid_BL = targets_BL != IGNORE_ID
    correct = float(((logits_BLV.detach().argmax(-1) == targets_BL) & valid_BL).sum())
    scaled = summed * (world_size / max(global_units, 1.0))
    return scaled, {"loss_sum": float(summed.detach()), "tokens": units(batch), "accuracy_sum": correct}
EXTRA_STATS = ("accuracy",)
"""Reported as next-token accuracy (correct / predicted tokens)."""
