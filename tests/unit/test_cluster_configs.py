"""Cluster YAMLs are checked the way `ray up` checks them, plus what `ray up` leaves to the cloud.

Ray's shipped ``ray-schema.json`` and its own config preparation/validation (``prepare_config`` +
``validate_config``) catch unknown top-level and node-type keys; AWS ``node_config`` is checked
against EC2's RunInstances request shape from botocore's service model, and GCP ``node_config``
against the Compute Engine v1 Instance fields we use. A misspelled key anywhere fails.
"""

from __future__ import annotations

import copy
import glob
import os

import pytest
import yaml

from tests.unit.fieldcheck import check_fields

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CLUSTER_YAMLS = sorted(glob.glob(os.path.join(ROOT, "cluster", "*.yaml")))
GPUS_PER_NODE = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "a2-highgpu-8g": 8, "a2-ultragpu-8g": 8}

# Compute Engine v1 Instance fields (https://cloud.google.com/compute/docs/reference/rest/v1/instances),
# nested where our configs go below the top level.
GCP_INSTANCE = {
    "machineType": str, "minCpuPlatform": str, "labels": dict, "tags": dict, "serviceAccounts": list,
    "networkInterfaces": list, "shieldedInstanceConfig": dict, "reservationAffinity": dict,
    "metadata": {"items": [{"key": str, "value": str}]},
    "disks": [{"boot": bool, "autoDelete": bool, "type": str, "mode": str, "deviceName": str,
               "initializeParams": {"diskSizeGb": int, "sourceImage": str, "diskType": str, "labels": dict}}],
    "guestAccelerators": [{"acceleratorType": str, "acceleratorCount": int}],
    "scheduling": [{"preemptible": bool, "provisioningModel": str, "onHostMaintenance": str,
                    "automaticRestart": bool, "instanceTerminationAction": str}],
}


def ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def check_aws_shape(value, shape, where: str) -> None:
    """Recursively check a node_config against botocore's shape for EC2 RunInstances."""
    if shape.type_name == "structure":
        assert isinstance(value, dict), f"{where}: expected a mapping"
        for key, item in value.items():
            assert key in shape.members, f"{where}.{key}: not a RunInstances field (known: {sorted(shape.members)})"
            check_aws_shape(item, shape.members[key], f"{where}.{key}")
    elif shape.type_name == "list":
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            check_aws_shape(item, shape.member, f"{where}[{i}]")


def check_cluster(config: dict) -> None:
    prepared = ray_validate(config)
    provider = config["provider"]["type"]
    for name, node_type in prepared["available_node_types"].items():
        where = f"available_node_types.{name}.node_config"
        if provider == "aws":
            import botocore.session

            shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
            check_aws_shape(node_type["node_config"], shape, where)
        elif provider == "gcp":
            check_fields(node_type["node_config"], GCP_INSTANCE, where, "Compute Engine instance")
        else:
            pytest.fail(f"no node_config check for provider {provider}")


def test_there_are_aws_and_gcp_configs():
    assert {os.path.basename(p) for p in CLUSTER_YAMLS} >= {"aws-a100.yaml", "gcp-a100.yaml"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=os.path.basename)
def test_cluster_yaml_passes_ray_and_cloud_checks(path):
    config = yaml.safe_load(open(path))
    check_cluster(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "the head must not train"
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2, "token auth on head and workers"
    assert "--dashboard-host=127.0.0.1" in start, "dashboard/job API must not listen publicly"
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-")
    gpu_groups = {k: v for k, v in config["available_node_types"].items() if v["resources"].get("GPU")}
    assert all(v["min_workers"] == 0 for v in gpu_groups.values())
    markets = [str(v["node_config"]).lower() for v in gpu_groups.values()]
    assert any("spot" in m for m in markets) and any("spot" not in m for m in markets), "on-demand and spot"
    for v in gpu_groups.values():
        machine = v["node_config"].get("InstanceType") or v["node_config"].get("machineType")
        assert v["resources"]["GPU"] == GPUS_PER_NODE[machine]
    # The CPU data group carries the labels data.node_labels selects (docs/data.md); no GPU group does.
    assert config["available_node_types"]["cpu-data"]["labels"] == {"raytrain-speech/role": "data"}
    assert not any(v.get("labels") for v in gpu_groups.values())


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=os.path.basename)
def test_elastic_recipe_fits_the_gpu_groups(path):
    """The A100 recipe's [min, max] workers: min fits one node, max fills every GPU node."""
    from raytrain_speech.config import load_config

    config = yaml.safe_load(open(path))
    cfg = load_config(os.path.join(ROOT, "examples", "conformer_ctc_a100.yaml"))
    lo, hi = cfg.run.worker_range
    gpu_groups = [v for v in config["available_node_types"].values() if v["resources"].get("GPU")]
    assert cfg.run.use_gpu
    assert lo <= max(v["resources"]["GPU"] for v in gpu_groups)
    assert hi == sum(v["resources"]["GPU"] * v["max_workers"] for v in gpu_groups)
    assert cfg.run.cpus_per_worker * 8 <= min(v["resources"]["CPU"] for v in gpu_groups)


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(idle_timeout_minute=5), "idle_timeout_minute"),
    (lambda c: c["available_node_types"]["a100-spot"].update(max_worker=2), "max_worker"),
    (lambda c: c["docker"].update(imag="x"), "imag"),
    (lambda c: c["available_node_types"]["a100-spot"]["node_config"].update(InstanceTyp="p4d.24xlarge"),
     "InstanceTyp"),
    (lambda c: c["available_node_types"]["a100-od"]["node_config"]["BlockDeviceMappings"][0]["Ebs"].update(
        VolumeSzie=500), "VolumeSzie"),
])
def test_a_misspelled_key_fails_aws(mutate, needle):
    config = yaml.safe_load(open(os.path.join(ROOT, "cluster", "aws-a100.yaml")))
    mutate(config)
    with pytest.raises(Exception, match=needle):
        check_cluster(config)


def test_a_misspelled_key_fails_gcp():
    config = yaml.safe_load(open(os.path.join(ROOT, "cluster", "gcp-a100.yaml")))
    config["available_node_types"]["a100-spot"]["node_config"]["guestAccelerators"][0]["acceleratorCont"] = 8
    with pytest.raises(AssertionError, match="acceleratorCont"):
        check_cluster(config)
