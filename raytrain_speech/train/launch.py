"""Config -> a running ``TorchTrainer`` (the Ray backend of ``fit``): scaling, storage, failures,
callbacks, and the datasets Train splits over the workers at every worker-group start.

Re-running with the same ``run.name`` and ``run.storage_path`` resumes: Ray Train 2.60 finds the
run's checkpoint-manager snapshot, and the workers restore the newest committed checkpoint of the run
(train/checkpoint.py: Train's, or the local backend's if newer).
"""

from __future__ import annotations

import functools
import os

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raytrain_speech import ray_compat, ray_session, storage
from raytrain_speech.config import Config, ConfigError
from raytrain_speech.data.pipeline import build_dataset
from raytrain_speech.train.checkpoint import latest_committed_cursor
from raytrain_speech.train.metrics import RunRecord, run_dir, run_info
from raytrain_speech.train.preflight import cpu_room_problem, data_nodes_problem
from raytrain_speech.train.worker import RESUME_DATASET, TRAIN_DATASET, train_loop_per_worker


def connect(cfg: Config, extra_cpus: int = 0) -> None:
    """Join the configured/ambient cluster, or start a local one sized so that data tasks still run
    beside the training workers (cores + the workers' CPUs + ``extra_cpus``)."""
    workers = cfg.run.worker_range[1]
    num_cpus = cfg.run.local_num_cpus or (os.cpu_count() or 1) + int(workers * cfg.run.cpus_per_worker) + extra_cpus
    # The dashboard stays on: Train's placement-group cleaner and `ray job` use its state API.
    ray_session.connect(cfg.run.ray_address, num_cpus=num_cpus, object_store_mb=cfg.run.object_store_memory_mb)


class RunRecordCallback(ray.train.UserCallback):
    """Runs on the Train controller: rank 0's metrics of every report into metrics.jsonl, and the run
    card at every checkpoint (train/metrics.py RunRecord, as the local backend writes them)."""

    def __init__(self, directory: str, storage_cfg, info: dict, trackers: tuple[str, ...] = ()):
        self.record = RunRecord(directory, storage_cfg, info, trackers=trackers)

    def after_report(self, run_context, metrics, checkpoint):
        self.record.add(metrics[0] if metrics else {}, checkpoint.path if checkpoint is not None else None)


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
    run = cfg.run
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers if isinstance(run.num_workers, int) else tuple(run.num_workers),
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {}),
                                  **run.worker_resources},
            elastic_resize_monitor_interval_s=run.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=run.name, **storage_args(run.storage_path, cfg.storage),
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures,
                                                   max_preemption_failures=run.max_preemption_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.checkpoints_to_keep, checkpoint_score_attribute=run.checkpoint_score_attribute,
                checkpoint_score_order=run.checkpoint_score_order),
            callbacks=[RunRecordCallback(run_dir(cfg), cfg.storage, run_info(cfg), cfg.run.trackers),
                       *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        # Callables: Train calls them at every worker-group start (first start, restart, resize).
        datasets={TRAIN_DATASET: functools.partial(build_dataset, cfg, cfg.data.train_split),
                  RESUME_DATASET: functools.partial(resume_dataset, cfg)},
        dataset_config=ray_compat.unequal_split_data_config(),
    )


def resume_dataset(cfg: Config) -> ray.data.Dataset:
    """The rest of the interrupted epoch: the train split minus what the latest checkpoint consumed.

    Runs on the Train controller, where Ray's checkpoint manager has just picked the checkpoint the
    workers will restore; the cursor is read from that same checkpoint directory.
    """
    cursor = latest_committed_cursor(run_dir(cfg), cfg.storage)
    return build_dataset(cfg, cfg.data.train_split, None if cursor is None else cursor.consumed)


def check_cpu_room(cfg: Config) -> None:
    """``preflight.cpu_room_problem`` (or ``data_nodes_problem`` with data.node_labels) against the
    joined cluster (after connecting): ConfigError if the data pipeline would have no CPU to run on."""
    limits = ray_compat.autoscaler_max_resources()
    # With data nodes (data.node_labels) the chain's CPUs are theirs, not what the trainers leave.
    problem = (data_nodes_problem(ray.nodes(), limits, cfg) if cfg.data.node_labels
               else cpu_room_problem(ray.cluster_resources(), limits, cfg))
    if problem:
        raise ConfigError(problem)


def fit_ray(cfg: Config, callbacks: list | None = None) -> tuple[str | None, dict, str]:
    """Run the TorchTrainer to the end: (final checkpoint URI, rank 0's last metrics, '' or the error
    that ended the run after its failure budget, in one line)."""
    connect(cfg)
    check_cpu_room(cfg)
    trainer = build_trainer(cfg, callbacks)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        return None, {}, first_line(err)
    if result.error is not None:
        return None, {}, first_line(result.error)
    ckpt = checkpoint_uri(cfg, result.checkpoint.path) if result.checkpoint else None
    return ckpt, dict(result.metrics or {}), ""


def first_line(err: BaseException) -> str:
    """The meaningful last line of a worker's error (it arrives as the worker's whole traceback)."""
    text = str(err).strip().splitlines()
    meaningful = [t for t in text if t.strip() and not t.startswith(("Traceback", "  "))]
    return meaningful[-1] if meaningful else type(err).__name__
