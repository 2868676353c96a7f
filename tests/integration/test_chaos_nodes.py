"""Chaos with several Ray nodes on one machine (``ray.cluster_utils.Cluster``): a node holding a
training worker disappears; the elastic run continues on the survivor with the same global batch."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.launch import fit
from tests.conftest import tiny_config
from tests.integration.audit import assert_exactly_once, read_attempts


@pytest.fixture(scope="module")
def two_node_cluster(s3_endpoint):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300 * 2**20})
    workers = [cluster.add_node(num_cpus=1, resources={"trainer_slot": 1}, object_store_memory=200 * 2**20)
               for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def _node_of_pid(pid: int) -> str:
    from ray.util.state import list_actors

    for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100):
        if actor.pid == pid:
            return actor.node_id
    raise LookupError(f"no live RayTrainWorker with pid {pid}")


def test_node_loss_shrinks_to_one_worker_and_keeps_the_global_batch(two_node_cluster, tmp_path):
    cluster, workers = two_node_cluster
    root = str(tmp_path / "corpus")
    manifest = synthesize(tiny_config().synth, root, log=lambda s: None)
    log_dir = str(tmp_path / "trained")
    cfg = tiny_config(**{
        "data.root": root, "run.storage_path": str(tmp_path / "runs"), "run.name": "nodeloss",
        "run.num_workers": [1, 2], "run.worker_resources": {"trainer_slot": 1}, "run.max_failures": 3,
        "train.max_steps": 30, "train.log_every_steps": 2, "train.checkpoint_every_steps": 6,
        "train.global_batch_audio_s": 20, "train.micro_batch_audio_s": 10, "train.trained_log_dir": log_dir,
        "optim.warmup_steps": 5,
    })
    removed = {}

    def remove_when_ready():
        deadline = time.time() + 300
        while time.time() < deadline:
            attempts = read_attempts(log_dir)
            if attempts and attempts[-1]["world_size"] == 2 and max(attempts[-1]["steps"], default=0) >= 9:
                node_id = _node_of_pid(attempts[-1]["pids"][1])
                node = next(n for n in workers if n.node_id == node_id)
                cluster.remove_node(node, allow_graceful=False)
                removed["node"] = node_id
                return
            time.sleep(0.1)

    threading.Thread(target=remove_when_ready, daemon=True).start()
    outcome = fit(cfg, progress=False)
    assert removed, "the node was never removed"
    attempts = assert_exactly_once(log_dir, manifest.splits["train"].num_utterances, final_step=30)
    assert [a["world_size"] for a in attempts] == [2, 1]
    assert [a["grad_accum"] for a in attempts] == [1, 2]  # same 20 s global batch on half the workers
    history = outcome.run_card["worker_history"]
    assert [(h["world_size"], h["grad_accum"]) for h in history] == [(2, 1), (1, 2)]
    assert outcome.run_card["restarts_survived"] == 1
