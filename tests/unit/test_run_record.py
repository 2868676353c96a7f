"""The run record (metrics.jsonl + run card) under storage errors: an unreadable history is never
rewritten from an empty read, and records reported during an outage are written once storage answers."""

from __future__ import annotations

import shutil

from raytrain_speech.train.metrics import METRICS_FILE, RunRecord, read_metrics


def test_an_unreadable_history_is_not_rewritten_and_held_records_land_later(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    earlier = RunRecord(str(run), None, {"name": "r"}, log=lambda s: None)
    for step in (1, 2):
        earlier.add({"step": step, "attempt": 1})
    saved = (run / METRICS_FILE).read_text()

    # The next attempt starts while the file cannot be read (here: a directory in its place).
    shutil.move(run / METRICS_FILE, tmp_path / "saved.jsonl")
    (run / METRICS_FILE).mkdir()
    said = []
    record = RunRecord(str(run), None, {"name": "r"}, log=said.append)
    record.add({"step": 3, "attempt": 2})
    record.add({"step": 4, "attempt": 2}, checkpoint_path=str(run / "checkpoint_step00000004"))
    assert len(said) == 1 and "run record not written" in said[0]  # one line, not one per report
    assert (run / METRICS_FILE).is_dir()  # nothing was written over it

    # Storage answers again: the earlier attempt's records are kept and the held ones follow them.
    (run / METRICS_FILE).rmdir()
    shutil.move(tmp_path / "saved.jsonl", run / METRICS_FILE)
    assert (run / METRICS_FILE).read_text() == saved
    record.add({"step": 5, "attempt": 2})
    assert [r["step"] for r in read_metrics(str(run / METRICS_FILE))] == [1, 2, 3, 4, 5]
    assert (run / "run_card.json").exists()  # the held checkpoint's card was written with them


def test_a_missing_history_is_a_fresh_run_not_an_error(tmp_path):
    record = RunRecord(str(tmp_path), None, {"name": "r"}, log=lambda s: (_ for _ in ()).throw(AssertionError(s)))
    record.add({"step": 1})
    assert [r["step"] for r in read_metrics(str(tmp_path / METRICS_FILE), strict=True)] == [1]
