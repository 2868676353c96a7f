"""The CPU preflight: a cluster whose CPUs the training workers would fill is refused with one line,
before Train starts (without it, Ray Data waits at 0% forever)."""

from __future__ import annotations

from raytrain_speech.train.preflight import cpu_room_problem, data_nodes_problem
from tests.conftest import tiny_config


def _cfg(**over):
    return tiny_config(**{"run.num_workers": 2, "run.cpus_per_worker": 1, "data.preprocess_cpus": 1, **over})


def test_a_head_the_workers_fill_is_refused_with_the_keys_to_change():
    problem = cpu_room_problem({"CPU": 2}, None, _cfg())  # the case: 2 CPUs, 2 x 1-CPU workers
    assert "\n" not in problem and problem.startswith("no CPU left for data: the cluster has 2 CPUs")
    for key in ("run.cpus_per_worker=1", "data.preprocess_cpus=1", "run.num_workers", "reserve 2"):
        assert key in problem
    assert cpu_room_problem({"CPU": 3}, None, _cfg()) == ""  # one CPU left for data: it trains


def test_elastic_runs_are_judged_at_their_largest_size_and_the_autoscaler_counts():
    elastic = _cfg(**{"run.num_workers": [1, 3]})
    assert cpu_room_problem({"CPU": 3.5}, None, elastic)  # Train would place 3 workers: 0.5 CPU left
    assert cpu_room_problem({"CPU": 3.5}, {"CPU": 8}, elastic) == ""  # an autoscaler may add CPU nodes
    assert "the autoscaler's maximum" in cpu_room_problem({"CPU": 2}, {"CPU": 3}, elastic)


def test_workers_are_bounded_by_the_gpus_and_worker_resources():
    gpu = _cfg(**{"run.num_workers": 8, "run.cpus_per_worker": 4, "run.use_gpu": True})
    assert cpu_room_problem({"CPU": 10, "GPU": 2}, None, gpu) == ""  # 2 GPUs: 2 workers x 4 CPUs, 2 left
    assert cpu_room_problem({"CPU": 10, "GPU": 2}, {"GPU": 8, "CPU": 10}, gpu)  # 8 GPUs may come: 32 CPUs
    slots = _cfg(**{"run.num_workers": [1, 2], "run.worker_resources": {"trainer_slot": 1}})
    assert cpu_room_problem({"CPU": 3, "trainer_slot": 1}, None, slots) == ""  # one slot: one worker


def _node(cpus: float, alive: bool = True, **labels: str) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus}, "Labels": {"ray.io/node-id": "x", **labels}}


def test_data_node_labels_need_a_live_labelled_node_with_a_cpu_unless_an_autoscaler_may_add_one():
    cfg = _cfg(**{"data.node_labels": "{role: data}"})
    trainer_only = [_node(8)]
    problem = data_nodes_problem(trainer_only, None, cfg)
    assert "no node carries them" in problem and "ray start --labels=role=data" in problem
    assert "data.node_labels={}" in problem
    assert data_nodes_problem([_node(8), _node(4, role="data")], None, cfg) == ""
    assert "1 node(s) carry them" in data_nodes_problem([_node(0, role="data")], None, cfg)
    assert "no node carries them" in data_nodes_problem([_node(4, alive=False, role="data")], None, cfg)
    assert data_nodes_problem(trainer_only, {"CPU": 64.0}, cfg) == ""  # the cpu-data group may scale up
    assert data_nodes_problem(trainer_only, None, _cfg()) == ""  # no labels: cpu_room's job
