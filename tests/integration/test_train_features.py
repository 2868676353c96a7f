"""Engine features in one short real run: validation, early stopping, EMA, best-checkpoint retention,
asynchronous checkpoint upload (the default), and evaluation with the EMA weights."""

from __future__ import annotations

import pytest

from raytrain_speech.data.synth import synthesize
from raytrain_speech.evaluate.runner import evaluate_checkpoint
from raytrain_speech.train.checkpoint import read_checkpoint
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import BACKENDS, backend_overrides, tiny_config


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_early_stopping_ema_and_best_checkpoints(request, backend, tmp_path):
    root = str(tmp_path / "corpus")
    synthesize(tiny_config().synth, root, log=lambda s: None)
    cfg = tiny_config(**backend_overrides(request, backend), **{
        "data.root": root, "run.storage_path": str(tmp_path / "runs"), "run.name": "features",
        "run.checkpoint_score_attribute": "valid_loss", "run.checkpoints_to_keep": 1,
        "train.max_steps": 200, "train.log_every_steps": 2, "train.checkpoint_every_steps": 4,
        "train.validate_every_steps": 4, "train.early_stop_patience": 2, "train.early_stop_min_delta": 100.0,
        "train.global_batch_audio_s": 20, "step.ema_decay": 0.9, "optim.warmup_steps": 2,
    })
    outcome = fit(cfg, progress=False)
    metrics = read_metrics(str(tmp_path / "runs" / "features" / "metrics.jsonl"))
    validated = [m for m in metrics if "valid_loss" in m]
    # min_delta 100 means nothing counts as an improvement: the first validation sets the baseline,
    # the next two fail to beat it, and patience 2 stops the run at step 12 of 200.
    assert [m["step"] for m in validated] == [4, 8, 12]
    assert all(0 <= m["valid_wer"] <= 2 and m["valid_loss"] > 0 for m in validated)
    assert outcome.metrics["step"] == 12 and outcome.run_card["final"]["step"] == 12
    assert metrics[-1]["stopped_early"] is True

    payload, _ = read_checkpoint(outcome.checkpoint_uri)
    assert payload["ema"] is not None and payload["train_state"]["stopped_early"]
    ema_differs = any((payload["ema"][k] != payload["model"][k].float()).any() for k in payload["ema"])
    assert ema_differs

    # run.checkpoints_to_keep=1: the latest (12) is kept; the local backend keeps nothing else (Ray's own
    # manager may keep the best by valid_loss beside it).
    kept = sorted(p.name for p in (tmp_path / "runs" / "features").glob("checkpoint_step*"))
    assert kept == ["checkpoint_step00000012"] if backend == "local" else "checkpoint_step00000012" in kept

    result = evaluate_checkpoint(outcome.checkpoint_uri, split="dev")
    assert result["weights"] == "ema"

    # Re-running the finished run does nothing more: it stopped early, and that is remembered.
    again = fit(cfg, progress=False)
    assert again.metrics.get("step", 12) == 12
    assert read_metrics(str(tmp_path / "runs" / "features" / "metrics.jsonl"))[-1]["step"] == 12
