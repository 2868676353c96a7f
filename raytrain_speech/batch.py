"""The model-input contract: what a training, validation or evaluation batch holds, and its shape legend.

Shapes: B = utterances, F = frames (or samples for waveform models), M = feature bins (1 for
waveforms: ``features_BFM`` is then (B, S)), L = target tokens, T = the model's encoder frames.

Token ids: ``BLANK_ID`` (0) is the CTC blank and never a target; the rest of the id space is the
tokenizer's (``data/text.py``). Models read only this dataclass (never the data pipeline that made
it), which is what lets models, objectives and the Trainer run and be tested without the data path.
Imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

BLANK_ID = 0
"""The CTC blank: id 0 of every vocabulary, never a target."""
IGNORE_ID = -100
"""Decoder-output positions that carry no loss (prompt predictions and padding), in a model's
``decoder_targets_BL``: F.cross_entropy's default ignore index."""


@dataclass
class Batch:
    """A padded batch; lengths say where each row's real content ends."""

    features_BFM: torch.Tensor
    feature_lengths_B: torch.Tensor
    targets_BL: torch.Tensor
    target_lengths_B: torch.Tensor
    indices: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    audio_s: float = 0.0
    languages: list[str] = field(default_factory=list)
    """Language code per row ('' where the corpus has none)."""
    mask_BT: torch.Tensor | None = None
    """Masked-prediction families only: bool over the model's encoder frames, True = masked. Drawn
    by the training loop per utterance from (seed, epoch, index) before the forward pass, so the
    loss normaliser (masked frames over the global batch) is known before backward."""
    channel_mask_BC: torch.Tensor | None = None
    """Families with channel (frequency) masking, in training only: bool over the channels of the
    encoder's input features, True = zeroed in every frame of that row (fairseq's mask_channel_*,
    SpecAugment's frequency masks); drawn like ``mask_BT``."""

    @property
    def size(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, features_BFM=self.features_BFM.to(device, non_blocking=True),
                       feature_lengths_B=self.feature_lengths_B.to(device), targets_BL=self.targets_BL.to(device),
                       target_lengths_B=self.target_lengths_B.to(device),
                       mask_BT=None if self.mask_BT is None else self.mask_BT.to(device),
                       channel_mask_BC=None if self.channel_mask_BC is None else self.channel_mask_BC.to(device))

    @property
    def padding_fraction(self) -> float:
        total = self.features_BFM.shape[0] * self.features_BFM.shape[1]
        return 1.0 - float(self.feature_lengths_B.sum()) / max(total, 1)

