"""Chaos (slow): an autoscaled node group appears under a running elastic job.

A head started with ``ray start --head --block`` (stopped by pid, never ``ray stop``) runs Ray's fake
multi-node autoscaler; the "a100" node type (a custom ``trainer_slot`` resource standing in for a GPU
node group) starts capped at one node. A run with ``num_workers=[1, 2]`` trains on it; once it has taken
steps the group's cap is raised to two in the autoscaler's config file (as when a quota is raised or spot
capacity returns; the autoscaler re-reads its config every update), the autoscaler adds a node and the
run grows to two workers. The global batch and exactly-once accounting hold across the resize.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import pytest
import ray
from ray._private.authentication_test_utils import reset_auth_token_state

from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.fit import fit
from tests.conftest import tiny_config
from tests.integration.audit import assert_exactly_once, read_attempts
from tests.integration.heads import free_port, short_temp_dir, start_head, stop_head

OWNS_RAY = True
"""This module starts Ray in the test process its own way (tests/conftest.py SharedRay)."""


@pytest.fixture
def autoscaling_head(s3_endpoint):
    temp = short_temp_dir("rtsas")
    port = free_port()
    ip = ray._private.services.get_node_ip_address()
    config = {
        "cluster_name": "rts-fake", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "a100": {"resources": {"CPU": 1, "trainer_slot": 1, "object_store_memory": 200 * 2**20},
                     "node_config": {}, "min_workers": 1, "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }
    config_path = os.path.join(temp, "autoscaler.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # this cluster's own token
    env = {**os.environ, **auth, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "2"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    reset_auth_token_state()  # this process may have cached another cluster's token
    head = start_head(temp, port, ["--num-cpus=2", f"--autoscaling-config={config_path}",
                                   "--object-store-memory=300000000", "--include-dashboard=true",
                                   "--dashboard-port=0"], env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                ray.init(address=f"{ip}:{port}", logging_level="WARNING")
                break
            except Exception:
                time.sleep(1)
        else:
            pytest.fail("the autoscaling head did not come up")
        while time.time() < deadline and ray.cluster_resources().get("trainer_slot", 0) < 1:
            time.sleep(1)  # the group's minimum (one node) is up before the run starts
        yield config, config_path
    finally:
        ray.shutdown()
        stop_head(head, temp)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()


@pytest.mark.slow
def test_run_grows_when_the_autoscaler_adds_a_node(autoscaling_head, tmp_path):
    config, config_path = autoscaling_head
    root = str(tmp_path / "corpus")
    manifest = synthesize(tiny_config().synth, root, log=lambda s: None)
    log_dir = str(tmp_path / "trained")
    cfg = tiny_config(**{
        "data.root": root, "run.storage_path": str(tmp_path / "runs"), "run.name": "grow",
        "run.num_workers": [1, 2], "run.worker_resources": {"trainer_slot": 1}, "run.elastic_resize_interval_s": 5,
        "train.max_steps": 60, "train.log_every_steps": 2, "train.checkpoint_every_steps": 4,
        "train.global_batch_audio_s": 20, "train.micro_batch_audio_s": 10, "train.trained_log_dir": log_dir,
        "optim.warmup_steps": 5,
    })
    raised = {}

    def raise_the_cap_after_steps_on_one_worker():
        deadline = time.time() + 600
        while time.time() < deadline:
            attempts = read_attempts(log_dir)
            if attempts and attempts[0]["world_size"] == 1 and len(attempts[0]["steps"]) >= 4:
                config["max_workers"] = config["available_node_types"]["a100"]["max_workers"] = 2
                with open(config_path + ".tmp", "w") as f:
                    json.dump(config, f)
                os.replace(config_path + ".tmp", config_path)
                raised["at_step"] = max(attempts[0]["steps"])
                return
            time.sleep(0.2)

    threading.Thread(target=raise_the_cap_after_steps_on_one_worker, daemon=True).start()
    outcome = fit(cfg, progress=False)
    assert raised, "the one-worker attempt never took 4 steps"
    attempts = assert_exactly_once(log_dir, manifest.splits["train"].num_utterances, final_step=60)
    sizes = [a["world_size"] for a in attempts]
    assert sizes[0] == 1 and sizes[-1] == 2, sizes
    for a in attempts:
        assert a["grad_accum"] == (2 if a["world_size"] == 1 else 1)
    assert [h["world_size"] for h in outcome.run_card["worker_history"]] == sizes
