"""Config -> a running ``TorchTrainer``: Ray connection, scaling, storage, failures, callbacks.

Re-running with the same ``run.name`` and ``run.storage_path`` resumes: Ray Train 2.60 finds the
run's ``checkpoint_manager_snapshot.json`` and ``ray.train.get_checkpoint()`` returns the latest
committed checkpoint inside the workers.
"""

from __future__ import annotations

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
from raytrain_speech.configlib import require
from raytrain_speech.data.pipeline import build_dataset
from raytrain_speech.train.metrics import METRICS_FILE, ProgressDisplay

if TYPE_CHECKING:
    from raytrain_speech.config import Config


@dataclass
class LaunchConfig:
    """The Ray side of a run: its name and storage, workers, fault budget, cluster connection."""

    name: str = "demo"
    """Run name; re-running with the same name and storage_path resumes from the last checkpoint."""
    storage_path: str = "runs"
    """Where run directories go: a local path or s3://bucket/prefix."""
    num_workers: int = 2
    """Training workers (one per GPU when use_gpu)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker."""
    max_failures: int = 3
    """Worker-group restarts allowed after failures (-1 = unlimited)."""
    checkpoints_to_keep: int = 2
    """Latest checkpoints kept in storage."""
    ray_address: str | None = None
    """Cluster to join (e.g. auto); None = $RAY_ADDRESS if set, else start a local Ray."""
    local_num_cpus: int | None = None
    """Logical CPUs of a local Ray; None = cores + training workers' CPUs, so data tasks still run."""
    object_store_memory_mb: int = 1536
    """Object store size of a local Ray (the default, 30% of RAM, is too much on a laptop)."""

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty name without '/'")
        require(self.num_workers >= 1, "run.num_workers", "must be >= 1")
        require(self.cpus_per_worker > 0, "run.cpus_per_worker", "must be positive")
        require(self.checkpoints_to_keep >= 1, "run.checkpoints_to_keep", "must be >= 1")


def run_dir(cfg: Config) -> str:
    return storage.join(cfg.run.storage_path, cfg.run.name)


def init_ray(cfg: Config) -> None:
    """Join the configured/ambient cluster, or start a right-sized local one."""
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **quiet)
        return
    num_cpus = cfg.run.local_num_cpus or (os.cpu_count() or 1) + int(cfg.run.num_workers * cfg.run.cpus_per_worker)
    # The dashboard stays on: Train's placement-group cleaner and `ray job` use its state API.
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=cfg.run.object_store_memory_mb * 2**20,
             include_dashboard=True, runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}}, **quiet)


class MetricsFileCallback(ray.train.UserCallback):
    """Runs on the Train controller: appends rank 0's metrics of every report to metrics.jsonl."""

    def __init__(self, uri: str, storage_cfg):
        self.uri, self.storage_cfg = uri, storage_cfg
        self.lines: list[str] | None = None

    def after_report(self, run_context, metrics, checkpoint):
        if self.lines is None:
            from raytrain_speech.train.metrics import read_metrics

            self.lines = [json.dumps(m) for m in read_metrics(self.uri, self.storage_cfg)]
        record = {**(metrics[0] if metrics else {}), "time": time.time()}
        if checkpoint is not None:
            record["checkpoint_path"] = checkpoint.path
        self.lines.append(json.dumps(record))
        storage.write_bytes(self.uri, ("\n".join(self.lines) + "\n").encode(), self.storage_cfg)


def _storage_args(cfg: Config) -> dict:
    if storage.is_remote(cfg.run.storage_path):
        fs, path = storage.resolve(cfg.run.storage_path, cfg.storage)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": storage.resolve(cfg.run.storage_path)[1]}


def checkpoint_uri(cfg: Config, path: str) -> str:
    """A checkpoint's path inside the storage filesystem -> a URI our readers accept."""
    if storage.is_remote(cfg.run.storage_path):
        return f"{cfg.run.storage_path.split('://', 1)[0]}://{path}"
    return path


def build_trainer(cfg: Config) -> TorchTrainer:
    from raytrain_speech.config import dump_yaml
    from raytrain_speech.train.loop import train_loop_per_worker

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    dataset = build_dataset(cfg, cfg.data.train_split)
    directory = run_dir(cfg)
    storage.write_bytes(storage.join(directory, "config.yaml"), dump_yaml(cfg).encode(), cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, **_storage_args(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=[MetricsFileCallback(storage.join(directory, METRICS_FILE), cfg.storage)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
    )


@dataclass
class FitOutcome:
    run_dir: str
    checkpoint_uri: str | None
    metrics: dict
    wall_s: float


class TrainingFailed(RuntimeError):
    """Training stopped with an error after its failure budget; the message is the worker's error."""


def fit(cfg: Config, progress: bool = True, out=print) -> FitOutcome:
    """Train to ``train.max_steps`` (resuming if the run exists) and return the final checkpoint."""
    init_ray(cfg)
    trainer = build_trainer(cfg)
    start = time.time()
    metrics_uri = storage.join(run_dir(cfg), METRICS_FILE)
    if progress:
        with ProgressDisplay(metrics_uri, cfg.train.max_steps, cfg.storage, out=out):
            result = _fit(trainer)
    else:
        result = _fit(trainer)
    ckpt = checkpoint_uri(cfg, result.checkpoint.path) if result.checkpoint else None
    return FitOutcome(run_dir(cfg), ckpt, dict(result.metrics or {}), time.time() - start)


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
