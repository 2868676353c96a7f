"""Config -> a running ``TorchTrainer``: Ray connection, scaling, storage, failures, callbacks.

Re-running with the same ``run.name`` and ``run.storage_path`` resumes: Ray Train 2.60 finds the
run's ``checkpoint_manager_snapshot.json`` and ``ray.train.get_checkpoint()`` returns the latest
committed checkpoint inside the workers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raytrain_speech import storage
from raytrain_speech.data.badinput import BAD_INPUTS_FILE, read_bad_inputs, summary_line
from raytrain_speech.data.pipeline import UnequalSplitDataConfig, build_dataset
from raytrain_speech.train.checkpoint import latest_committed_cursor
from raytrain_speech.train.metrics import (
    METRICS_FILE,
    ProgressDisplay,
    read_metrics,
    run_card,
    run_card_markdown,
)

if TYPE_CHECKING:
    from raytrain_speech.config import Config


def run_dir(cfg: Config) -> str:
    return storage.join(cfg.run.storage_path, cfg.run.name)


DEFAULT_DASHBOARD_PORT = 8265


def dashboard_port() -> int:
    """Ray's usual dashboard port, or a free one when another local Ray on this machine holds it.

    A second local cluster would otherwise start without a dashboard, and Train's placement-group
    cleaner and preemption checks, which read it, fail in the background.
    """
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DEFAULT_DASHBOARD_PORT))
            return DEFAULT_DASHBOARD_PORT
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(cfg: Config) -> None:
    """Join the configured/ambient cluster, or start a right-sized local one."""
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **quiet)
        return
    workers = cfg.run.worker_range[1]
    num_cpus = cfg.run.local_num_cpus or (os.cpu_count() or 1) + int(workers * cfg.run.cpus_per_worker)
    # The dashboard stays on: Train's placement-group cleaner and `ray job` use its state API.
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=cfg.run.object_store_memory_mb * 2**20,
             include_dashboard=True, dashboard_port=dashboard_port(),
             runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}}, **quiet)


class RunRecordCallback(ray.train.UserCallback):
    """Runs on the Train controller: appends rank 0's metrics of every report to metrics.jsonl and
    rewrites the run card at every checkpoint."""

    def __init__(self, directory: str, storage_cfg, run_info: dict):
        self.directory, self.storage_cfg, self.run_info = directory, storage_cfg, run_info
        self.records: list[dict] | None = None

    def after_report(self, run_context, metrics, checkpoint):
        if self.records is None:
            self.records = read_metrics(storage.join(self.directory, METRICS_FILE), self.storage_cfg)
        record = {**(metrics[0] if metrics else {}), "time": time.time()}
        if checkpoint is not None:
            record["checkpoint_path"] = checkpoint.path
        self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        storage.write_bytes(storage.join(self.directory, METRICS_FILE), text.encode(), self.storage_cfg)
        if checkpoint is not None:
            write_run_card(self.directory, self.records, self.run_info, self.storage_cfg)


def write_run_card(directory: str, records: list[dict], run_info: dict, storage_cfg) -> dict:
    card = run_card(records, run_info)
    storage.write_bytes(storage.join(directory, "run_card.json"), json.dumps(card, indent=2).encode(), storage_cfg)
    storage.write_bytes(storage.join(directory, "run_card.md"), run_card_markdown(card).encode(), storage_cfg)
    return card


def run_info(cfg: Config) -> dict:
    return {"name": cfg.run.name, "family": cfg.model.family, "preset": cfg.model.preset,
            "use_gpu": cfg.run.use_gpu, "num_workers": cfg.run.num_workers,
            "global_batch_audio_s": cfg.train.global_batch_audio_s,
            "global_batch_utterances": cfg.train.global_batch_utterances}


def storage_args(uri: str, storage_cfg) -> dict:
    """``storage_path`` (+ ``storage_filesystem`` for object storage) for Train's or Tune's RunConfig;
    with an explicit filesystem the path carries no scheme."""
    if storage.is_remote(uri):
        fs, path = storage.resolve(uri, storage_cfg)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": storage.resolve(uri)[1]}


def checkpoint_uri(cfg: Config, path: str) -> str:
    """A checkpoint's path inside the storage filesystem -> a URI our readers accept."""
    if storage.is_remote(cfg.run.storage_path):
        return f"{cfg.run.storage_path.split('://', 1)[0]}://{path}"
    return path


