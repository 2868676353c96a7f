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
from raytrain_speech.config import StorageConfig
from raytrain_speech.storage import StorageError

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


def run_card(lines: list[dict], run: dict) -> dict:
    """The run's one-page record, derived from its metrics lines (so any process can rebuild it).

    ``run`` holds what the metrics do not: name, model family/preset, global batch, whether workers
    hold GPUs.
    """
    attempts: dict[int, dict] = {}
    for m in lines:
        a = attempts.setdefault(m.get("attempt", 1), {"attempt": m.get("attempt", 1), "first_step": m["step"],
                                                      "start_time": m.get("time"), "start_wall_s": None})
        a["last_step"] = m["step"]
        a["end_time"] = m.get("time")
        for key in ("world_size", "grad_accum", "micro_batch_audio_s", "device"):
            if key in m:
                a[key] = m[key]
    last = lines[-1] if lines else {}
    history = sorted(attempts.values(), key=lambda a: a["attempt"])
    worker_hours = 0.0
    for a in history:
        if a.get("start_time") and a.get("end_time"):
            worker_hours += (a["end_time"] - a["start_time"]) * a.get("world_size", 0) / 3600
    train_wall_s = last.get("train_wall_s", 0.0)
    audio_h = last.get("audio_hours_seen", 0.0)
    return {
        **run,
        "parameters": last.get("parameters"),
        "hardware": history[-1].get("device") if history else None,
        "accelerators_per_attempt": [a.get("world_size") if run.get("use_gpu") else 0 for a in history],
        "worker_history": [{k: a.get(k) for k in ("attempt", "world_size", "grad_accum", "micro_batch_audio_s",
                                                  "first_step", "last_step")} for a in history],
        "restarts_survived": max(0, len(history) - 1),
        "train_wall_s": train_wall_s,
        "gpu_hours" if run.get("use_gpu") else "cpu_worker_hours": round(worker_hours, 4),
        "audio_hours_seen": audio_h,
        "throughput_audio_s_per_s": audio_h * 3600 / train_wall_s if train_wall_s else None,
        "final": {k: last.get(k) for k in ("step", "epoch", "loss", "lr", "padding_fraction", "bad_utterances",
                                            "filtered_utterances", "skipped_steps")},
    }


def run_card_markdown(card: dict) -> str:
    rows = [("run", card.get("name")), ("model", f"{card.get('family')} / {card.get('preset')}"),
            ("parameters", f"{(card.get('parameters') or 0) / 1e6:.2f} M"), ("hardware", card.get("hardware")),
            ("global batch", f"{card['global_batch_utterances']} utterances per step"
             if card.get("global_batch_utterances") else f"{card.get('global_batch_audio_s')} padded audio-s per step"),
            ("restarts survived", card.get("restarts_survived")),
            ("training time", format_duration(card.get("train_wall_s") or 0)),
            ("GPU-hours" if "gpu_hours" in card else "CPU worker-hours",
             card.get("gpu_hours", card.get("cpu_worker_hours"))),
            ("audio hours seen", f"{card.get('audio_hours_seen', 0):.2f}"),
            ("throughput", f"{card.get('throughput_audio_s_per_s') or 0:.0f} audio-s/s")]
    rows += [(f"final {k}", v) for k, v in card["final"].items()]
    out = [f"# Run card: {card.get('name')}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Workers per attempt", "", "| attempt | workers | grad accumulation | micro-batch audio-s | steps |",
            "|---|---|---|---|---|"]
    for a in card["worker_history"]:
        micro = a.get("micro_batch_audio_s")
        out.append(f"| {a['attempt']} | {a.get('world_size')} | {a.get('grad_accum')} | "
                   f"{micro if micro is None else round(micro, 1)} | {a['first_step']}-{a['last_step']} |")
    return "\n".join(out) + "\n"
