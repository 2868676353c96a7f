"""Local storage, stopping by epochs: the run ends after max_epochs with a final checkpoint."""

from __future__ import annotations

from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.checkpoint import read_checkpoint
from raytrain_speech.train.launch import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import tiny_config


def test_max_epochs_ends_with_a_final_checkpoint(ray_local, tmp_path):
    cfg = tiny_config(**{
        "data.root": str(tmp_path / "corpus"), "run.storage_path": str(tmp_path / "runs"), "run.name": "epochs",
        "train.max_steps": 10000, "train.max_epochs": 1, "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 1000, "train.global_batch_audio_s": 60,
    })
    manifest = synthesize(cfg.synth, cfg.data.root, log=lambda s: None)
    outcome = fit(cfg, progress=False)
    payload, config_yaml = read_checkpoint(outcome.checkpoint_uri)
    state = payload["train_state"]
    n_train = manifest.splits["train"].num_utterances
    # one pass: no utterance twice, and only the ragged tail of the epoch left out
    assert 0.6 * n_train <= state["utterances_seen"] <= n_train
    assert state["epoch"] == 1 and state["world_sizes"] == [2]
    assert "max_epochs: 1" in config_yaml
    metrics = read_metrics(str(tmp_path / "runs" / "epochs" / "metrics.jsonl"))
    assert metrics[-1]["checkpoint"] and metrics[-1]["step"] == state["step"]
