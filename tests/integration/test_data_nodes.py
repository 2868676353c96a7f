"""CPU data nodes for GPU trainers (``data.node_labels``): on a ``ray.cluster_utils.Cluster`` with a
CPU-only node labelled as the cpu-data group of cluster/*.yaml is, and a "trainer" node (a custom
resource standing in for its GPUs), every preprocessing task of the run ran on the data node and
every training worker on the trainer node, as Ray's task and actor records say."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from raytrain_speech.data.synth import synthesize
from raytrain_speech.ray_session import dashboard_port
from raytrain_speech.train.fit import fit
from tests.conftest import tiny_config

OWNS_RAY = True
"""This module starts Ray in the test process its own way (tests/conftest.py SharedRay)."""

DATA_LABELS = {"raytrain-speech/role": "data"}


@pytest.fixture(scope="module")
def data_and_trainer_nodes(s3_endpoint):
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 300 * 2**20, "dashboard_port": dashboard_port()})
    data = cluster.add_node(num_cpus=2, labels=DATA_LABELS, object_store_memory=200 * 2**20)
    trainer = cluster.add_node(num_cpus=2, resources={"trainer_slot": 2}, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield data.node_id, trainer.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # a three-node cluster on the 2-core box (~1.5 min)
def test_preprocessing_runs_on_the_data_node_and_training_on_the_trainer_node(tmp_path, data_and_trainer_nodes):
    from ray.util.state import list_actors, list_tasks

    data_node, trainer_node = data_and_trainer_nodes
    root = str(tmp_path / "corpus")
    cfg = tiny_config(**{
        "data.root": root, "synth.train_hours": 0.03, "run.storage_path": str(tmp_path / "runs"),
        "run.name": "datanodes", "run.num_workers": 2, "run.cpus_per_worker": 1,
        "run.worker_resources": {"trainer_slot": 1}, "data.node_labels": "{raytrain-speech/role: data}",
        "train.max_steps": 4, "train.log_every_steps": 2, "train.global_batch_audio_s": 20,
        "augment.speed_factors": "[0.9, 1.0, 1.1]"})
    synthesize(cfg.synth, root, log=lambda s: None)
    outcome = fit(cfg, progress=False)
    assert outcome.metrics["step"] == 4, outcome
    tasks = [t for t in list_tasks(limit=10000, detail=True, raise_on_missing_output=False)
             if "_read_and_preprocess" in (t.name or "") or "_read_and_preprocess" in (t.func_or_class_name or "")]
    assert tasks, "no preprocessing task recorded"
    assert {t.node_id for t in tasks if t.node_id} == {data_node}, [(t.name, t.node_id) for t in tasks[:5]]
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100)
    assert workers and {a.node_id for a in workers} == {trainer_node}
