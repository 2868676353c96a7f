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


SCHEDULER_PASS_MIN_S = 0.05
"""Shortest pass of Ray Data's scheduling loop (calm_data_scheduler): at most 20 passes a second."""


def calm_data_scheduler() -> None:
    """Ray 2.60 Data's scheduling loop (``StreamingExecutor.run``) blocks in ``ray.wait`` (up to 0.1 s)
    only while a task is in flight and none has output ready. A training chain spends most of an
    epoch otherwise: the preprocessed blocks queued ahead and the operators backpressured until the
    trainers take more, so either nothing is in flight (the wait is skipped) or a task's next output
    is ready but may not be pulled (the wait returns at once), and the loop spins. Ray Train's
    SplitCoordinator actor, which runs the loop, then used 55-93% of a core on the 2-core demo box
    (docs/LOG.md, the AVX2 demo); with this, ~10%. Measured on the demo recipe, the CPU came mostly out
    of time the trainers did not use: the pipeline fill (first 50 steps) got 22 s faster, the steady
    state no faster; on a box with more work than cores it is a core handed back. This makes a pass
    that took less than ``SCHEDULER_PASS_MIN_S`` sleep the rest: one pass handles every finished task
    and dispatches every task it may, so 20 passes a second cost nothing but up to 50 ms before a
    task is dispatched. Applied in every worker process of a local Ray (``worker_process_setup_hook``,
    ray_session.py) and in the driver. Performance only: a moved method leaves the loop as it was."""
    import time

    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return
    original = getattr(StreamingExecutor, "_scheduling_loop_step", None)
    if original is None or getattr(original, "calmed", False):
        return

    def _scheduling_loop_step(self, topology):
        start = time.perf_counter()
        more = original(self, topology)
        rest = SCHEDULER_PASS_MIN_S - (time.perf_counter() - start)
        if more and rest > 0:
            time.sleep(rest)
        return more

    _scheduling_loop_step.calmed = True
    StreamingExecutor._scheduling_loop_step = _scheduling_loop_step


def quiet_ray_data_notices() -> None:
    """Two lines Ray 2.60 prints in every run that a user can do nothing about: Ray Data's warning that
    its progress bars are off (we turn them off: QUIET_ENV) and the RayDeprecationWarning Ray Train's
    own DatasetManager triggers by setting ``ExecutionOptions.exclude_resources``. Only these two
    messages are dropped; every other warning and log line of Ray's is as it was."""
    import warnings

    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")


OUR_LINE_PREFIX = "[raytrain-speech]"
"""Lines our workers print for the user (the start line, a bad-input stop): shown without Ray's
``(RayTrainWorker pid=...)`` prefix, as the local backend shows them."""

DRIVER_NOISE = (
    # core_worker.cc, from Train's controller: Train itself creates its PreemptionWatcher this way.
    "has constructor arguments in the object store and max_restarts > 0",
    # raylet: a 2-core machine running Train + Data + Tune starts more worker processes than cores.
    "PYTHON worker processes have been started on node",
    # gcs_server at shutdown, killing actors whose processes are already gone.
    "Failed to kill actor",
    # Train's placement-group cleaner, at the end of every run.
    "Detected that the Ray Train controller actor",
)
"""Ray log lines forwarded to the driver's console that say nothing a user can act on (issue 19's
list, seen in every demo run on Ray 2.60). Dropped from the console only: each is still in the
session's log files (``/tmp/ray/session_latest/logs``), and ``--verbose`` shows them."""


def filter_driver_logs() -> None:
    """Ray 2.60 echoes every worker's and daemon's output on the driver through
    ``ray._private.worker.print_worker_logs`` (looked up by name at each call). Wrapped here: lines
    containing one of DRIVER_NOISE are dropped, ours are printed without Ray's prefix, every other
    line is printed as Ray would. Cosmetic: a moved function leaves the console as it was."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_worker_logs", None)
    if original is None or getattr(original, "filtered", False):
        return

    def print_worker_logs(data, print_file, ignore_prefix: bool = False):
        run: list[str] = []
        run_ours = False
        for line in list(data.get("lines", [])) + [None]:  # None flushes the last run
            if line is not None and any(noise in line for noise in DRIVER_NOISE):
                continue
            ours = line is not None and line.startswith(OUR_LINE_PREFIX)
            if run and (line is None or ours != run_ours):
                original({**data, "lines": run}, print_file, ignore_prefix or run_ours)
                run = []
            if line is not None:
                run.append(line)
                run_ours = ours

    print_worker_logs.filtered = True
    ray_worker.print_worker_logs = print_worker_logs


class _NotTheTokenAuthEnabledNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def quiet_token_auth_notice() -> None:
    """Ray 2.60 turns token authentication on for every new local cluster (RAY_AUTH_MODE unset) and
    warns, each time, that it did. Only that notice is filtered; Ray's warning that a cluster runs
    *without* authentication is a security warning and stays. A moved logger leaves the line on."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _NotTheTokenAuthEnabledNotice) for f in log.filters):  # once per process
        log.addFilter(_NotTheTokenAuthEnabledNotice())


def worker_setup() -> None:
    """``worker_process_setup_hook`` of a local Ray: what every Ray worker process of ours does first."""
    calm_data_scheduler()
    quiet_ray_data_notices()


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
