"""ray_compat against the installed Ray (no cluster): each private touch still finds what it needs, and
a snapshot of another shape is one clear error naming the Ray versions, never a guess."""

from __future__ import annotations

import json

import pytest

from raytrain_speech import ray_compat, storage
from raytrain_speech.train import checkpoint


def test_the_installed_ray_is_the_checked_one():
    import ray

    assert ray.__version__ == ray_compat.CHECKED_ON


def test_snapshot_names_the_latest_committed_checkpoint_and_a_new_shape_is_refused(tmp_path):
    assert ray_compat.latest_snapshot_checkpoint(str(tmp_path)) is None  # no snapshot: a fresh run
    snap = tmp_path / ray_compat.RAY_SNAPSHOT
    snap.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_step00000012"}}))
    assert ray_compat.latest_snapshot_checkpoint(str(tmp_path)) == "checkpoint_step00000012"
    snap.write_text(json.dumps({"latest_checkpoint_result": None}))
    assert ray_compat.latest_snapshot_checkpoint(str(tmp_path)) is None
    snap.write_text(json.dumps({"checkpoints": []}))
    with pytest.raises(ray_compat.RayCompatError, match=r"latest_checkpoint_result.*Ray 2\.60\.0.*this is Ray"):
        ray_compat.latest_snapshot_checkpoint(str(tmp_path))


def test_the_newer_of_ray_and_local_records_is_the_one_to_resume(tmp_path):
    run = str(tmp_path)
    assert checkpoint.latest_committed_dir(run) is None
    (tmp_path / ray_compat.RAY_SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_step00000020"}}))
    checkpoint.write_local_record(run, [{"dir": "checkpoint_step00000010", "step": 10}])
    assert checkpoint.latest_committed_dir(run) == f"{run}/checkpoint_step00000020"
    checkpoint.write_local_record(run, [{"dir": "checkpoint_step00000030", "step": 30}])
    assert checkpoint.latest_committed_dir(run) == f"{run}/checkpoint_step00000030"


def test_asha_rungs_are_the_schedulers_live_records():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    asha = AsyncHyperBandScheduler(time_attr="step", metric="valid_loss", mode="min", max_t=16, grace_period=2,
                                   reduction_factor=2)
    rungs = ray_compat.asha_rungs(asha)
    assert rungs and all(isinstance(r, dict) for bracket in rungs for r in bracket)
    rungs[0][0]["trial-a"] = 1.5  # what a resumed sweep reloads lands in the scheduler itself
    assert ray_compat.asha_rungs(asha)[0][0] == {"trial-a": 1.5}


def test_the_unequal_split_config_is_a_train_data_config():
    from ray.train import DataConfig

    config = ray_compat.unequal_split_data_config()
    assert isinstance(config, DataConfig) and type(config).configure is not DataConfig.configure


def test_a_run_dir_resolves_to_its_committed_checkpoint_not_the_newest_directory(tmp_path):
    """An upload in flight (a newer checkpoint_* directory, even one with its state file already
    written) is not what eval / export / init_from read while the records name an older one."""
    run = str(tmp_path)
    for step in (10, 20):
        (tmp_path / checkpoint.dir_name(step)).mkdir()
        (tmp_path / checkpoint.dir_name(step) / checkpoint.STATE_FILE).write_bytes(b"x")
    (tmp_path / checkpoint.dir_name(30)).mkdir()  # created, nothing written yet
    # No record (a hand-copied directory): the newest one holding a state file.
    assert checkpoint.resolve_checkpoint(run) == f"{run}/{checkpoint.dir_name(20)}"
    checkpoint.write_local_record(run, [{"dir": checkpoint.dir_name(10), "step": 10}])
    assert checkpoint.resolve_checkpoint(run) == f"{run}/{checkpoint.dir_name(10)}"
    (tmp_path / ray_compat.RAY_SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": checkpoint.dir_name(20)}}))
    assert checkpoint.resolve_checkpoint(run) == f"{run}/{checkpoint.dir_name(20)}"
    with pytest.raises(storage.StorageError, match="neither a checkpoint"):
        checkpoint.resolve_checkpoint(str(tmp_path / "empty"))


def test_the_driver_log_filter_drops_rays_noise_and_shows_our_lines_plain():
    """Ray's own print_worker_logs, wrapped: fed a batch as Ray's log monitor sends it."""
    import io

    from ray._private import worker as ray_worker

    ray_compat.filter_driver_logs()
    ray_compat.filter_driver_logs()  # idempotent: wrapped once
    assert ray_worker.print_worker_logs.filtered
    out = io.StringIO()
    lines = ["[raytrain-speech] 2 worker(s) x 1 micro-batch(es), starting fresh",
             "[2026-12-03 15:05:01,566 E 1 2] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
             "ID: 'f5' has constructor arguments in the object store and max_restarts > 0. If the arguments",
             "a warning of the user's own code",
             "[raytrain-speech] too much bad input: 12 of 40"]
    ray_worker.print_worker_logs({"pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": lines,
                                  "actor_name": "RayTrainWorker"}, out)
    printed = out.getvalue().splitlines()
    assert len(printed) == 3 and not any("PreemptionWatcher" in p for p in printed)
    assert printed[0] == lines[0] and printed[2] == lines[3]  # ours: no "(RayTrainWorker pid=...)" prefix
    assert "(RayTrainWorker pid=4242)" in printed[1] and printed[1].endswith(lines[2])  # others: as Ray prints


def test_only_the_token_auth_enabled_notice_is_filtered(caplog):
    import logging

    ray_compat.quiet_token_auth_notice()
    ray_compat.quiet_token_auth_notice()
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert [r.getMessage()[:40] for r in caplog.records] == ["Token authentication is disabled for thi"]
