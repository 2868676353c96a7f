"""Self-supervised span masks over a model's encoder frames (wav2vec 2.0, WavLM, Conformer-MLM, and
wav2vec 2.0's fine-tuning time masks), and channel masks over a waveform encoder's input features
(fairseq's mask_channel_*, SpecAugment's frequency masks for models that read waveforms).

Shapes: B = batch, T = encoder frames, C = channels of the encoder's input features.

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



def channel_mask(num_channels: int, indices: list[int], prob: float, span_channels: int, seed: int, epoch: int,
                 min_spans: int = 0) -> torch.Tensor:
    """Channel (frequency) masks: bool (B, C), True = that channel is zeroed in every frame of the row.

    fairseq's ``mask_channel_*`` with its static lengths: ``int(prob x C / span + u)`` blocks of
    ``span_channels`` adjacent channels (u ~ U[0, 1)), at least ``min_spans``, starts uniform over
    the positions where a block fits, overlaps allowed (so ``prob`` is the share masked before
    overlaps, as in fairseq). ``prob=0, min_spans=2`` gives SpecAugment's two frequency masks of a
    fixed width. Drawn from (seed, epoch, index) with a stream of its own, independent of the span masks.
    """
    mask_BC = np.zeros((len(indices), num_channels), dtype=bool)
    span = min(span_channels, num_channels)
    for b, index in enumerate(indices):
        rng = utterance_rng(seed ^ 0xC4A7, epoch, index)
        count = max(min_spans, int(prob * num_channels / span + rng.random()))
        for s in rng.integers(0, num_channels - span + 1, size=count):
            mask_BC[b, s:s + span] = True
    return torch.from_numpy(mask_BC)


def model_channel_mask(model: SpeechModel, batch: Batch, seed: int, epoch: int) -> torch.Tensor:
    """``channel_mask`` with the family's own settings (its ``channel_masking``), on the batch's device."""
    spec = model.channel_masking
    if spec is None:
        raise ValueError(f"{type(model).__name__} draws no channel masks (its channel_masking is None)")
    indices = batch.indices or list(range(batch.feature_lengths_B.shape[0]))
    return channel_mask(spec.num_channels, indices, spec.prob, spec.span_channels, seed, epoch,
                        spec.min_spans).to(batch.feature_lengths_B.device)
