import numpy as np
import pytest
import torch

from raytrain_speech.config import FeatureConfig
from raytrain_speech.data.features import FeatureExtractor, LogMel, normalize_utterance


def test_frame_count_and_bins_follow_25ms_10ms():
    cfg = FeatureConfig()
    assert (cfg.win_length, cfg.hop_length) == (400, 160)
    feats = FeatureExtractor(cfg)(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
    assert feats.shape == (cfg.num_frames(16000), 80) == (101, 80)
    assert feats.dtype == np.float32


def test_per_utterance_normalisation():
    feats = FeatureExtractor(FeatureConfig())(np.random.default_rng(1).standard_normal(32000).astype(np.float32))
    assert np.allclose(feats.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(feats.std(axis=0), 1, atol=1e-3)


def test_tone_energy_lands_in_the_right_mel_bin():
    cfg = FeatureConfig(normalize="none")
    t = torch.arange(16000) / 16000
    low = LogMel(cfg)(torch.sin(2 * torch.pi * 300 * t)).mean(0)
    high = LogMel(cfg)(torch.sin(2 * torch.pi * 4000 * t)).mean(0)
    assert int(low.argmax()) < int(high.argmax())


def test_hamming_window_is_used():
    assert torch.allclose(LogMel(FeatureConfig()).mel.spectrogram.window, torch.hamming_window(400))


def test_normalize_constant_input_does_not_divide_by_zero():
    out = normalize_utterance(torch.ones(10, 80))
    assert torch.isfinite(out).all()


def test_bad_front_end_config():
    from raytrain_speech.config import ConfigError

    with pytest.raises(ConfigError, match="n_fft"):
        FeatureConfig(n_fft=256).validate()


def test_device_front_end_matches_the_cpu_path_row_by_row():
    """features.placement=worker: a zero-padded batch of center-padded waveforms gives every row the
    frames the Ray Data path computes for it alone (the short rows' last frames included)."""
    from raytrain_speech.data.batching import Utterance, collate
    from raytrain_speech.data.features import DeviceLogMel, center_pad

    cfg = FeatureConfig()
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 9999, 4321, 16160)]
    batch = collate([Utterance(i, str(i), len(w) / 16000, center_pad(w, cfg), np.ones(3, np.int64))
                     for i, w in enumerate(waves)])
    feats_BFM, frames_B = DeviceLogMel(cfg)(batch.features_BFM, batch.feature_lengths_B)
    cpu = FeatureExtractor(cfg)
    for b, w in enumerate(waves):
        expected = cpu(w)
        assert int(frames_B[b]) == expected.shape[0] == cfg.num_frames(len(w))
        np.testing.assert_allclose(feats_BFM[b, : expected.shape[0]].numpy(), expected, atol=1e-5)
        assert not feats_BFM[b, expected.shape[0]:].any()  # padding frames are zero
