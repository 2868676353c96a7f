"""Chaos with several Ray nodes on one machine (``ray.cluster_utils.Cluster``): a node holding a
training worker gets a spot-preemption drain notice and then disappears; the run checkpoints on the
notice, and the elastic run continues on the survivor from that checkpoint with the same global
batch."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from raytrain_speech.data.synth import synthesize
from raytrain_speech.ray_session import dashboard_port
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import tiny_config
from tests.integration.audit import assert_exactly_once, assert_no_stale_rows, read_attempts

OWNS_RAY = True
"""This module starts Ray in the test process its own way (tests/conftest.py SharedRay)."""


@pytest.fixture(scope="module")
def two_node_cluster(s3_endpoint):
    # Train polls Ray Core for drains every 5 s by default; the tiny model steps every ~0.2 s.
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
    # After a hard node loss Train first waits this long for the old worker count (default 60 s).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
    # A lost node is declared dead after missed health checks (Ray's default: ~30 s); a test need not wait.
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 300 * 2**20, "_system_config": fast_health,
        "dashboard_port": dashboard_port()})
    workers = [cluster.add_node(num_cpus=1, resources={"trainer_slot": 1}, object_store_memory=200 * 2**20)
               for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", None)
        os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)


def _node_of_pid(pid: int) -> str:
    from ray.util.state import list_actors

    for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100):
        if actor.pid == pid:
            return actor.node_id
    raise LookupError(f"no live RayTrainWorker with pid {pid}")


def _drain_for_preemption(node_id: str, deadline_s: float) -> None:
    """What a spot reclaim looks like to Ray: the node is drained with reason PREEMPTION and a deadline
    (a raylet does the same to itself on SIGTERM)."""
    from ray.core.generated import autoscaler_pb2

    gcs = ray._private.worker.global_worker.gcs_client
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
                                   "spot reclaim (test)", int((time.time() + deadline_s) * 1000))
    assert accepted, why


def _elastic_config(tmp_path, root: str, name: str, log_dir: str, **extra):
    """A 1-2 worker elastic run on the trainer nodes, 20 audio-s global batch (accumulation 1 at two workers)."""
    return tiny_config(**{
        "data.root": root, "run.storage_path": str(tmp_path / "runs"), "run.name": name,
        "run.num_workers": [1, 2], "run.worker_resources": {"trainer_slot": 1}, "run.max_failures": 3,
        "train.log_every_steps": 2, "train.global_batch_audio_s": 20, "train.micro_batch_audio_s": 10,
        "train.trained_log_dir": log_dir, "optim.warmup_steps": 5, **extra,
    })


@pytest.mark.slow  # over the default run's time budget on 2 cores (docs/LOG.md)
def test_spot_preemption_checkpoints_then_shrinks_to_one_worker(two_node_cluster, tmp_path):
    cluster, workers = two_node_cluster
    root = str(tmp_path / "corpus")
    manifest = synthesize(tiny_config().synth, root, log=lambda s: None)
    log_dir = str(tmp_path / "trained")
    cfg = _elastic_config(tmp_path, root, "nodeloss", log_dir, **{"train.max_steps": 40,
                                                                   "train.checkpoint_every_steps": 100})
    removed = {}
    metrics_path = tmp_path / "runs" / "nodeloss" / "metrics.jsonl"

    def preempt_when_ready():
        deadline = time.time() + 300
        while time.time() < deadline:
            attempts = read_attempts(log_dir)
            if attempts and attempts[-1]["world_size"] == 2 and max(attempts[-1]["steps"], default=0) >= 7:
                node_id = _node_of_pid(attempts[-1]["pids"][1])
                _drain_for_preemption(node_id, deadline_s=60)
                removed["drained_at_step"] = max(attempts[-1]["steps"])
                # the run should now checkpoint at its next log step; then the node goes
                while time.time() < deadline:
                    lines = read_metrics(str(metrics_path))
                    saved = [m["step"] for m in lines if m.get("preemption_checkpoint")]
                    if saved:
                        removed["preemption_checkpoint"] = saved[0]
                        break
                    time.sleep(0.1)
                node = next(n for n in workers if n.node_id == node_id)
                cluster.remove_node(node, allow_graceful=False)
                removed["node"] = node_id
                return
            time.sleep(0.1)

    threading.Thread(target=preempt_when_ready, daemon=True).start()
    outcome = fit(cfg, progress=False)
    assert removed.get("node"), "the node was never removed"
    attempts = assert_exactly_once(log_dir, manifest.splits["train"].num_utterances, final_step=40)
    assert [a["world_size"] for a in attempts] == [2, 1]
    # The restart resumed from the checkpoint taken on the drain notice, not the periodic one before it.
    assert attempts[1]["restored_step"] == removed["preemption_checkpoint"] > removed["drained_at_step"]
    assert [a["grad_accum"] for a in attempts] == [1, 2]  # same 20 s global batch on half the workers
    history = outcome.run_card["worker_history"]
    assert [(h["world_size"], h["grad_accum"]) for h in history] == [(2, 1), (1, 2)]
    assert outcome.run_card["restarts_survived"] == 1


def _two_trainer_nodes(cluster, workers) -> None:
    """Bring the module's cluster back to two live trainer nodes (an earlier test may have removed one)."""
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("trainer_slot")]
    for _ in range(2 - len(alive)):
        workers.append(cluster.add_node(num_cpus=1, resources={"trainer_slot": 1}, object_store_memory=200 * 2**20))
    cluster.wait_for_nodes()
    deadline = time.time() + 60
    # available, not only present: the earlier test's placement group is released asynchronously (Train's
    # cleaner), and an elastic run that sizes itself while it still holds a slot starts with one worker
    while ray.available_resources().get("trainer_slot", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)


