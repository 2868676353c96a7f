"""Every private (or alpha) Ray API we touch, each with the Ray version it was checked on.

Ray gives no public way to do these things, and each matters (a wrong guess would lose or repeat
data, or hide a sweep's trials), so each touch lives here, says why, and fails with one line naming
the Ray version instead of misbehaving when a Ray upgrade moves it. When upgrading Ray, re-check
every function below against the new source and update ``CHECKED_ON``.
"""

from __future__ import annotations

import json
import logging

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig

CHECKED_ON = "2.60.0"
"""The Ray version every function here was read against (pyproject pins it)."""

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Train's record of its committed checkpoints, in the run directory (Ray 2.60 layout)."""


class RayCompatError(RuntimeError):
    """A private Ray API we rely on is not where Ray 2.60 had it; the message names it and the versions."""


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return "not installed"


def _moved(what: str, err: BaseException | None = None) -> RayCompatError:
    detail = f" ({type(err).__name__}: {err})" if err is not None else ""
    return RayCompatError(f"{what} is not where Ray {CHECKED_ON} had it; this is Ray {_installed_version()}{detail}. "
                          f"Install ray=={CHECKED_ON} (the version pinned by this package) or update "
                          "raytrain_speech/ray_compat.py for this Ray")


def quiet_train_report_logger() -> None:
    """Ray 2.60 logs every ``ray.train.report`` at INFO through a logger named by a file path
    (``getLogger(__file__)`` in ``ray/train/v2/_internal/execution/context.py``), out of reach of
    ``LoggingConfig``; at one report per few seconds that drowns the progress display. Cosmetic: a
    moved module only leaves the lines on."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def latest_snapshot_checkpoint(run_dir: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """The directory name of the checkpoint Ray Train will restore next, from its checkpoint-manager
    snapshot in the run directory (None: no snapshot, or nothing committed yet).

    Read outside Ray (on the Train controller by the dataset factory, and by the local backend) so
    that every backend resumes from the same checkpoint and the pipeline can drop consumed
    utterances before decoding. The snapshot is Ray's own file; if it changes shape we fail loudly
    rather than guess, since a wrong guess would lose or repeat data.
    """
    uri = storage.join(run_dir, RAY_SNAPSHOT)
    if not storage.exists(uri, storage_cfg):
        return None
    snap = json.loads(storage.read_bytes(uri, storage_cfg))
    if "latest_checkpoint_result" not in snap:
        raise _moved(f"{uri}: key 'latest_checkpoint_result' (keys: {sorted(snap)})")
    latest = snap["latest_checkpoint_result"]
    if latest is None:
        return None
    try:
        return latest["checkpoint_dir_name"]
    except (KeyError, TypeError) as err:
        raise _moved(f"{uri}: latest_checkpoint_result.checkpoint_dir_name", err) from None


def preemption_info():
    """``ray.train.get_preemption_info()`` (alpha in 2.60): the drain notice for a node of this run, or
    None. Missing in another Ray = no notice (the run still recovers, from its last checkpoint)."""
    import ray.train

    get_info = getattr(ray.train, "get_preemption_info", None)
    return None if get_info is None else get_info()


def unequal_split_data_config():
    """A ``ray.train.DataConfig`` that splits with ``equal=False``.

    Train's DataConfig splits with ``equal=True``, which drops up to world_size-1 rows per epoch;
    exactly-once needs every row, and the Trainer's lockstep (filler micro-steps on ranks that run dry
    first) absorbs the uneven row counts. ``configure`` is a DeveloperAPI, but the execution options
    it must apply come from the private ``_resolve_execution_options`` (and ``_enable_shard_locality``).
    """
    from ray.train import DataConfig

    if not hasattr(DataConfig, "_resolve_execution_options"):
        raise _moved("ray.train.DataConfig._resolve_execution_options")

    class UnequalSplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                hints = worker_node_ids if getattr(self, "_enable_shard_locality", False) else None
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            return output

    return UnequalSplitDataConfig()


def asha_rungs(scheduler) -> list[list[dict]]:
    """The recorded results of every rung of every bracket of an ``AsyncHyperBandScheduler``
    (``_brackets[i]._rungs[j] = (milestone, {trial_id: reward})``), as the live dicts: Tune saves no
    scheduler state, so a resumed sweep reloads them from our record."""
    try:
        return [[recorded for _, recorded in bracket._rungs] for bracket in scheduler._brackets]
    except (AttributeError, TypeError, ValueError) as err:
        raise _moved("AsyncHyperBandScheduler._brackets[]._rungs", err) from None


def result_grid_trials(grid) -> list:
    """Every trial of a ``ResultGrid`` (status and config), run or not; 2.60 has no public accessor."""
    try:
        return list(grid._experiment_analysis.trials)
    except AttributeError as err:
        raise _moved("ResultGrid._experiment_analysis.trials", err) from None


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may bring up ({"CPU": ..., "GPU": ...}), or
    None when the cluster has no autoscaler config (fixed nodes, a local Ray).

    Why private: Ray has no public query of an autoscaled cluster's capacity; Ray Data asks the same
    way (``ray.data._internal.cluster_autoscaler.util``), through ``ray._private.state`` (2.60)."""
    try:
        import ray._private.state as ray_state

        limits = ray_state.state.get_max_resources_from_cluster_config()
    except (ImportError, AttributeError) as err:
        raise _moved("ray._private.state.state.get_max_resources_from_cluster_config", err) from None
    return None if limits is None else {k: float(v) for k, v in limits.items()}
