"""SpecAugment / span masks: reproducible per utterance, bounded by the config, padding untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain_speech.config import AugmentConfig, ConfigError
from raytrain_speech.data.augment import mask_batch, utterance_mask
from raytrain_speech.seeding import utterance_rng

SPEC = AugmentConfig(freq_masks=2, freq_mask_max_bins=27, time_masks=2, time_mask_max_frames=100)


def test_off_by_default_returns_the_batch_unchanged():
    x = torch.randn(2, 50, 80)
    out, fraction = mask_batch(x, torch.tensor([50, 30]), [0, 1], AugmentConfig(), seed=0, epoch=0)
    assert out is x and fraction == 0.0


def test_same_utterance_same_mask_whatever_the_batch_it_lands_in():
    x = torch.ones(3, 400, 80)
    a, _ = mask_batch(x, torch.tensor([400, 300, 200]), [7, 11, 12], SPEC, seed=1, epoch=3)
    b, _ = mask_batch(x[[1, 0]], torch.tensor([300, 400]), [11, 7], SPEC, seed=1, epoch=3)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    c, _ = mask_batch(x, torch.tensor([400, 300, 200]), [7, 11, 12], SPEC, seed=1, epoch=4)
    assert not torch.equal(a, c)  # a new epoch draws new masks


def test_mask_widths_and_counts_respect_the_config():
    for index in range(200):
        time_F, freq_M = utterance_mask(SPEC, 600, 80, utterance_rng(0, 0, index))
        assert freq_M.sum() <= 2 * 27
        assert time_F.sum() <= 2 * min(100, int(0.2 * 600))


def test_span_masking_covers_about_the_expected_fraction():
    cfg = AugmentConfig(span_mask_prob=0.065, span_mask_frames=10)
    fractions = [utterance_mask(cfg, 2000, 80, utterance_rng(0, 0, i))[0].mean() for i in range(50)]
    expected = 1 - (1 - 0.065) ** 10  # a frame is masked unless none of the 10 spans before it started
    assert abs(np.mean(fractions) - expected) < 0.03


def test_padding_is_never_masked_and_masked_cells_are_zero():
    x = torch.full((2, 300, 80), 5.0)
    out, fraction = mask_batch(x, torch.tensor([300, 120]), [0, 1],
                               AugmentConfig(time_masks=2, span_mask_prob=0.05), seed=0, epoch=0)
    assert torch.all(out[1, 120:] == 5.0)
    assert set(out.unique().tolist()) == {0.0, 5.0} and 0 < fraction < 1


@pytest.mark.parametrize("key,value", [("span_mask_prob", 1.5), ("freq_masks", -1), ("span_mask_frames", 0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"augment.{key}"):
        AugmentConfig(**{key: value}).validate()


def test_filler_rows_with_negative_index_draw_masks_too():
    """A rank with no data runs filler micro-steps whose row index is -1; SSL models mask those too."""
    import torch

    from raytrain_speech.models.masking import frame_span_mask

    mask = frame_span_mask(torch.tensor([30]), [-1], 0.15, 10, seed=0, epoch=0, min_spans=2)
    assert mask.shape == (1, 30) and mask.sum() >= 10
