"""Reads the per-rank trained-on logs (``train.trained_log_dir``) and checks exactly-once per epoch.

A step *survives* if no later attempt restored from an earlier step (a restart rolls back to its
checkpoint; the steps after it were redone). Over surviving steps, every utterance index of a
completed epoch must appear exactly once, and step numbers must run 1..N with no gap or repeat.
"""

from __future__ import annotations

import collections
import glob
import json
import os


def read_attempts(log_dir: str) -> list[dict]:
    """[{attempt_id, start, restored_step, world_size, pids, steps: {step: {"epoch", "indices"}}}] by start."""
    attempts: dict[str, dict] = {}
    for path in glob.glob(os.path.join(log_dir, "*.jsonl")):
        with open(path) as f:
            lines = [json.loads(x) for x in f if x.strip()]
        if not lines or "attempt_id" not in lines[0]:
            continue
        head = lines[0]
        a = attempts.setdefault(head["attempt_id"], {
            "attempt_id": head["attempt_id"], "start": head["attempt_start"], "restored_step": head["restored_step"],
            "world_size": head["world_size"], "grad_accum": head["grad_accum"], "pids": {}, "steps": {}})
        a["start"] = min(a["start"], head["attempt_start"])
        a["pids"][head["rank"]] = head["pid"]
        for rec in lines[1:]:
            step = a["steps"].setdefault(rec["step"], {"epoch": rec["epoch"], "indices": [], "ranks": 0,
                                                       "time": rec.get("time")})
            step["indices"] += rec["indices"]
            step["ranks"] += 1
    return sorted(attempts.values(), key=lambda a: a["start"])


def surviving_steps(attempts: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for k, a in enumerate(attempts):
        later = [b["restored_step"] for b in attempts[k + 1:]]
        cutoff = min(later) if later else float("inf")
        for step, rec in a["steps"].items():
            if step <= cutoff:
                assert rec["ranks"] == a["world_size"], f"step {step}: {rec['ranks']} of {a['world_size']} ranks logged"
                out[step] = rec
    return out


def assert_exactly_once(log_dir: str, num_utterances: int, final_step: int, complete_epochs: int | None = None,
                        last_epoch_complete: bool = False) -> list[dict]:
    """Every surviving step once, no utterance twice in an epoch, and none missing from a finished
    epoch. Finished = every epoch before the last one logged, and the last one too when the run was
    stopped by ``train.max_epochs`` (``last_epoch_complete``). ``complete_epochs``: at least that many
    must be finished (a test whose faulted epoch must complete), so a run that turns out shorter fails
    instead of checking less."""
    attempts = read_attempts(log_dir)
    steps = surviving_steps(attempts)
    assert sorted(steps) == list(range(1, final_step + 1)), f"step numbers: {sorted(steps)[:5]}...{sorted(steps)[-5:]}"
    by_epoch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for rec in steps.values():
        by_epoch[rec["epoch"]].update(rec["indices"])
    finished = max(by_epoch) + (1 if last_epoch_complete else 0)
    assert complete_epochs is None or finished >= complete_epochs, (
        f"the run logged epochs {sorted(by_epoch)}: {finished} finished, {complete_epochs} expected (make the run "
        "longer, or stop it with train.max_epochs)")
    complete = finished
    for epoch, counts in by_epoch.items():
        repeated = [i for i, c in counts.items() if c > 1]
        assert not repeated, f"epoch {epoch}: {len(repeated)} utterances trained twice, e.g. {repeated[:5]}"
        if epoch < complete:
            missing = set(range(num_utterances)) - set(counts)
            assert not missing, f"epoch {epoch}: {len(missing)} utterances never trained, e.g. {sorted(missing)[:5]}"
    return attempts


def assert_no_stale_rows(metrics: list[dict]) -> None:
    """No rank was handed a row its restored cursor had already consumed: the resumed epoch's
    consumed utterances were left out before decoding, so the second line of defence
    (``drop_stale``) never had to act. Every report carries its attempt's count so far."""
    assert metrics and all("stale_rows" in m for m in metrics), "reports without a stale_rows count"
    stale = {m["attempt_id"]: m["stale_rows"] for m in metrics}
    assert not any(stale.values()), f"already-consumed rows reached the workers: {stale}"
