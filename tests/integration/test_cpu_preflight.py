"""The CPU preflight on a real Ray cluster: training workers that would take every CPU of the joined
cluster are refused before Train starts, in one line; nothing waits for data that can never come."""

from __future__ import annotations

import time

import pytest

from raytrain_speech.config import ConfigError
from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.fit import fit
from tests.conftest import tiny_config


def test_workers_that_fill_the_cluster_are_refused_at_start(ray_local, tmp_path):
    cpus = ray_local.cluster_resources()["CPU"]  # the shared cluster: 4 CPUs
    cfg = tiny_config(**{"data.root": str(tmp_path / "corpus"), "run.backend": "ray",
                         "run.storage_path": str(tmp_path / "runs"), "run.num_workers": 2,
                         "run.cpus_per_worker": cpus / 2, "train.max_steps": 2, "synth.train_hours": 0.005,
                         "synth.dev_utterances": 2, "synth.test_utterances": 2})
    synthesize(cfg.synth, cfg.data.root, log=lambda s: None)
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        fit(cfg, progress=False)
    assert time.monotonic() - started < 30  # refused at start, not after a stall
    message = str(err.value)
    assert "\n" not in message and message.startswith("no CPU left for data")
    assert f"the cluster has {cpus:g} CPUs" in message and "run.cpus_per_worker" in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint_*"))
