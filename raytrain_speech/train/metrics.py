"""The run's records: the per-report metrics (window sums -> one metrics line), ``metrics.jsonl``, the
run card, the audit log of trained indices, the live progress line and the end-of-run summary (no Ray).

``metrics.jsonl`` in the run directory gets one JSON object per report, written by one process (the
Train controller under Ray, the training process under the local backend) through ``RunRecord``; the
driver's progress display and the summary only read it, so they work the same for a local run, a
run in s3://, or a job submitted to a remote cluster.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from raytrain_speech import storage
from raytrain_speech.batch import Batch
from raytrain_speech.config import Config, StorageConfig
from raytrain_speech.storage import StorageError

METRICS_FILE = "metrics.jsonl"
RUN_CARD_JSON = "run_card.json"
RUN_CARD_MD = "run_card.md"


@dataclass
class Window:
    """One rank's sums since the last report."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    padding: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    masked_fraction: float = 0.0
    masked_batches: int = 0
    extra_sums: dict = field(default_factory=dict)

    def add(self, result, group: list[Batch]) -> None:
        self.loss_sum += result.loss_sum
        self.tokens += result.tokens
        for k, v in result.extra_sums.items():
            self.extra_sums[k] = self.extra_sums.get(k, 0.0) + v
        self.padding += sum(b.padding_fraction for b in group) / len(group) if group else 0.0
        self.grad_norm += result.grad_norm
        self.steps += 1

    def summary(self, loss_sum: float, tokens: float, extra: dict[str, float]) -> dict:
        """The window's metrics, given its loss/unit/extra sums over all ranks (``<name>_sum`` keys)."""
        out = {}
        if self.steps:
            out.update(loss=loss_sum / max(tokens, 1.0), grad_norm=self.grad_norm / self.steps,
                       padding_fraction=self.padding / self.steps)
            out.update({k[: -len("_sum")]: v / max(tokens, 1.0) for k, v in extra.items()})
        if self.masked_batches:
            out["masked_fraction"] = self.masked_fraction / self.masked_batches
        return out


@dataclass
class AttemptClock:
    """Wall time of one attempt (worker-group start to finish): what training, reporting and
    checkpointing took, so throughput counts training only."""

    start: float = field(default_factory=time.time)
    last_wall: float = 0.0
    audio_s: float = 0.0
    checkpoint_blocked_s: float = 0.0
    report_blocked_s: float = 0.0

    def __post_init__(self):
        self.last_wall = self.last_wall or self.start

    def metrics(self, now: float) -> dict:
        return {"throughput_audio_s_per_s": self.audio_s / max(now - self.start, 1e-9),
                "attempt_elapsed_s": now - self.start, "checkpoint_blocked_s": self.checkpoint_blocked_s,
                "report_blocked_s": self.report_blocked_s}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def run_dir(cfg: Config) -> str:
    """Where a run's checkpoints and records live: ``<run.storage_path>/<run.name>``."""
    return storage.join(cfg.run.storage_path, cfg.run.name)


def run_info(cfg: Config) -> dict:
    """What the run card says that the metrics do not."""
    return {"name": cfg.run.name, "family": cfg.model.family, "preset": cfg.model.preset,
            "use_gpu": cfg.run.use_gpu, "num_workers": cfg.run.num_workers, "backend": cfg.run.backend,
            "global_batch_audio_s": cfg.train.global_batch_audio_s,
            "global_batch_utterances": cfg.train.global_batch_utterances}


