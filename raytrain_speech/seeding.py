"""Seeds that make randomness a function of the data, never of the worker that happens to draw it.

Augmentation and masks are drawn per utterance from (seed, epoch, index); batch shuffling per
(seed, epoch, rank). So an utterance gets the same augmentation on any worker, in any process,
after any restart or resize, and a sweep over augmentation settings compares like with like.
Imports nothing of ours (data, models and the Trainer all draw from here).
"""

from __future__ import annotations

import hashlib

import numpy as np


def utterance_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one utterance in one epoch: a pure function of the three numbers."""
    # Masked to unsigned: SeedSequence rejects negatives, and filler rows (index -1) draw masks too.
    u64 = 0xFFFFFFFFFFFFFFFF
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & u64, index & u64]))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's batch shuffling in one epoch."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")

