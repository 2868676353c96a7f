"""Local storage, stopping by epochs: the run ends after max_epochs with a final checkpoint; on the way,
the training-only data paths: speed perturbation and noise in the data path (Ray Data under the Ray
backend), log-mel on the training device."""

from __future__ import annotations

import pytest

from raytrain_speech.data.noise import NoiseSetConfig, write_noise_set
from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.checkpoint import read_checkpoint
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import BACKENDS, backend_overrides, tiny_config
from tests.integration.audit import assert_exactly_once, assert_no_stale_rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_epochs_ends_with_a_final_checkpoint(request, backend, tmp_path):
    cfg = tiny_config(**backend_overrides(request, backend), **{
        "data.root": str(tmp_path / "corpus"), "run.storage_path": str(tmp_path / "runs"), "run.name": "epochs",
        "train.max_steps": 10000, "train.max_epochs": 1, "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 1000, "train.global_batch_audio_s": 60,
        "augment.speed_factors": "[0.9, 1.0, 1.1]", "augment.noise_root": str(tmp_path / "noise"),
        "features.placement": "worker", "train.trained_log_dir": str(tmp_path / "trained"),
    })
    manifest = synthesize(cfg.synth, cfg.data.root, log=lambda s: None)
    write_noise_set(NoiseSetConfig(clips=4, clip_duration_s=2.0, kinds=("pink", "hum")), str(tmp_path / "noise"),
                    log=lambda s: None)
    outcome = fit(cfg, progress=False)
    payload, config_yaml = read_checkpoint(outcome.checkpoint_uri)
    state = payload["train_state"]
    n_train = manifest.splits["train"].num_utterances
    # One whole pass: every utterance trained once (ranks that run dry step fillers; nothing is dropped).
    assert state["utterances_seen"] == n_train
    assert_exactly_once(str(tmp_path / "trained"), n_train, final_step=state["step"], complete_epochs=1,
                        last_epoch_complete=True)
    assert state["epoch"] == 1 and state["world_sizes"] == [2 if backend == "ray" else 1]
    assert "max_epochs: 1" in config_yaml
    metrics = read_metrics(str(tmp_path / "runs" / "epochs" / "metrics.jsonl"))
    assert metrics[-1]["checkpoint"] and metrics[-1]["step"] == state["step"]
    assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # finite with noise, speed, device mel
    assert metrics[-1]["bad_utterances"] == 0 and metrics[-1]["stop_reason"] == ""
    assert_no_stale_rows(metrics)
    # Data wait: per report window (the slowest rank's), per attempt, and in the run card.
    waits = [m["data_wait_s"] for m in metrics]
    assert min(waits) >= 0 and waits[0] > 0, waits  # the first window waited for the pipeline to fill
    total = metrics[-1]["attempt_data_wait_s"]
    if backend == "local":  # one rank: the windows add up to the attempt
        assert sum(waits) == pytest.approx(total)
    else:  # each window's slowest rank, against the slowest rank over the attempt
        assert sum(waits) >= total - 1e-6
    assert outcome.run_card["data_wait_s"] == pytest.approx(total)
    assert outcome.run_card["worker_history"][0]["data_wait_s"] == pytest.approx(total)

    # Re-running the finished run trains nothing and changes no record (it used to append a metrics line
    # with lr null and 0 audio-s/s, and rewrite the run card with a restart that never happened).
    run = tmp_path / "runs" / "epochs"
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    again = fit(cfg, progress=False)
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert sorted(after) == sorted(before)
    assert [p.name for p in after if after[p] != before[p]] == []
    assert again.checkpoint_uri == outcome.checkpoint_uri and again.metrics["step"] == state["step"]
    assert again.run_card == outcome.run_card