class RunRecord:
    """Appends rank 0's metrics of every report to ``metrics.jsonl`` and rewrites the run card at every
    checkpoint (object stores cannot append: the small file is rewritten whole).

    The history of earlier attempts is read once, strictly: if storage cannot answer, the new records
    are held in memory and the read is tried again at the next report, so an outage never rewrites
    the file from an empty read (which would erase every earlier attempt's records). A failed write
    is healed by the next one, which writes the whole history again."""

    def __init__(self, directory: str, storage_cfg: StorageConfig | None, info: dict, log=None,
                 trackers: tuple[str, ...] = ()):
        # The Ray Train callback holding this is pickled to the controller: keep ``print`` out of it.
        self.directory, self.storage_cfg, self.info, self.log = directory, storage_cfg, info, log
        self.trackers = tuple(trackers)
        self.sinks: list | None = None  # built at the first record (not picklable)
        self.records: list[dict] | None = None
        self.pending: list[dict] = []
        self._warned = self._card_due = self._tracker_warned = False

    def add(self, metrics: dict, checkpoint_path: str | None = None) -> None:
        record = {**metrics, "time": time.time()}
        if checkpoint_path is not None:
            record["checkpoint_path"] = checkpoint_path
        self.pending.append(record)
        self._card_due |= checkpoint_path is not None
        uri = storage.join(self.directory, METRICS_FILE)
        try:
            if self.records is None:
                self.records = read_metrics(uri, self.storage_cfg, strict=True)
            for r in self.pending:
                self._track(r)
                self.records.append(r)
            self.pending = []
            storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in self.records).encode(), self.storage_cfg)
            if self._card_due:  # also for a checkpoint reported during an outage
                write_run_card(self.directory, self.records, self.info, self.storage_cfg, self.log)
                self._card_due = False
            self._warned = False
        except StorageError as err:
            if not self._warned:
                (self.log or print)(f"[raytrain-speech] run record not written ({err}); training goes on and the "
                         "records are written when storage answers")
                self._warned = True


    def _track(self, record: dict) -> None:
        """The record to every tracker (train/trackers.py); a failing tracker costs one line, once."""
        from raytrain_speech.train.trackers import build_sinks

        try:
            if self.sinks is None:
                self.sinks = build_sinks(self.trackers, self.directory, self.storage_cfg)
            for sink in self.sinks:
                sink.log(record, self.records)
        except Exception as err:
            if not self._tracker_warned:
                (self.log or print)(f"[raytrain-speech] tracker not written ({type(err).__name__}: {err}); "
                                    "metrics.jsonl is")
                self._tracker_warned = True

    def __getstate__(self) -> dict:
        return {**self.__dict__, "sinks": None}


def write_run_card(directory: str, records: list[dict], info: dict, storage_cfg: StorageConfig | None,
                   log=None) -> dict:
    """run_card.json/.md and the curves (train/curves.py). A plot that cannot be drawn costs one line,
    never the run; storage errors are the caller's (RunRecord retries them)."""
    from raytrain_speech.train.curves import CURVES_PNG, write_curves

    card = run_card(records, info)
    storage.write_bytes(storage.join(directory, RUN_CARD_JSON), json.dumps(card, indent=2).encode(), storage_cfg)
    storage.write_bytes(storage.join(directory, RUN_CARD_MD), run_card_markdown(card).encode(), storage_cfg)
    try:
        write_curves(directory, records, storage_cfg, title=f"{info.get('name')}: {info.get('family')}/{info.get('preset')}")
    except StorageError:
        raise
    except Exception as err:  # matplotlib missing or failing: the records are what matter
        (log or print)(f"[raytrain-speech] {CURVES_PNG} not drawn ({type(err).__name__}: {err}); "
                       "metrics.jsonl and the run card are written")
    return card


class TrainedLog:
    """Audit/test hook (``train.trained_log_dir``): each rank appends the utterance indices of every
    step to a JSONL file of its own, so a test can prove exactly-once across restarts."""

    def __init__(self, directory: str, attempt: dict):
        os.makedirs(directory, exist_ok=True)
        name = f"{time.time_ns()}-rank{attempt['rank']}-pid{os.getpid()}.jsonl"
        self.file = open(os.path.join(directory, name), "a")  # noqa: SIM115 (closed by close())
        self.write({**attempt, "attempt_start": time.time(), "pid": os.getpid()})

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(uri: str, storage_cfg: StorageConfig | None = None, strict: bool = False) -> list[dict]:
    """The records of a metrics.jsonl ([] when there is none). ``strict``: a storage error is raised
    instead of read as "no records" (for writers, which would otherwise rewrite the history empty)."""
    try:
        if not storage.exists(uri, storage_cfg):
            return []
        text = storage.read_bytes(uri, storage_cfg).decode()
    except StorageError:
        if strict:
            raise
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
                 poll_s: float = 2.0, min_interval_s: float = 10.0, out=print, enabled: bool = True):
        self.uri, self.max_steps, self.storage_cfg, self.enabled = uri, max_steps, storage_cfg, enabled
        self.poll_s, self.min_interval_s, self.out = poll_s, min_interval_s, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rts-progress")
        self._seen = 0
        self._last_print = 0.0

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        self._seen = len(read_metrics(self.uri, self.storage_cfg))  # lines of an earlier attempt
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
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
    attempts: dict = {}
    for m in lines:
        # One entry per worker-group start: keyed by the attempt's id (lines before ids existed fall
        # back to the checkpointed attempt count, which two attempts share when the first one ended
        # before its first checkpoint).
        key = m.get("attempt_id") or m.get("attempt", 1)
        a = attempts.setdefault(key, {"first_step": m["step"], "start_time": m.get("time"),
                                      "start_step": m.get("attempt_start_step")})
        a["last_step"] = m["step"]
        a["end_time"] = m.get("time")
        for k in ("world_size", "grad_accum", "micro_batch_audio_s", "device", "attempt_data_wait_s"):
            if k in m:
                a[k] = m[k]
    last = lines[-1] if lines else {}
    history = list(attempts.values())  # in the order the attempts first reported
    for number, (a, nxt) in enumerate(zip(history, history[1:] + [None]), start=1):
        a["attempt"] = number
        start = a["start_step"]
        a["steps_run"] = a["last_step"] - start if start is not None else None
        # Steps after the checkpoint the next attempt resumed from were run and then rolled back.
        resumed = nxt["start_step"] if nxt is not None else None
        a["steps_rolled_back"] = max(0, a["last_step"] - resumed) if resumed is not None else 0
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
                                                  "first_step", "last_step", "start_step", "steps_run",
                                                  "steps_rolled_back", "start_time", "end_time")}
                           | {"data_wait_s": a.get("attempt_data_wait_s")} for a in history],
        "restarts_survived": max(0, len(history) - 1),
        "train_wall_s": train_wall_s,
        "data_wait_s": sum(a.get("attempt_data_wait_s") or 0.0 for a in history),
        "gpu_hours" if run.get("use_gpu") else "cpu_worker_hours": round(worker_hours, 4),
        "audio_hours_seen": audio_h,
        "throughput_audio_s_per_s": audio_h * 3600 / train_wall_s if train_wall_s else None,
        # The last value reported of each (the closing checkpoint of a max_epochs run reports no loss).
        "final": {k: next((m[k] for m in reversed(lines) if m.get(k) is not None), None)
                  for k in ("step", "epoch", "loss", "lr", "padding_fraction", "bad_utterances",
                            "filtered_utterances", "skipped_steps")},
        **({"sources": sources_of(last)} if any(k.startswith("source.") for k in last) else {}),
    }


