"""KubeRay manifests use only field names the CRDs define, and turn on what our users rely on.

No Kubernetes API server here, so the check walks each manifest against the ray.io/v1 field names of
KubeRay v1.7.0 (ray-operator/apis/ray/v1: raycluster_types.go, rayjob_types.go) and, inside pod
templates, the core/v1 fields of PodSpec and Container that a training pod uses. A misspelled key
anywhere fails, as the API server's structural-schema pruning would otherwise drop it silently.
"""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from tests.unit.fieldcheck import check_fields

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
KUBERAY = os.path.join(ROOT, "cluster", "kuberay")

MAP, STR, LIST_OF_STR = dict, None, list  # leaf kinds: any mapping, any scalar, any list
RESOURCES = {"limits": MAP, "requests": MAP, "claims": [{"name": STR, "request": STR}]}
ENV_VAR = {"name": STR, "value": STR,
           "valueFrom": {"secretKeyRef": {"name": STR, "key": STR, "optional": STR},
                         "configMapKeyRef": {"name": STR, "key": STR, "optional": STR},
                         "fieldRef": {"fieldPath": STR, "apiVersion": STR},
                         "resourceFieldRef": {"resource": STR, "containerName": STR, "divisor": STR}}}
CONTAINER = {
    "name": STR, "image": STR, "imagePullPolicy": STR, "command": LIST_OF_STR, "args": LIST_OF_STR,
    "workingDir": STR, "env": [ENV_VAR], "envFrom": [MAP], "resources": RESOURCES,
    "ports": [{"containerPort": STR, "name": STR, "protocol": STR, "hostPort": STR}],
    "volumeMounts": [{"name": STR, "mountPath": STR, "readOnly": STR, "subPath": STR}],
    "securityContext": MAP, "lifecycle": MAP, "livenessProbe": MAP, "readinessProbe": MAP,
}
POD_TEMPLATE = {
    "metadata": {"labels": MAP, "annotations": MAP},
    "spec": {
        "containers": [CONTAINER], "initContainers": [CONTAINER], "nodeSelector": MAP, "affinity": MAP,
        "tolerations": [{"key": STR, "operator": STR, "value": STR, "effect": STR, "tolerationSeconds": STR}],
        "volumes": [{"name": STR, "emptyDir": {"medium": STR, "sizeLimit": STR},
                     "secret": {"secretName": STR, "items": [MAP], "defaultMode": STR},
                     "configMap": {"name": STR, "items": [MAP]},
                     "persistentVolumeClaim": {"claimName": STR, "readOnly": STR}}],
        "serviceAccountName": STR, "terminationGracePeriodSeconds": STR, "priorityClassName": STR,
        "restartPolicy": STR, "imagePullSecrets": [{"name": STR}], "securityContext": MAP,
    },
}
# ray.io/v1 field names (KubeRay v1.7.0).
AUTOSCALER_OPTIONS = {"resources": RESOURCES, "image": STR, "imagePullPolicy": STR, "securityContext": MAP,
                      "idleTimeoutSeconds": STR, "upscalingMode": STR, "version": STR, "env": [ENV_VAR],
                      "envFrom": [MAP], "volumeMounts": [MAP], "command": LIST_OF_STR, "args": LIST_OF_STR}
HEAD_GROUP = {"template": POD_TEMPLATE, "headService": MAP, "enableIngress": STR, "ingressOptions": MAP,
              "resources": MAP, "labels": MAP, "rayStartParams": MAP, "serviceType": STR}
WORKER_GROUP = {"suspend": STR, "groupName": STR, "replicas": STR, "minReplicas": STR, "maxReplicas": STR,
                "idleTimeoutSeconds": STR, "priority": STR, "resources": MAP, "labels": MAP,
                "rayStartParams": MAP, "template": POD_TEMPLATE, "scaleStrategy": {"workersToDelete": LIST_OF_STR},
                "numOfHosts": STR}
RAY_CLUSTER_SPEC = {
    "upgradeStrategy": MAP, "authOptions": {"enableK8sTokenAuth": STR, "secretName": STR, "mode": STR},
    "suspend": STR, "managedBy": STR, "autoscalerOptions": AUTOSCALER_OPTIONS, "headServiceAnnotations": MAP,
    "enableInTreeAutoscaling": STR, "gcsFaultToleranceOptions": MAP, "historyServerOptions": MAP,
    "networkPolicy": MAP, "tlsOptions": MAP, "headGroupSpec": HEAD_GROUP, "rayVersion": STR,
    "workerGroupSpecs": [WORKER_GROUP],
}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds": STR, "backoffLimit": STR, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE, "metadata": MAP, "clusterSelector": MAP,
    "submitterConfig": {"backoffLimit": STR}, "managedBy": STR, "deletionStrategy": MAP, "entrypoint": STR,
    "runtimeEnvYAML": STR, "jobId": STR, "submissionMode": STR, "entrypointResources": STR,
    "entrypointNumCpus": STR, "entrypointNumGpus": STR, "ttlSecondsAfterFinished": STR,
    "preRunningDeadlineSeconds": STR, "shutdownAfterJobFinishes": STR, "suspend": STR,
}
TOP = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC}


def check_manifest(doc: dict) -> dict:
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in TOP, (doc.get("apiVersion"), doc.get("kind"))
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)
    check_fields(doc["spec"], TOP[doc["kind"]], f"{doc['kind']}.spec", "KubeRay CRD / core v1")
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def load(name: str) -> dict:
    with open(os.path.join(KUBERAY, name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_manifest_fields_and_what_users_rely_on(name):
    cluster = check_manifest(load(name))
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must not train"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "dashboard/job API must not be public"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"a100-od", "a100-spot", "cpu-data"} <= set(groups)
    for name, g in groups.items():
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if name == "cpu-data":  # what data.node_labels selects (docs/data.md), and no GPU
            assert g["labels"] == {"raytrain-speech/role": "data"} and "nvidia.com/gpu" not in limits
        else:
            assert limits["nvidia.com/gpu"] == "8" and "raytrain-speech/role" not in g.get("labels", {})
    images = {c["image"] for g in [head, *groups.values()] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith("-ray2.60.0")


def test_rayjob_runs_a_recipe_and_cleans_up():
    spec = load("rayjob.yaml")["spec"]
    assert spec["entrypoint"].startswith("raytrain-speech train --config ")
    recipe = spec["entrypoint"].split("--config ")[1].split()[0].replace("/home/ray/raytrain-speech/", "")
    assert os.path.isfile(os.path.join(ROOT, recipe))
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert spec["rayClusterSpec"] == load("raycluster.yaml")["spec"], "one cluster shape, kept in sync"


@pytest.mark.parametrize("path", [
    ("workerGroupSpecs", 0, "maxReplica"),
    ("workerGroupSpecs", 1, "template", "spec", "containers", 0, "resource"),
    ("headGroupSpec", "template", "spec", "nodeSelecter"),
    ("authOptions", "mod"),
    ("enableInTreeAutoscalling",),
])
def test_a_misspelled_key_fails(path):
    doc = copy.deepcopy(load("raycluster.yaml"))
    node = doc["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    with pytest.raises(AssertionError, match=path[-1]):
        check_manifest(doc)
