import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain_speech.config import BatchingConfig, ConfigError, SynthConfig
from raytrain_speech.data import shards
from raytrain_speech.data.batching import (
    Utterance,
    batch_by_buckets,
    batch_by_duration,
    collate,
    duration_quantile_boundaries,
)
from raytrain_speech.data.synth import synthesize
from raytrain_speech.storage import StorageError

DEMO_WORKER_BUDGET_S = 120.0 / 2
"""The demo's train.global_batch_audio_s over its 2 workers, with no micro-batch: one batch per step."""


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


def _with_durations(durations_s):
    return [Utterance(i, f"u{i}", float(d), np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
            for i, d in enumerate(durations_s)]


def _padding(batches):
    """Share of padded (rows x longest) seconds that is padding; seconds stand in for feature frames."""
    real_s = sum(u.duration_s for b in batches for u in b)
    padded_s = sum(len(b) * max(u.duration_s for u in b) for b in batches)
    return 1.0 - real_s / padded_s


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The demo corpus's settings (speakers, rates, sentence lengths) with 3 minutes of train audio."""
    root = str(tmp_path_factory.mktemp("corpus"))
    cfg = SynthConfig(train_hours=0.05, dev_utterances=2, test_utterances=2, workers=1)
    return root, synthesize(cfg, root, log=lambda s: None)


def test_quantile_boundaries_on_a_known_distribution():
    durations_s = np.arange(1, 101) / 10.0  # 0.1 .. 10.0 s, evenly
    edges = duration_quantile_boundaries(durations_s, 4)
    assert edges == pytest.approx([2.575, 5.05, 7.525])
    counts = np.bincount(np.searchsorted(edges, durations_s, side="right"), minlength=4)
    assert counts.tolist() == [25, 25, 25, 25]
    assert duration_quantile_boundaries(np.random.default_rng(0).uniform(1, 5, 10_000), 16) == pytest.approx(
        list(1 + 4 * np.arange(1, 16) / 16), abs=0.1)


def test_quantile_boundaries_degenerate_inputs():
    assert duration_quantile_boundaries([], 8) == []
    assert duration_quantile_boundaries([3.0], 8) == []
    assert duration_quantile_boundaries([2.0] * 50, 8) == []  # all equal: one bucket
    assert duration_quantile_boundaries(np.arange(1.0, 10.0), 1) == []
    (edge,) = duration_quantile_boundaries([1.0] * 90 + [4.0] * 10, 10)  # equal quantiles collapse
    assert 1.0 < edge <= 4.0
    few = duration_quantile_boundaries([1.0, 2.0, 3.0], 16)  # fewer utterances than buckets
    assert few == sorted(set(few)) and len(few) <= 15 and all(1.0 < e <= 3.0 for e in few)
    assert duration_quantile_boundaries([1.0, float("nan"), 3.0], 2) == [2.0]
    with pytest.raises(ValueError):
        duration_quantile_boundaries([1.0], 0)


def test_buckets_respect_budget_and_cap_and_emit_every_utterance_once():
    utts = _utts(500, seed=7)
    edges = duration_quantile_boundaries([u.duration_s for u in utts], 8)
    for cap in (None, 5):
        batches = list(batch_by_buckets(utts, edges, 20.0, BatchingConfig(max_batch_utterances=cap), seed=1))
        assert sorted(u.index for b in batches for u in b) == list(range(500))
        for k, b in enumerate(batches):
            assert len(b) == 1 or len(b) * max(u.duration_s for u in b) <= 20.0
            assert cap is None or len(b) <= cap
            bucket = {int(np.searchsorted(edges, u.duration_s, side="right")) for u in b}
            # a batch never mixes buckets, except the pooled leftovers cut at the end of the stream
            assert len(bucket) == 1 or k >= len(batches) - (len(edges) + 1)


def test_bucket_oversized_utterance_alone_and_flush_is_seeded():
    utts = _utts(60)
    utts[4].duration_s = utts[30].duration_s = 50.0
    edges = duration_quantile_boundaries([u.duration_s for u in utts], 4)
    batches = list(batch_by_buckets(utts, edges, 10.0, BatchingConfig(), seed=2))
    assert sorted(u.index for b in batches for u in b) == list(range(60))
    assert [[u.index for u in b] for b in batches if any(u.duration_s == 50.0 for u in b)] == [[4], [30]]
    order = [[[u.index for u in b] for b in batch_by_buckets(utts, edges, 10.0, BatchingConfig(), seed=s)]
             for s in (2, 2, *range(3, 12))]
    assert order[0] == order[1] and any(o != order[0] for o in order[2:])
    assert sorted(map(tuple, order[0])) == sorted(map(tuple, order[2]))


def test_batching_config_duration_buckets_validated():
    BatchingConfig(duration_buckets=0).validate()
    with pytest.raises(ConfigError, match="batching.duration_buckets"):
        BatchingConfig(duration_buckets=-1).validate()


def test_read_durations_reads_the_column_of_every_shard(small_corpus, tmp_path):
    root, manifest = small_corpus
    durations_s = shards.read_durations(root, "train")
    tables = [shards.read_shard(uri) for uri in shards.shard_uris(root, "train")]
    expected = np.concatenate([t.column("duration_s").to_numpy() for t in tables])
    assert len(durations_s) == manifest.splits["train"].num_utterances == len(expected)
    np.testing.assert_allclose(durations_s, expected)
    assert durations_s.sum() / 3600 == pytest.approx(manifest.splits["train"].hours, rel=1e-3)
    assert len(shards.read_durations(root, "dev")) == 2
    shards.write_manifest(str(tmp_path), shards.Manifest(splits={"train": shards.SplitInfo(
        ["train/shard-00000.parquet"], [1], 0.0)}))
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "train" / "shard-00000.parquet")
    with pytest.raises(StorageError, match="shard-00000.parquet.*duration_s"):
        shards.read_durations(str(tmp_path), "train")


def test_bucket_padding_on_demo_corpus_durations(small_corpus):
    root, _ = small_corpus
    durations_s = shards.read_durations(root, "train")
    utts = _with_durations(durations_s)
    cfg = BatchingConfig()
    window = _padding(list(batch_by_duration(utts, DEMO_WORKER_BUDGET_S, cfg, seed=0)))
    edges = duration_quantile_boundaries(durations_s, cfg.duration_buckets or 24)
    buckets = _padding(list(batch_by_buckets(utts, edges, DEMO_WORKER_BUDGET_S, cfg, seed=0)))
    assert buckets < 0.15, f"bucket padding {buckets:.3f} (sort window {window:.3f})"
