"""TensorBoard event files from metrics records, read back with TensorBoard's own event reader: every
step once with its latest attempt's value after a rollback, in one run directory across processes."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raytrain_speech.config import ConfigError
from raytrain_speech.train.metrics import RunRecord, read_metrics
from raytrain_speech.train.trackers import TENSORBOARD_DIR, check_trackers


def _record(step, attempt, start, loss, **extra):
    return {"step": step, "attempt_id": attempt, "attempt": 1 if attempt == "a" else 2, "attempt_start_step": start,
            "loss": loss, "lr": step * 1e-4, "world_size": 2 if attempt == "a" else 1, "stopped_early": False,
            "device": "cpu", **extra}


def _scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_a_rolled_back_attempt_replaces_its_steps_and_a_new_process_continues_the_run(tmp_path):
    first = RunRecord(str(tmp_path), None, {}, trackers=("tensorboard",))
    for step, loss in ((10, 3.0), (20, 2.5), (30, 2.2)):
        first.add(_record(step, "a", 0, loss))
    # attempt b resumed from the checkpoint at step 20: its step 30 replaces attempt a's
    for step, loss in ((30, 2.1), (40, 1.9)):
        first.add(_record(step, "b", 20, loss, valid_wer=0.5 if step == 40 else float("nan")))
    # a later process (the run re-submitted) resumes at step 40 and goes on in the same directory
    later = RunRecord(str(tmp_path), None, {}, trackers=("tensorboard",))
    later.add(_record(50, "c", 40, 1.7))
    for sink in first.sinks + later.sinks:
        sink.close()
    assert _scalars(tmp_path, "loss") == [(10, 3.0), (20, 2.5), (30, 2.1), (40, 1.9), (50, 1.7)]
    assert _scalars(tmp_path, "world_size") == [(10, 2.0), (20, 2.0), (30, 1.0), (40, 1.0), (50, 1.0)]
    assert _scalars(tmp_path, "valid_wer") == [(40, 0.5)]  # NaN and booleans are not scalars
    # the tracker's loss curve is metrics.jsonl's, step for step, latest attempt winning
    latest = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))}
    assert _scalars(tmp_path, "loss") == sorted(latest.items())


def test_unknown_or_missing_trackers_are_one_line_config_errors():
    check_trackers(("tensorboard",))
    check_trackers(())
    with pytest.raises(ConfigError, match=r"run.trackers: 'mlflow' is not supported"):
        check_trackers(("mlflow",))
