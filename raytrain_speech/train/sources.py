"""Per-source figures of a mixture of corpora (``data.sources``): what each source gave the run.

Each rank tallies the audio and utterances of the occurrences it trained on (data/mixture.py maps an
occurrence number to its source and utterance); at every report the ranks' tallies are summed into
the TrainState (so they survive restarts with the checkpoint) and reported as
``source.<name>.<figure>`` metrics, which the run card gathers (train/metrics.py ``sources_of``).
"""

from __future__ import annotations

import numpy as np
import torch

from raytrain_speech.data.mixture import Mixture
from raytrain_speech.train import collectives
from raytrain_speech.train.checkpoint import TrainState


class SourceTally:
    """One rank's per-source counts since the last report."""

    def __init__(self, mixture: Mixture):
        self.mixture = mixture
        self.pending = np.zeros((len(mixture.sources), 2))  # (audio s, utterances) per source

    def count(self, epoch: int, numbers: list[int]) -> None:
        plan = self.mixture.epoch(epoch)
        numbers = np.asarray(numbers, np.int64)
        which = plan.source_of(numbers)
        for s, src in enumerate(self.mixture.sources):
            mine = numbers[which == s]
            if mine.size:
                self.pending[s] += (float(src.durations_s[plan.index[mine]].sum()), mine.size)

    def report(self, state: TrainState, bad_by_source: dict[str, int], device: torch.device) -> dict:
        """Collective: the ranks' counts into ``state``; per source, audio hours and utterances trained
        on, passes over it (hours seen / its hours), its share of the run's audio, its bad input."""
        sums = collectives.all_reduce_sum(list(self.pending.ravel()), device)
        self.pending[:] = 0
        for s, src in enumerate(self.mixture.sources):
            state.source_audio_s[src.name] = state.source_audio_s.get(src.name, 0.0) + float(sums[2 * s])
            state.source_utterances[src.name] = state.source_utterances.get(src.name, 0) + int(sums[2 * s + 1])
        total_s = sum(state.source_audio_s.values()) or 1.0
        out = {}
        for src in self.mixture.sources:
            audio_s = state.source_audio_s[src.name]
            out.update({f"source.{src.name}.audio_hours_seen": audio_s / 3600,
                        f"source.{src.name}.utterances_seen": state.source_utterances[src.name],
                        f"source.{src.name}.passes": audio_s / 3600 / src.hours,
                        f"source.{src.name}.share": audio_s / total_s,
                        f"source.{src.name}.bad_utterances": bad_by_source.get(src.name, 0)})
        return out
