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


def assert_mixture_exactly_once(log_dir: str, mixture, final_step: int, last_epoch_complete: bool = False
                                ) -> dict:
    """A mixture of corpora (data/mixture.py): every surviving step once; in every mixture epoch no
    occurrence twice, and all of a finished epoch's occurrences trained; mapped to sources, no
    utterance twice in any epoch of its source, and every readable utterance of a source epoch
    whose occurrences all lie in finished mixture epochs. Returns {"audio_s": per source audio
    trained, "source_epochs": per source the epochs of it checked complete}."""
    import numpy as np

    steps = surviving_steps(read_attempts(log_dir))
    assert sorted(steps) == list(range(1, final_step + 1)), f"step numbers: {sorted(steps)[:5]}...{sorted(steps)[-5:]}"
    by_epoch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for rec in steps.values():
        by_epoch[rec["epoch"]].update(rec["indices"])
    finished = max(by_epoch) + (1 if last_epoch_complete else 0)
    n_sources = len(mixture.sources)
    audio_s = np.zeros(n_sources)
    trained: dict[tuple[int, int], collections.Counter] = collections.defaultdict(collections.Counter)
    planned: dict[tuple[int, int], int] = collections.Counter()
    for epoch in range(max(max(by_epoch) + 1, finished)):
        plan, counts = mixture.epoch(epoch), by_epoch.get(epoch, collections.Counter())
        repeated = [j for j, c in counts.items() if c > 1]
        assert not repeated, f"mixture epoch {epoch}: {len(repeated)} occurrences trained twice, e.g. {repeated[:5]}"
        if epoch < finished:
            missing = set(range(plan.size)) - set(counts)
            assert not missing, f"mixture epoch {epoch}: {len(missing)} occurrences never trained"
            for s, k in zip(plan.source_of(np.arange(plan.size)), plan.source_epoch):
                planned[(int(s), int(k))] += 1
        numbers = np.array(sorted(counts), np.int64)
        if numbers.size:
            assert numbers.max() < plan.size, f"mixture epoch {epoch}: occurrence {numbers.max()} of {plan.size}"
        for j, s, k in zip(numbers, plan.source_of(numbers), plan.source_epoch[numbers]):
            index = int(plan.index[j])
            trained[(int(s), int(k))][index] += 1
            audio_s[s] += mixture.sources[s].durations_s[index]
    complete = collections.defaultdict(list)
    for (s, k), counts in sorted(trained.items()):
        twice = [i for i, c in counts.items() if c > 1]
        assert not twice, f"source {mixture.sources[s].name} epoch {k}: {len(twice)} utterances twice, e.g. {twice[:5]}"
        readable = sum(len(i) for i in mixture.sources[s].shard_indices)
        if planned[(s, k)] == readable:  # all of this source epoch lies in finished mixture epochs
            assert len(counts) == readable, (f"source {mixture.sources[s].name} epoch {k}: {len(counts)} of "
                                             f"{readable} utterances trained")
            complete[s].append(k)
    return {"audio_s": audio_s, "source_epochs": dict(complete)}


def kill_driver_at_step(cmd: list[str], log_dir, at_step: int, timeout_s: float = 300) -> None:
    """Run the CLI ``cmd`` in its own process group and SIGKILL the whole group (the driver and the
    local Ray it started) once the trained-on logs in ``log_dir`` reach ``at_step``."""
    import os
    import signal
    import subprocess
    import time

    import pytest

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            attempts = read_attempts(str(log_dir)) if os.path.isdir(log_dir) else []
            if attempts and max(attempts[-1]["steps"], default=0) >= at_step:
                break
            assert proc.poll() is None, "the first run ended before the fault"
            time.sleep(0.1)
        else:
            pytest.fail(f"the first run never reached step {at_step}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
