"""Feature-side augmentation on the training device: SpecAugment masks and wav2vec 2.0-style span masks.

Shapes: B = utterances, F = frames, M = mel bins.

Masks are drawn per utterance from a generator seeded by (seed, epoch, utterance index), never from
worker state, so an utterance gets the same masks on any worker, after any restart or resize, and a
sweep over masking parameters compares like with like. Masked cells are set to 0, the mean of the
per-utterance-normalised features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raytrain_speech.configlib import require


@dataclass
class AugmentConfig:
    """Masking applied to each training batch (off by default; validation and eval never mask)."""

    freq_masks: int = 0
    """SpecAugment frequency masks per utterance (recipes: 2)."""
    freq_mask_max_bins: int = 27
    """Widest frequency mask, in mel bins (SpecAugment's F; Whisper: 27)."""
    time_masks: int = 0
    """SpecAugment time masks per utterance (recipes: 2)."""
    time_mask_max_frames: int = 100
    """Widest time mask, in frames (SpecAugment's T; Whisper: 100), capped at 20% of the utterance."""
    span_mask_prob: float = 0.0
    """Probability that a masked span starts at each frame (wav2vec 2.0's p; its recipe: 0.065)."""
    span_mask_frames: int = 10
    """Length of each masked span in frames (10 frames = 100 ms of log-mel)."""

    def validate(self) -> None:
        for key in ("freq_masks", "time_masks"):
            require(getattr(self, key) >= 0, f"augment.{key}", "must be >= 0")
        require(self.freq_mask_max_bins >= 1, "augment.freq_mask_max_bins", "must be >= 1")
        require(self.time_mask_max_frames >= 1, "augment.time_mask_max_frames", "must be >= 1")
        require(0.0 <= self.span_mask_prob < 1.0, "augment.span_mask_prob", "must be in [0, 1)")
        require(self.span_mask_frames >= 1, "augment.span_mask_frames", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.freq_masks > 0 or self.time_masks > 0 or self.span_mask_prob > 0


def utterance_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one utterance in one epoch: a pure function of the three numbers."""
    # Masked to unsigned: SeedSequence rejects negatives, and filler rows (index -1) draw masks too.
    u64 = 0xFFFFFFFFFFFFFFFF
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & u64, index & u64]))


def utterance_mask(cfg: AugmentConfig, num_frames: int, num_bins: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(time mask [num_frames], frequency mask [num_bins]) booleans for one utterance."""
    time_F = np.zeros(num_frames, dtype=bool)
    freq_M = np.zeros(num_bins, dtype=bool)
    for _ in range(cfg.freq_masks):
        width = int(rng.integers(0, min(cfg.freq_mask_max_bins, num_bins) + 1))
        start = int(rng.integers(0, num_bins - width + 1))
        freq_M[start:start + width] = True
    max_time = min(cfg.time_mask_max_frames, int(0.2 * num_frames))
    for _ in range(cfg.time_masks):
        width = int(rng.integers(0, max_time + 1))
        start = int(rng.integers(0, num_frames - width + 1))
        time_F[start:start + width] = True
    if cfg.span_mask_prob > 0 and num_frames > 0:
        starts = np.flatnonzero(rng.random(num_frames) < cfg.span_mask_prob)
        for s in starts:
            time_F[s:s + cfg.span_mask_frames] = True
    return time_F, freq_M


def mask_batch(features_BFM: torch.Tensor, lengths_B: torch.Tensor, indices: list[int],
               cfg: AugmentConfig, seed: int, epoch: int) -> tuple[torch.Tensor, float]:
    """A masked copy of a padded batch (on its device) and the fraction of real frames time-masked."""
    if not cfg.enabled or not indices:
        return features_BFM, 0.0
    B, F, M = features_BFM.shape
    keep_BFM = np.ones((B, F, M), dtype=bool)
    masked_frames = 0
    lengths = lengths_B.tolist()
    for b, (index, n) in enumerate(zip(indices, lengths)):
        time_F, freq_M = utterance_mask(cfg, int(n), M, utterance_rng(seed, epoch, index))
        keep_BFM[b, :n][time_F] = False
        keep_BFM[b, :n, freq_M] = False
        masked_frames += int(time_F.sum())
    keep = torch.from_numpy(keep_BFM).to(features_BFM.device, non_blocking=True)
    return features_BFM * keep, masked_frames / max(1, sum(lengths))


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


def model_span_mask(model, batch, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """``frame_span_mask`` with a masked family's own settings (``output_lengths``, ``mask_prob``,
    ``mask_span_frames``, ``min_masks``): the one draw the training loop, validation (seed 0, epoch 0)
    and the models' own fallback for a batch without a mask all share."""
    indices = batch.indices or list(range(batch.feature_lengths_B.shape[0]))
    return frame_span_mask(model.output_lengths(batch.feature_lengths_B), indices, model.mask_prob,
                           model.mask_span_frames, seed, epoch, model.min_masks)
