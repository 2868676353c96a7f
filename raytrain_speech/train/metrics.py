"""The run's metrics file, the live progress line, and the end-of-run summary (no Ray).

``metrics.jsonl`` in the run directory gets one JSON object per ``ray.train.report`` (written by the
Train controller); the driver's progress display and the summary only read it, so they work the
same for a local run, a run in s3://, or a job submitted to a remote cluster.
"""

from __future__ import annotations

import json
import threading
import time

from raytrain_speech import storage
from raytrain_speech.storage import StorageConfig, StorageError

METRICS_FILE = "metrics.jsonl"


def read_metrics(uri: str, storage_cfg: StorageConfig | None = None) -> list[dict]:
    try:
        if not storage.exists(uri, storage_cfg):
            return []
        text = storage.read_bytes(uri, storage_cfg).decode()
    except StorageError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def eta_s(history: list[dict], max_steps: int) -> float | None:
    """Seconds to ``max_steps`` at the step rate of the recent reports (start-up excluded)."""
    recent = [m for m in history if "train_wall_s" in m and m.get("attempt") == history[-1].get("attempt")][-10:]
    if len(recent) < 2:
        return None
    steps = recent[-1]["step"] - recent[0]["step"]
    wall = recent[-1]["train_wall_s"] - recent[0]["train_wall_s"]
    if steps <= 0 or wall <= 0:
        return None
    return (max_steps - recent[-1]["step"]) * wall / steps


def progress_line(m: dict, max_steps: int, eta: float | None = None) -> str:
    step = m.get("step", 0)
    rate = m.get("throughput_audio_s_per_s")
    parts = [f"step {step}/{max_steps}", f"epoch {m.get('epoch', 0)}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.3f}")
    if rate:
        parts.append(f"{rate:.0f} audio-s/s")
    parts.append(f"{m.get('audio_hours_seen', 0):.2f} h audio seen")
    if "world_size" in m:
        parts.append(f"{m['world_size']} workers")
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    if m.get("checkpoint"):
        parts.append("checkpoint saved")
    return " | ".join(parts)


class ProgressDisplay:
    """Polls the metrics file from a background thread and prints a line per new report."""

    def __init__(self, uri: str, max_steps: int, storage_cfg: StorageConfig | None = None,
                 poll_s: float = 2.0, min_interval_s: float = 10.0, out=print):
        self.uri, self.max_steps, self.storage_cfg = uri, max_steps, storage_cfg
        self.poll_s, self.min_interval_s, self.out = poll_s, min_interval_s, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rts-progress")
        self._seen = 0
        self._last_print = 0.0

    def __enter__(self) -> ProgressDisplay:
        self._seen = len(read_metrics(self.uri, self.storage_cfg))  # lines of an earlier attempt
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._tick(final=True)

    def _tick(self, final: bool = False) -> None:
        lines = read_metrics(self.uri, self.storage_cfg)
        if len(lines) <= self._seen:
            return
        self._seen = len(lines)
        now = time.time()
        latest = lines[-1]
        if final or latest.get("checkpoint") or now - self._last_print >= self.min_interval_s:
            self.out(f"[train] {progress_line(latest, self.max_steps, eta_s(lines, self.max_steps))}")
            self._last_print = now

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._tick()
            except Exception as err:  # the display must never take the run down
                self.out(f"[train] progress display: {err}")


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (max(len(v) for _, v in rows) + 2) + "+"
    body = [f"| {k.ljust(width)} | {v.ljust(len(line) - width - 7)} |" for k, v in rows]
    return "\n".join([line, *body, line])
