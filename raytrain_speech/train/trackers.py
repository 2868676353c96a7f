"""Experiment trackers: every record rank 0 reports (what ``metrics.jsonl`` gets) also goes to them.

``run.trackers: [tensorboard]`` (the default) writes TensorBoard event files under
``<run dir>/tensorboard/``, so ``tensorboard --logdir runs/`` shows every run as it trains. Each
numeric field of a record is a scalar at the record's step (loss, lr, grad_norm, throughput,
padding, bad/filtered counts, data wait, world size, accumulation, validation loss/WER, ...); the
resolved config is a text summary.

A resumed run continues the same TensorBoard run (the same directory). Each attempt writes its own
event file; an attempt that resumed from an earlier checkpoint than the steps already logged opens
its file with ``purge_step`` = its first step, so TensorBoard drops the rolled-back steps' points and
shows each step once, with the value of the attempt whose weights went on. A run directory in object
storage gets its event files through a local staging directory per attempt, uploaded after every record.

A tracker that fails costs one printed line, never the run: ``metrics.jsonl`` stays the record.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig

TRACKERS = ("tensorboard",)
"""Trackers this version can log to (run.trackers)."""
TENSORBOARD_DIR = "tensorboard"
NOT_SCALARS = frozenset({"step", "time", "attempt_start_step"})
"""Record fields that are not plotted (the step is the x axis; time is TensorBoard's wall time)."""


def finite(value) -> float | None:
    """A metrics value as a plottable number: finite ints and floats; None for anything else (null,
    NaN, a boolean flag, text). Shared with curves.py, so a plot and TensorBoard agree."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def scalars(record: dict) -> dict[str, float]:
    """The plottable fields of a metrics record."""
    return {k: finite(v) for k, v in record.items() if k not in NOT_SCALARS and finite(v) is not None}


class TensorBoardSink:
    """TensorBoard event files of one run directory (created lazily: it lives in a Ray Train
    callback that is pickled before it is used)."""

    def __init__(self, run_dir: str, storage_cfg: StorageConfig | None):
        self.run_dir, self.storage_cfg = run_dir, storage_cfg
        self.remote = storage.is_remote(run_dir)
        self.writer = None
        self.attempt = None
        self.local_dir: str | None = None
        self.opened_s = 0

    def _open(self, record: dict, history: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
            if self.remote:  # its file is uploaded already
                shutil.rmtree(self.local_dir, ignore_errors=True)
        start = record.get("attempt_start_step") or 0
        rolled_back = any(r.get("step", 0) > start for r in history)
        if self.remote:  # a staging directory per attempt: each upload sends only this attempt's file
            self.local_dir = tempfile.mkdtemp(prefix="rts-tensorboard-")
            log_dir = self.local_dir
            newest_s = self.opened_s
        else:
            log_dir = os.path.join(self.run_dir, TENSORBOARD_DIR)
            newest_s = max(self.opened_s, _newest_event_file_s(log_dir))
        # TensorBoard reads a run's event files in name order, and a name starts with the second its
        # file was opened: a file opened in the same second as the previous attempt's sorts by pid and
        # a counter (as text) and may be read first, losing its purge of the rolled-back steps.
        wait_s = newest_s + 1 - time.time()
        if wait_s > 0:
            time.sleep(wait_s)
        self.opened_s = int(time.time())
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start + 1 if rolled_back else None,
                                    filename_suffix=f".attempt{record.get('attempt', 1)}")
        config = storage.join(self.run_dir, "config.yaml")
        if storage.exists(config, self.storage_cfg):
            text = storage.read_bytes(config, self.storage_cfg).decode()
            self.writer.add_text("config", "```\n" + text + "\n```", global_step=start)

    def log(self, record: dict, history: list[dict]) -> None:
        """One record; ``history`` = the records logged before it (this process's or earlier ones')."""
        if "step" not in record:
            return
        attempt = record.get("attempt_id") or record.get("attempt", 1)
        if self.writer is None or attempt != self.attempt:
            self._open(record, history)
            self.attempt = attempt
        wall = record.get("time")
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"], walltime=wall)
        self.writer.flush()
        if self.remote:
            for name in os.listdir(self.local_dir):
                with open(os.path.join(self.local_dir, name), "rb") as f:
                    storage.write_bytes(storage.join(self.run_dir, TENSORBOARD_DIR, name), f.read(),
                                        self.storage_cfg)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _newest_event_file_s(log_dir: str) -> int:
    """The second the newest event file in ``log_dir`` was opened (its name says: events.out.tfevents.<s>...)."""
    if not os.path.isdir(log_dir):
        return 0
    seconds = [int(n.split(".")[3]) for n in os.listdir(log_dir)
               if n.startswith("events.out.tfevents.") and n.split(".")[3].isdigit()]
    return max(seconds, default=0)


def check_trackers(names) -> None:
    """Up front: every tracker asked for is one this version has and can import."""
    from raytrain_speech.config import ConfigError

    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"run.trackers: {name!r} is not supported (supported: {', '.join(TRACKERS)}; "
                              "MLflow and W&B are not built yet)")
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("run.trackers: tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or set run.trackers=[])") from None


def build_sinks(names, run_dir: str, storage_cfg: StorageConfig | None) -> list:
    return [TensorBoardSink(run_dir, storage_cfg) for name in names if name == "tensorboard"]