def sources_of(metrics: dict) -> dict[str, dict]:
    """A mixture's per-source figures of a metrics line (``source.<name>.<figure>`` keys), by source."""
    out: dict[str, dict] = {}
    for key, value in metrics.items():
        if key.startswith("source."):
            name, figure = key[len("source."):].rsplit(".", 1)
            out.setdefault(name, {})[figure] = value
    return out


def readable(value):
    """A float to 4 significant digits for the Markdown card (run_card.json keeps every digit)."""
    return f"{value:.4g}" if isinstance(value, float) else value


def run_card_markdown(card: dict) -> str:
    rows = [("run", card.get("name")), ("model", f"{card.get('family')} / {card.get('preset')}"),
            ("parameters", f"{(card.get('parameters') or 0) / 1e6:.2f} M"), ("hardware", card.get("hardware")),
            ("global batch", f"{card['global_batch_utterances']} utterances per step"
             if card.get("global_batch_utterances") else f"{card.get('global_batch_audio_s')} padded audio-s per step"),
            ("restarts survived", card.get("restarts_survived")),
            ("training time", format_duration(card.get("train_wall_s") or 0)),
            ("waiting for data", format_duration(card.get("data_wait_s") or 0)),
            ("GPU-hours" if "gpu_hours" in card else "CPU worker-hours",
             readable(card.get("gpu_hours", card.get("cpu_worker_hours")))),
            ("audio hours seen", f"{card.get('audio_hours_seen', 0):.2f}"),
            ("throughput", f"{card.get('throughput_audio_s_per_s') or 0:.0f} audio-s/s")]
    rows += [(f"final {k}", readable(v)) for k, v in card["final"].items()]
    out = [f"# Run card: {card.get('name')}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Workers per attempt", "",
            "| attempt | workers | grad accumulation | micro-batch audio-s | steps reported | steps run | rolled back |",
            "|---|---|---|---|---|---|---|"]
    for a in card["worker_history"]:
        micro = a.get("micro_batch_audio_s")
        out.append(f"| {a['attempt']} | {a.get('world_size')} | {a.get('grad_accum')} | "
                   f"{micro if micro is None else round(micro, 1)} | {a['first_step']}-{a['last_step']} | "
                   f"{a.get('steps_run')} | {a.get('steps_rolled_back')} |")
    if card.get("sources"):
        out += ["", "## Sources", "", "| source | audio hours | share of audio | passes over it | utterances | bad |",
                "|---|---|---|---|---|---|"]
        for name, f in card["sources"].items():
            out.append(f"| {name} | {readable(f.get('audio_hours_seen'))} | {readable(f.get('share'))} | "
                       f"{readable(f.get('passes'))} | {f.get('utterances_seen')} | {f.get('bad_utterances')} |")
    return "\n".join(out) + "\n"
