"""Duration-budget batching and the padding collate.

Shapes: B = utterances, F = frames (or samples for waveform models), M = feature bins, L = tokens.

Speech utterances vary 10x in length, so batches are bounded by padded audio seconds rather than by
a count. Two ways keep padding small: a sort window groups similar durations (batch order within the
window is shuffled so the model does not see a length curriculum), or duration buckets cut at quantiles
of the split's durations each fill their own open batch, which streams with one open batch per bucket
and keeps every batch's rows within one narrow duration range.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raytrain_speech.batch import Batch
from raytrain_speech.config import BatchingConfig, FeatureConfig


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


def duration_quantile_boundaries(durations_s: Sequence[float] | np.ndarray, n_buckets: int) -> list[float]:
    """Interior bucket edges (seconds) at the 1/n .. (n-1)/n quantiles of ``durations_s``.

    Quantile edges give every bucket about the same number of utterances, so all buckets fill (and
    empty) at about the same rate whatever the duration distribution. Equal quantiles (many utterances
    of one duration) collapse into one edge and an edge at or below the shortest duration is dropped,
    so fewer than n_buckets-1 edges may come back; with fewer utterances than buckets some buckets may
    stay empty, which costs nothing.
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    d = np.asarray(durations_s, dtype=np.float64)
    d = d[np.isfinite(d)]
    if n_buckets == 1 or d.size == 0:
        return []
    edges = np.quantile(d, np.arange(1, n_buckets) / n_buckets)
    return sorted({float(e) for e in edges if e > d.min()})


def batch_by_buckets(
    utts: Iterable[Utterance], boundaries_s: Sequence[float], max_padded_s: float, cfg: BatchingConfig,
    seed: int = 0,
) -> Iterator[list[Utterance]]:
    """Yield lists of utterances whose padded duration is at most ``max_padded_s``, one bucket each.

    Each utterance joins the open batch of the bucket its duration falls in (``bisect_right`` over
    ``boundaries_s``, so an edge belongs to the bucket above it). A bucket's batch is emitted as soon as
    the next utterance would push (rows x longest) past the budget or past ``cfg.max_batch_utterances``,
    so memory is at most one open batch per bucket and batches come out in stream order (no length
    curriculum). At the end the partial batches are pooled, re-cut by duration and flushed in an order
    shuffled by ``seed``. A single
    utterance longer than the budget becomes a batch of its own (never dropped).
    """
    edges = sorted(boundaries_s)
    open_batches: list[list[Utterance]] = [[] for _ in range(len(edges) + 1)]
    longest_s = [0.0] * len(open_batches)
    cap = cfg.max_batch_utterances
    for u in utts:
        k = bisect.bisect_right(edges, u.duration_s)
        batch = open_batches[k]
        if batch and ((len(batch) + 1) * max(longest_s[k], u.duration_s) > max_padded_s
                      or (cap is not None and len(batch) >= cap)):
            yield batch
            batch = open_batches[k] = []
            longest_s[k] = 0.0
        batch.append(u)
        longest_s[k] = max(longest_s[k], u.duration_s)
    # The leftovers of all buckets are cut together (sorted): one partial batch per bucket would add
    # up to a bucket-count of small steps at every epoch end.
    rest = _cut(sorted((u for b in open_batches for u in b), key=lambda u: u.duration_s), max_padded_s, cap)
    random.Random(seed).shuffle(rest)
    yield from rest


def filler_batch(features: FeatureConfig) -> Batch:
    """A one-row batch for the zero-gradient filler micro-steps of a rank that has not seen data yet in
    this attempt (1 s of silence features or samples, 4 target tokens)."""
    shape = (100, features.n_mels) if features.kind != "waveform" else (features.sample_rate_hz,)
    return collate([Utterance(-1, "filler", 1.0, np.zeros(shape, np.float32), np.ones(4, np.int64))])
