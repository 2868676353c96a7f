"""Self-supervised span masks over a model's encoder frames (wav2vec 2.0, WavLM, Conformer-MLM, and
wav2vec 2.0's fine-tuning time masks).

Shapes: B = batch, T = encoder frames.

The masks are drawn from (seed, epoch, index) (``seeding.utterance_rng``) before the forward pass,
so the Trainer knows the masked-frame count, which is the loss normaliser, over the whole global
batch before backward, on any worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from raytrain_speech.seeding import utterance_rng

if TYPE_CHECKING:
    from raytrain_speech.batch import Batch
    from raytrain_speech.models.base import SpeechModel


def frame_span_mask(frame_lengths_B: torch.Tensor, indices: list[int], prob: float, span_frames: int,
                    seed: int, epoch: int, min_spans: int = 1) -> torch.Tensor:
    """Self-supervised span masks over a model's encoder frames: bool (B, T), True = masked.

    wav2vec 2.0's scheme: each frame starts a span with probability ``prob`` and spans of
    ``span_frames`` may overlap; WavLM reaches ~80% coverage with the same scheme at a high ``prob``.
    Every utterance gets at least ``min_spans`` spans (a row with nothing masked contributes no
    loss). Drawn from (seed, epoch, index) like every other augmentation, so the loop knows the
    masked-frame count (the loss normaliser) before the forward pass, on any worker.
    """
    lengths = [int(n) for n in frame_lengths_B.tolist()]
    T = max(lengths, default=0)
    mask_BT = np.zeros((len(lengths), T), dtype=bool)
    for b, (index, n) in enumerate(zip(indices, lengths)):
        if n <= 0:
            continue
        rng = utterance_rng(seed ^ 0x5EED, epoch, index)
        span = min(span_frames, n)
        starts = np.flatnonzero(rng.random(n - span + 1) < prob)
        if len(starts) < min_spans:
            starts = rng.choice(n - span + 1, size=min(min_spans, n - span + 1), replace=False)
        for s in starts:
            mask_BT[b, s:s + span] = True
    return torch.from_numpy(mask_BT).to(frame_lengths_B.device)


def model_span_mask(model: SpeechModel, batch: Batch, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """``frame_span_mask`` with a masked family's own settings (``output_lengths`` and its
    ``span_masking``): the one draw the training loop, validation (seed 0, epoch 0) and the models'
    own fallback for a batch without a mask all share."""
    spec = model.span_masking
    if spec is None:
        raise ValueError(f"{type(model).__name__} draws no span masks (its span_masking is None)")
    indices = batch.indices or list(range(batch.feature_lengths_B.shape[0]))
    return frame_span_mask(model.output_lengths(batch.feature_lengths_B), indices, spec.prob,
                           spec.span_frames, seed, epoch, spec.min_spans)

