"""Speed perturbation and additive noise: exact SNR, the right length, and the same audio for the same
(seed, epoch, index) in any process."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from raytrain_speech.config import AugmentConfig, ConfigError, from_dict
from raytrain_speech.data.augment import WaveformAugmenter, mix_noise, speed_perturb

CFG = AugmentConfig(speed_factors=(0.9, 1.0, 1.1), noise_root="unused", noise_prob=0.8, noise_snr_db=(0.0, 15.0))


def speech_like(n: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(n)
            ).astype(np.float32)


def noise_clips(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) * s for n, s in ((8000, 0.1), (24000, 0.5), (3000, 1.0))]


def digest(seed: int, epoch: int, indices: list[int]) -> str:
    aug = WaveformAugmenter(CFG, noise_clips())
    h = hashlib.sha256()
    for i in indices:
        h.update(aug(speech_like(12000 + 37 * i, seed=i), seed, epoch, i).tobytes())
    return h.hexdigest()


def test_same_seed_epoch_index_same_audio_in_another_process():
    """The Ray Data task that augments an utterance after a restart is another process on another node,
    with another torch thread count (Ray Data tasks run 1; the local backend train.torch_threads)."""
    import torch

    here = digest(7, 2, list(range(12)))
    other_threads = 2 if torch.get_num_threads() == 1 else 1
    code = (f"import sys, torch; torch.set_num_threads({other_threads}); sys.path.insert(0, '.'); "
            "from tests.unit.test_waveform_augment import digest; print(digest(7, 2, list(range(12))))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here
    assert digest(7, 3, list(range(12))) != here  # a new epoch draws anew
    assert digest(8, 2, list(range(12))) != here  # and so does a new seed


def test_order_of_utterances_does_not_matter():
    aug = WaveformAugmenter(CFG, noise_clips())
    x = speech_like()
    a = aug(x, 0, 0, 5)
    for i in (1, 2, 3):
        aug(x, 0, 0, i)
    assert np.array_equal(aug(x, 0, 0, 5), a)


def test_speed_perturbation_changes_length_and_pitch():
    x = speech_like(16000)
    for factor in (0.9, 1.1):
        y = speed_perturb(x, factor)
        assert abs(len(y) - len(x) / factor) <= 1
        spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        peak_hz = np.argmax(spectrum) * 16000 / len(y)
        assert peak_hz == pytest.approx(220 * factor, rel=0.02)
    assert speed_perturb(x, 1.0) is x


def test_noise_is_mixed_at_the_drawn_snr():
    x = speech_like()
    noise = noise_clips()[1]
    for snr_db in (0.0, 10.0, 20.0):
        y = mix_noise(x, noise, snr_db, offset=123)
        added = y - x
        measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(added.astype(np.float64) ** 2))
        assert measured == pytest.approx(snr_db, abs=0.01)
    short = noise_clips()[2]  # shorter than the utterance: looped
    assert mix_noise(x, short, 5.0).shape == x.shape
    assert np.array_equal(mix_noise(np.zeros(100, np.float32), short, 5.0), np.zeros(100, np.float32))


def test_draws_cover_every_factor_and_respect_the_ranges():
    aug = WaveformAugmenter(CFG, noise_clips())
    draws = [aug.draw(0, 0, i) for i in range(600)]
    assert {d["speed"] for d in draws} == {0.9, 1.0, 1.1}
    noisy = [d for d in draws if d["clip"] is not None]
    assert 0.7 < len(noisy) / len(draws) < 0.9
    assert all(0.0 <= d["snr_db"] <= 15.0 for d in noisy)
    assert {d["clip"] for d in noisy} == {0, 1, 2}


def test_off_by_default_and_config_errors():
    assert not AugmentConfig().waveform_enabled
    assert AugmentConfig(speed_factors=(0.9, 1.1)).waveform_enabled
    assert not AugmentConfig(speed_factors=(1.0,)).waveform_enabled
    for bad in ({"speed_factors": [3.0]}, {"noise_prob": 1.5}, {"noise_snr_db": [20, 5]}):
        with pytest.raises(ConfigError, match="augment"):
            from_dict(AugmentConfig, bad, "augment")
    with pytest.raises(ValueError, match="no noise clips"):
        WaveformAugmenter(AugmentConfig(noise_root="s3://b/noise"), [])