def build_trainer(cfg: Config, callbacks: list | None = None) -> TorchTrainer:
    from raytrain_speech.config import dump_yaml
    from raytrain_speech.train.loop import train_loop_per_worker

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    directory = run_dir(cfg)
    storage.write_bytes(storage.join(directory, "config.yaml"), dump_yaml(cfg).encode(), cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers if isinstance(cfg.run.num_workers, int) else tuple(cfg.run.num_workers),
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {}),
                                  **cfg.run.worker_resources},
            elastic_resize_monitor_interval_s=cfg.run.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, **storage_args(cfg.run.storage_path, cfg.storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   max_preemption_failures=cfg.run.max_preemption_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute=cfg.run.checkpoint_score_attribute,
                checkpoint_score_order=cfg.run.checkpoint_score_order),
            callbacks=[RunRecordCallback(directory, cfg.storage, run_info(cfg)), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        # Callables: Train calls them at every worker-group start (first start, restart, resize).
        datasets={"train": functools.partial(build_dataset, cfg, cfg.data.train_split),
                  "train_resume": functools.partial(resume_dataset, cfg)},
        dataset_config=UnequalSplitDataConfig(),
    )


def resume_dataset(cfg: Config) -> ray.data.Dataset:
    """The rest of the interrupted epoch: the train split minus what the latest checkpoint consumed.

    Runs on the Train controller, where Ray's checkpoint manager has just picked the checkpoint the
    workers will restore; the cursor is read from that same checkpoint directory.
    """
    cursor = latest_committed_cursor(run_dir(cfg), cfg.storage)
    return build_dataset(cfg, cfg.data.train_split, None if cursor is None else cursor.consumed)


@dataclass
class FitOutcome:
    run_dir: str
    checkpoint_uri: str | None
    metrics: dict
    wall_s: float
    run_card: dict
    bad_input_summary: str = "bad input: none"
    """One line: skipped utterances per reason and where they are listed."""


class TrainingFailed(RuntimeError):
    """Training stopped with an error after its failure budget; the message is the worker's error."""


def fit(cfg: Config, progress: bool = True, out=print, callbacks: list | None = None) -> FitOutcome:
    """Train to ``train.max_steps`` (resuming if the run exists) and return the final checkpoint.

    ``callbacks``: extra Train callbacks (a sweep trial adds Tune's report callback)."""
    init_ray(cfg)
    trainer = build_trainer(cfg, callbacks)
    start = time.time()
    metrics_uri = storage.join(run_dir(cfg), METRICS_FILE)
    if progress:
        with ProgressDisplay(metrics_uri, cfg.train.max_steps, cfg.storage, out=out):
            result = _fit(trainer)
    else:
        result = _fit(trainer)
    ckpt = checkpoint_uri(cfg, result.checkpoint.path) if result.checkpoint else None
    records = read_metrics(metrics_uri, cfg.storage)
    card = write_run_card(run_dir(cfg), records, run_info(cfg), cfg.storage) if records else {}
    bad_uri = storage.join(run_dir(cfg), BAD_INPUTS_FILE)
    bad_line = summary_line(read_bad_inputs(bad_uri, cfg.storage), bad_uri)
    metrics = dict(result.metrics or {})
    if str(metrics.get("stop_reason", "")).startswith("too much bad input"):
        raise TrainingFailed(f"{metrics['stop_reason']} [{bad_line}]")
    return FitOutcome(run_dir(cfg), ckpt, metrics, time.time() - start, card, bad_line)


def _fit(trainer: TorchTrainer):
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingFailed(_first_line(err)) from err
    if result.error is not None:
        raise TrainingFailed(_first_line(result.error))
    return result


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    meaningful = [t for t in text if t.strip() and not t.startswith(("Traceback", "  "))]
    return meaningful[-1] if meaningful else type(err).__name__
