"""Duration-budget batching and the padding collate.

Shapes: B = utterances, F = frames (or samples for waveform models), M = feature bins, L = tokens.

Speech utterances vary 10x in length, so batches are bounded by padded audio seconds rather than by
a count: a sort window groups similar durations so padding stays small, and batch order within the
window is shuffled so the model does not see a length curriculum.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from raytrain_speech.configlib import require


@dataclass
class BatchingConfig:
    """How a worker groups its stream of utterances into batches."""

    sort_window_utterances: int = 512
    """Utterances gathered and sorted by duration before cutting batches (bigger = less padding)."""
    max_batch_utterances: int | None = None
    """Optional cap on utterances per micro-batch, on top of the audio-seconds budget."""

    def validate(self) -> None:
        require(self.sort_window_utterances >= 1, "batching.sort_window_utterances", "must be >= 1")
        require(self.max_batch_utterances is None or self.max_batch_utterances >= 1,
                "batching.max_batch_utterances", "must be >= 1 or null")


@dataclass
class Utterance:
    """One decoded, featurized utterance as it reaches a training or eval worker."""

    index: int
    id: str
    duration_s: float
    features_FM: np.ndarray
    targets_L: np.ndarray
    text: str = ""
    language: str = ""


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

    @property
    def size(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, features_BFM=self.features_BFM.to(device, non_blocking=True),
                       feature_lengths_B=self.feature_lengths_B.to(device), targets_BL=self.targets_BL.to(device),
                       target_lengths_B=self.target_lengths_B.to(device),
                       mask_BT=None if self.mask_BT is None else self.mask_BT.to(device))

    @property
    def padding_fraction(self) -> float:
        total = self.features_BFM.shape[0] * self.features_BFM.shape[1]
        return 1.0 - float(self.feature_lengths_B.sum()) / max(total, 1)


def collate(utts: list[Utterance]) -> Batch:
    """Pad features and targets to the longest row."""
    n = len(utts)
    max_f = max(u.features_FM.shape[0] for u in utts)
    tail = utts[0].features_FM.shape[1:]
    feats = np.zeros((n, max_f, *tail), dtype=np.float32)
    max_l = max(1, max(len(u.targets_L) for u in utts))
    targets = np.zeros((n, max_l), dtype=np.int64)
    for i, u in enumerate(utts):
        feats[i, : u.features_FM.shape[0]] = u.features_FM
        targets[i, : len(u.targets_L)] = u.targets_L
    return Batch(
        features_BFM=torch.from_numpy(feats),
        feature_lengths_B=torch.tensor([u.features_FM.shape[0] for u in utts], dtype=torch.int64),
        targets_BL=torch.from_numpy(targets),
        target_lengths_B=torch.tensor([len(u.targets_L) for u in utts], dtype=torch.int64),
        indices=[u.index for u in utts], ids=[u.id for u in utts], texts=[u.text for u in utts],
        audio_s=float(sum(u.duration_s for u in utts)), languages=[u.language for u in utts],
    )


def _cut(sorted_utts: list[Utterance], max_padded_s: float, max_utts: int | None) -> list[list[Utterance]]:
    """Greedy cut of a duration-sorted list so that (rows x longest row) stays within budget."""
    batches, current = [], []
    for u in sorted_utts:
        longest = max(u.duration_s, current[-1].duration_s if current else 0.0)
        full = current and ((len(current) + 1) * longest > max_padded_s
                            or (max_utts is not None and len(current) >= max_utts))
        if full:
            batches.append(current)
            current = []
        current.append(u)
    if current:
        batches.append(current)
    return batches


def batch_by_duration(
    utts: Iterable[Utterance], max_padded_s: float, cfg: BatchingConfig, seed: int = 0,
) -> Iterator[list[Utterance]]:
    """Yield lists of utterances whose padded duration is at most ``max_padded_s``.

    Utterances are sorted within a window of ``cfg.sort_window_utterances`` (the window grows until
    it holds more than one batch). A single utterance longer than the budget becomes a batch of its
    own (never dropped).
    """
    rng = random.Random(seed)
    window: list[Utterance] = []

    def drain(final: bool) -> Iterator[list[Utterance]]:
        window.sort(key=lambda u: u.duration_s)
        batches = _cut(window, max_padded_s, cfg.max_batch_utterances)
        keep = [] if final else batches.pop()  # the (possibly partial) last batch waits for more
        window[:] = keep
        rng.shuffle(batches)
        yield from batches

    for u in utts:
        window.append(u)
        if len(window) >= cfg.sort_window_utterances:
            yield from drain(final=False)
    if window:
        yield from drain(final=True)
