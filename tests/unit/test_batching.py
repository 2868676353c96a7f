import numpy as np

from raytrain_speech.data.batching import BatchingConfig, Utterance, batch_by_duration, collate


def _utts(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = float(rng.uniform(0.5, 6.0))
        frames = int(d * 100)
        out.append(Utterance(i, f"u{i}", d, np.ones((frames, 4), np.float32) * i, np.arange(1, 1 + i % 7 + 1)))
    return out


def test_every_utterance_exactly_once_and_budget_respected():
    utts = _utts(300)
    cfg = BatchingConfig(sort_window_utterances=64)
    batches = list(batch_by_duration(utts, 20.0, cfg, seed=3))
    seen = [u.index for b in batches for u in b]
    assert sorted(seen) == list(range(300))
    for b in batches:
        assert len(b) * max(u.duration_s for u in b) <= 20.0 or len(b) == 1


def test_oversized_utterance_is_its_own_batch_not_dropped():
    utts = _utts(10)
    utts[4].duration_s = 50.0
    batches = list(batch_by_duration(utts, 10.0, BatchingConfig()))
    assert [u.index for b in batches for u in b if u.duration_s == 50.0] == [4]
    assert any(len(b) == 1 and b[0].index == 4 for b in batches)


def test_sorting_window_reduces_padding():
    utts = _utts(400, seed=5)
    def padding(window):
        batches = [collate(b) for b in batch_by_duration(utts, 30.0, BatchingConfig(sort_window_utterances=window))]
        return np.mean([b.padding_fraction for b in batches])
    assert padding(400) < padding(1) * 0.5


def test_max_utterances_cap_and_shuffle_is_seeded():
    utts = _utts(100)
    cfg = BatchingConfig(max_batch_utterances=3)
    a = [[u.index for u in b] for b in batch_by_duration(utts, 1000.0, cfg, seed=1)]
    b = [[u.index for u in b] for b in batch_by_duration(utts, 1000.0, cfg, seed=1)]
    c = [[u.index for u in b] for b in batch_by_duration(utts, 1000.0, cfg, seed=2)]
    assert all(len(x) <= 3 for x in a)
    assert a == b and a != c


def test_collate_pads_and_keeps_lengths():
    utts = _utts(5)
    b = collate(utts)
    assert b.features_BFM.shape == (5, max(u.features_FM.shape[0] for u in utts), 4)
    for i, u in enumerate(utts):
        n = u.features_FM.shape[0]
        assert int(b.feature_lengths_B[i]) == n
        assert float(b.features_BFM[i, n:].abs().sum()) == 0.0
        assert b.targets_BL[i, : len(u.targets_L)].tolist() == list(u.targets_L)
    assert abs(b.audio_s - sum(u.duration_s for u in utts)) < 1e-6
