"""Waveform augmentation inside the real Ray Data chain: speed perturbation and noise from a noise-shard
set, drawn per (seed, epoch, index) with the epoch carried by the run's EpochClock actor."""

from __future__ import annotations

import numpy as np
import pytest

from raytrain_speech.data import shards
from raytrain_speech.data.noise import NoiseSetConfig, write_noise_set
from raytrain_speech.data.pipeline import build_dataset, epoch_clock, epoch_clock_name
from raytrain_speech.data.synth import synthesize
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def corpus_and_noise(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aug")
    cfg = tiny_config(**{"data.root": str(tmp / "corpus"), "synth.train_hours": 0.03})
    synthesize(cfg.synth, cfg.data.root, log=lambda s: None)
    write_noise_set(NoiseSetConfig(clips=6, clip_duration_s=2.0, kinds=("white", "pink", "hum")), str(tmp / "noise"),
                    log=lambda s: None)
    return tmp


def _columns(root: str, *names: str) -> list[list]:
    """Columns of the train split's shards as written (durations before any augmentation)."""
    tables = [shards.read_shard(uri) for uri in shards.shard_uris(root, "train")]
    return [[v for t in tables for v in t.column(n).to_pylist()] for n in names]


def _epoch_rows(ds) -> dict[int, tuple[float, float] | str]:
    """index -> (duration after speed perturbation, feature checksum), or the reason a row was filtered
    (a fast utterance sped up by 1.1 can have more characters than CTC frames)."""
    out = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i, d, f, e in zip(batch["index"], batch["duration_s"], batch["features"], batch["error"]):
            assert not e or str(e).startswith("filtered:"), e
            out[int(i)] = str(e) if e else (round(float(d), 5), float(np.asarray(f, np.float64).sum()))
    return out


def test_augmentation_follows_the_epoch_clock_and_repeats_exactly(ray_local, tmp_path, corpus_and_noise):
    tmp = corpus_and_noise
    cfg = tiny_config(**{
        "data.root": str(tmp / "corpus"), "synth.train_hours": 0.03, "run.storage_path": str(tmp_path / "runs"),
        "run.name": "aug", "augment.speed_factors": "[0.9, 1.0, 1.1]", "augment.noise_root": str(tmp / "noise"),
        "augment.noise_prob": 0.5})
    ds = build_dataset(cfg, "train")
    clock = epoch_clock(epoch_clock_name(cfg))
    ray_local.get(clock.set.remote(0))
    first = _epoch_rows(ds)
    again = _epoch_rows(ds)  # same epoch, re-executed (another set of Ray Data tasks): identical
    ray_local.get(clock.set.remote(1))
    second = _epoch_rows(ds)
    assert first == again
    assert set(first) == set(second) and len(first) >= 30
    changed = sum(first[i] != second[i] for i in first)
    assert changed >= 0.6 * len(first)  # a new epoch: new speed factors, clips, SNRs
    plain = {int(i): float(d) for i, d in zip(*_columns(str(tmp / "corpus"), "index", "duration_s"))}
    assert sum(isinstance(v, str) for v in first.values()) <= 0.1 * len(first)
    ratios = np.array([first[i][0] / plain[i] for i in first if not isinstance(first[i], str)])
    # each utterance plays at 1/0.9, 1 or 1/1.1 of its length, and all three occur
    for r in (1 / 0.9, 1.0, 1 / 1.1):
        assert (np.abs(ratios - r) < 2e-3).sum() >= 3, ratios