@pytest.mark.slow  # over the default run's time budget on 2 cores (docs/LOG.md)
def test_a_node_lost_without_notice_resumes_on_the_survivor_from_the_last_checkpoint(two_node_cluster, tmp_path):
    """No drain notice (a kernel panic, a pulled cable): the node holding rank 1 is removed abruptly
    mid-epoch. The run has no chance to checkpoint; it resumes on the surviving node from the last
    periodic checkpoint, at one worker with the same global batch, and every utterance of the cut
    epoch is trained exactly once over the surviving steps."""
    cluster, workers = two_node_cluster
    _two_trainer_nodes(cluster, workers)
    root = str(tmp_path / "corpus")
    manifest = synthesize(tiny_config().synth, root, log=lambda s: None)
    log_dir = str(tmp_path / "trained")
    cfg = _elastic_config(tmp_path, root, "hardloss", log_dir, **{"train.max_steps": 1000, "train.max_epochs": 1,
                                                                   "train.checkpoint_every_steps": 6})
    removed = {}

    def remove_when_ready():
        deadline = time.time() + 300
        while time.time() < deadline:
            attempts = read_attempts(log_dir)
            if attempts and attempts[-1]["world_size"] == 2 and max(attempts[-1]["steps"], default=0) >= 9:
                node_id = _node_of_pid(attempts[-1]["pids"][1])
                removed["at_step"] = max(attempts[-1]["steps"])
                cluster.remove_node(next(n for n in workers if n.node_id == node_id), allow_graceful=False)
                removed["node"] = node_id
                return
            time.sleep(0.05)

    threading.Thread(target=remove_when_ready, daemon=True).start()
    outcome = fit(cfg, progress=False)
    assert removed.get("node"), "the node was never removed"
    assert removed["at_step"] < 12, removed  # removed before the step-12 checkpoint could be taken
    attempts = assert_exactly_once(log_dir, manifest.splits["train"].num_utterances,
                                   final_step=outcome.metrics["step"], complete_epochs=1, last_epoch_complete=True)
    assert [(a["world_size"], a["restored_step"]) for a in attempts] == [(2, 0), (1, 6)]
    assert [a["grad_accum"] for a in attempts] == [1, 2]  # same 20 s global batch on half the workers
    metrics = read_metrics(str(tmp_path / "runs" / "hardloss" / "metrics.jsonl"))
    assert not any(m.get("preemption_checkpoint") for m in metrics)  # there was no notice to act on
    assert_no_stale_rows(metrics)
    history = outcome.run_card["worker_history"]
    assert [(h["world_size"], h["start_step"]) for h in history] == [(2, 0), (1, 6)]
    # The run card sees reported steps: those reported after step 6 were rolled back (the steps run after
    # the last report, up to the loss, are not in any report).
    assert history[0]["steps_rolled_back"] == history[0]["last_step"] - 6 <= removed["at_step"] - 6
    assert history[1]["steps_rolled_back"] == 0
