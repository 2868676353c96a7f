"""ASHA for sweeps: Tune's AsyncHyperBand with its rungs and stop decisions kept in a file of ours.

Tune saves no scheduler state, so a restored sweep would otherwise compare resumed trials only with
each other, and could not tell trials ASHA stopped from trials cut short by Ctrl+C. The rungs are read
through ``ray_compat.asha_rungs`` (a private attribute, checked on the pinned Ray).
"""

from __future__ import annotations

import json

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from raytrain_speech import ray_compat, storage
from raytrain_speech.tune.spaces import SweepConfig

ASHA_RECORD = "asha_state.json"


class RecordingASHA(AsyncHyperBandScheduler):
    """ASHA that keeps its rungs and its stop decisions in a file beside the sweep.

    Tune does not save scheduler state, so after a resume plain ASHA starts with empty rungs and
    compares resumed trials only with each other; this one reloads the rungs on its first result.
    The stop record also tells trials ASHA stopped from trials cut short by Ctrl+C, which Tune marks
    the same way (TERMINATED).
    """

    def __init__(self, record_uri: str, storage_cfg, **kwargs):
        super().__init__(**kwargs)
        self.record_uri, self.storage_cfg = record_uri, storage_cfg
        self._stopped: set[str] | None = None  # read from the record on the first result, then kept here

    def _load_once(self) -> None:
        if self._stopped is not None:
            return
        saved = read_asha_record(self.record_uri, self.storage_cfg)
        self._stopped = set(saved.get("stopped", []))
        for live, rungs in zip(ray_compat.asha_rungs(self), saved.get("rungs", [])):
            for recorded, old in zip(live, rungs):
                for trial_id, reward in old.items():
                    recorded.setdefault(trial_id, reward)

    def on_trial_result(self, tune_controller, trial, result):
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            print(f"[tune] ASHA stops trial {trial.trial_id} at step {result.get('step')}: "
                  f"{self._metric} {result.get(self._metric)} trails its rung", flush=True)
            self._stopped.add(trial.trial_id)
        record = {"stopped": sorted(self._stopped),
                  "rungs": [[dict(recorded) for recorded in bracket] for bracket in ray_compat.asha_rungs(self)]}
        storage.write_bytes(self.record_uri, json.dumps(record).encode(), self.storage_cfg)
        return action


def scheduler(sweep: SweepConfig, max_steps: int, record_uri: str, storage_cfg) -> TrialScheduler:
    """The sweep's scheduler: FIFO, or ASHA on ``step`` that records its rungs in ``record_uri``."""
    if sweep.scheduler.name == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial at max_steps finishes by itself, so its final checkpoint and
    # run card are written instead of the trial being killed at its last report.
    return RecordingASHA(record_uri, storage_cfg, time_attr="step", max_t=max_steps,
                         grace_period=sweep.scheduler.grace_period_steps,
                         reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)


def read_asha_record(record_uri: str, storage_cfg) -> dict:
    """Our ASHA record ({"stopped": [trial ids], "rungs": [...]}); {} before the first result."""
    if not storage.exists(record_uri, storage_cfg):
        return {}
    return json.loads(storage.read_bytes(record_uri, storage_cfg))
