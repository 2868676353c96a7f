"""The mixture plan (data/mixture.py): shares, per-source epochs, occurrence numbering, reading."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from raytrain_speech.config import ConfigError, load_config
from raytrain_speech.data.mixture import Mixture, Source, expand


def source(name: str, n: int, per_shard: int, durations_s) -> Source:
    shard_indices = [np.arange(k, min(k + per_shard, n)) for k in range(0, n, per_shard)]
    return Source(name, f"/corpora/{name}", "train", None, False, [f"/corpora/{name}/{k}.parquet"
                                                                     for k in range(len(shard_indices))],
                  [int(i[0]) for i in shard_indices], shard_indices, np.asarray(durations_s, np.float64), n)


@pytest.fixture
def big_and_small():
    rng = np.random.default_rng(0)
    return source("big", 400, 50, rng.uniform(1, 5, 400)), source("small", 60, 20, rng.uniform(1, 3, 60))


def occurrences(mix: Mixture, epochs: int) -> dict[tuple[int, int], list[int]]:
    out = collections.defaultdict(list)
    for e in range(epochs):
        plan = mix.epoch(e)
        for j in range(plan.size):
            out[(int(plan.source_of([j])[0]), int(plan.source_epoch[j]))].append(int(plan.index[j]))
    return out


def test_shares_hold_per_epoch_and_each_source_epoch_is_every_utterance_once(big_and_small):
    big, small = big_and_small
    mix = Mixture([big, small], [3, 1], "hours", seed=7, shuffle=True)  # weights normalised: 0.75 / 0.25
    for e in range(6):
        plan = mix.epoch(e)
        audio = [big.durations_s[plan.index[plan.offsets[0]:plan.offsets[1]]].sum(),
                 small.durations_s[plan.index[plan.offsets[1]:plan.offsets[2]]].sum()]
        # exact to one utterance per source (at most 5 s here) against the epoch's budget
        assert abs(audio[1] - 0.25 * mix.totals.sum()) < 3.0 and abs(audio[0] - 0.75 * mix.totals.sum()) < 5.0
    seen = occurrences(mix, 6)
    # small (~16% of the audio at weight 0.25) ran through several of its epochs; big not even 5
    complete = {key: v for key, v in seen.items() if sorted(v) == list(range([400, 60][key[0]]))}
    assert len([k for k in complete if k[0] == 1]) >= 8 and len([k for k in complete if k[0] == 0]) == 4
    for key, v in seen.items():
        assert len(v) == len(set(v)), f"source {key[0]} epoch {key[1]} has an utterance twice"


def test_weights_equal_to_the_sizes_give_every_source_once_per_mixture_epoch(big_and_small):
    big, small = big_and_small
    sizes = [big.durations_s.sum(), small.durations_s.sum()]
    mix = Mixture([big, small], sizes, "hours", seed=1, shuffle=True)
    for e in range(3):
        plan = mix.epoch(e)
        assert plan.size == 460 and set(plan.source_epoch.tolist()) == {e}
    by_count = Mixture([big, small], [400, 60], "utterances", seed=1, shuffle=True)
    assert by_count.epoch(0).size == 460 and set(by_count.epoch(1).source_epoch.tolist()) == {1}


def test_the_plan_depends_on_the_weights_seed_and_shards_only(big_and_small):
    big, small = big_and_small
    a = Mixture([big, small], [0.75, 0.25], "hours", seed=7, shuffle=True)
    b = Mixture([big, small], [0.75, 0.25], "hours", seed=7, shuffle=True)
    assert a.key == b.key and np.array_equal(a.epoch(3).index, b.epoch(3).index)
    assert Mixture([big, small], [0.7, 0.3], "hours", seed=7, shuffle=True).key != a.key
    assert Mixture([big, small], [0.75, 0.25], "hours", seed=8, shuffle=True).key != a.key
    fewer = source("small", 60, 20, small.durations_s)
    fewer.uris, fewer.shard_indices, fewer.first_index = fewer.uris[1:], fewer.shard_indices[1:], fewer.first_index[1:]
    assert Mixture([big, fewer], [0.75, 0.25], "hours", seed=7, shuffle=True).key != a.key


def test_filtered_durations_do_not_count_and_an_empty_source_is_one_line(big_and_small):
    big, small = big_and_small
    with pytest.raises(ValueError, match="data.sources small: no readable utterance within data.min/max_duration_s"):
        Mixture([big, small], [1, 1], "hours", 0, True, duration_range_s=(3.5, None))


def test_reading_repeats_a_row_per_occurrence_left_and_renumbers_it():
    batch = {"index": np.array([3, 4, 5]), "id": np.array(["a", "b", "c"], dtype=object),
             "audio": np.array([b"x", b"y", b"z"], dtype=object)}
    idx, numbers = np.array([3, 5, 5, 9]), np.array([10, 11, 12, 13])
    out = expand(batch, idx, numbers, "cv")
    assert out["index"].tolist() == [10, 11, 12]
    assert out["id"].tolist() == ["cv/a", "cv/c", "cv/c"] and out["audio"].tolist() == [b"x", b"z", b"z"]


def test_remaining_leaves_out_consumed_occurrences(big_and_small):
    mix = Mixture(list(big_and_small), [0.5, 0.5], "hours", seed=3, shuffle=True)
    plan = mix.epoch(0)
    consumed = np.zeros(plan.size, bool)
    idx, numbers = plan.remaining(1, 0, 20, None)
    assert (idx < 20).all() and (plan.index[numbers] == idx).all() and (plan.source_of(numbers) == 1).all()
    consumed[numbers[:5]] = True
    left_idx, left_numbers = plan.remaining(1, 0, 20, consumed)
    assert sorted(left_numbers.tolist()) == sorted(numbers[5:].tolist())


def test_sources_config(tmp_path):
    recipe = "examples/conformer_ctc_tiny.yaml"
    cfg = load_config(recipe, ["data.sources=[{name: a, root: /x/a, weight: 3}, {name: b, root: s3://y/b}]"])
    assert [s.name for s in cfg.data.sources] == ["a", "b"] and cfg.data.sources[1].weight == 1.0
    assert cfg.data.root == "/x/a"  # validation reads the first source unless data.root is set
    kept = load_config(recipe, ["data.root=/x/b", "data.sources=[{name: a, root: /x/a}]"])
    assert kept.data.root == "/x/b"
    for bad, message in [("[{name: a, root: /x}, {name: a, root: /y}]", "source names must be unique"),
                         ("[{name: 'a b', root: /x}]", "must be letters, digits"),
                         ("[{name: a, root: /x, weight: 0}]", "weight: must be positive"),
                         ("[{name: a, root: /x, wieght: 1}]", "unknown config key 'data.sources\\[0\\].wieght'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(recipe, [f"data.sources={bad}"])
