"""The one place that connects to Ray: join a cluster or start a right-sized local one, and keep Ray's
own console output to what a user can act on.

Every command that needs Ray (train, tune, prepare, eval on actors) calls ``connect``; the address
comes from the argument, then ``$RAY_ADDRESS``, else a local cluster starts here. Local clusters size
their object store explicitly (Ray's default, 30% of RAM, is too much beside training workers on a
laptop) and keep the dashboard on only where something reads it (Train's placement-group cleaner and
preemption checks, ``ray job``).
"""

from __future__ import annotations

import logging
import os
import socket

import ray
import ray.data

from raytrain_speech import VERBOSE_ENV, ray_compat

DEFAULT_DASHBOARD_PORT = 8265
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
"""Environment of every Ray worker we start: Ray Data's per-execution INFO lines and its progress bars
off. The driver's ``quiet_data`` does not reach the bars: Ray Train's SplitCoordinator actor runs the
training chain with a DataContext of its own, and with tqdm installed (the test extras bring it) a
150-step ``train --no-progress`` printed 3,512 lines of their escape sequences (docs/LOG.md)."""


def local_runtime_env() -> dict:
    """Runtime environment of a local Ray we start (and of the tests' clusters): QUIET_ENV, and
    ray_compat.worker_setup run first in every worker process (Ray Data's scheduler calmed)."""
    return {"env_vars": dict(QUIET_ENV), "worker_process_setup_hook": "raytrain_speech.ray_compat.worker_setup"}


def dashboard_port() -> int:
    """Ray's usual dashboard port, or a free one when another local Ray on this machine holds it.

    A second local cluster would otherwise start without a dashboard, and Train's placement-group
    cleaner and preemption checks, which read it, fail in the background.
    """
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DEFAULT_DASHBOARD_PORT))
            return DEFAULT_DASHBOARD_PORT
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verbose() -> bool:
    """``--verbose`` (VERBOSE_ENV): Ray's console output as Ray prints it (see ``connect``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def address(configured: str | None = None) -> str | None:
    """The cluster to join: the configured address, else $RAY_ADDRESS; None = start a local Ray."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def connect(configured_address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 1536,
            dashboard: bool = True) -> bool:
    """Join the configured/ambient cluster, or start a local one with ``num_cpus`` logical CPUs (default:
    the machine's cores). Returns True when this call started (or joined) Ray, False when the process
    was connected already; whoever gets True may ``ray.shutdown()`` when done. Either way Ray Data's
    progress output is off in this process."""
    quiet_data()
    ray_compat.calm_data_scheduler()
    if ray.is_initialized():
        return False
    loud = verbose()
    if not loud:  # Ray's lines a user can do nothing about off the console (still in the session logs)
        ray_compat.filter_driver_logs()
        ray_compat.quiet_token_auth_notice()
    quiet = {"logging_level": logging.INFO if loud else logging.WARNING, "log_to_driver": True}
    target = address(configured_address)
    if target:
        ray.init(address=target, **quiet)
    else:
        extra = {"dashboard_port": dashboard_port()} if dashboard else {}
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                 object_store_memory=object_store_mb * 2**20, include_dashboard=dashboard,
                 runtime_env=local_runtime_env(), **quiet, **extra)
    return True


def quiet_data() -> None:
    """Ray Data prints a progress bar per execution in every process (with tqdm) or a warning that it
    cannot (without); our commands print their own progress, so both are off."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def quiet_train_worker() -> None:
    """Inside a Train worker: Ray's per-report INFO lines off (see ray_compat.quiet_train_report_logger)."""
    ray_compat.quiet_train_report_logger()
