"""The cluster definitions in cluster/: the launcher YAML against the schema that ships with Ray, the KubeRay
manifests for the fields the operator needs, and the commands they run against this project."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from rlhf_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "launcher-aws.yaml"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_resource(path: Path, kind: str) -> dict:
    found = [doc for doc in documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def test_launcher_yaml_matches_the_schema_shipped_with_ray():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load(LAUNCHER.read_text()), schema)


def test_launcher_yaml_passes_the_checks_of_ray_up():
    """What `ray up` does before it talks to the cloud: fill the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(LAUNCHER.read_text())))


def test_launcher_has_a_gpu_worker_type_with_min_and_max_workers():
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [node for node in types.values() if node["resources"].get("GPU", 0) >= 1]
    assert gpu, "no node type offers a GPU"
    for node in gpu:
        assert 1 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]


def test_launcher_installs_this_project_and_runs_with_token_auth():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["file_mounts"]["~/rlhf_ray"] == "."
    assert any("pip install" in command and "-e ." in command for command in config["setup_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command


def _check_group(group: dict, where: str) -> None:
    containers = group["template"]["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for container in containers:
        assert container.get("image"), f"{where}: container {container.get('name')} has no image"
        assert container.get("resources", {}).get("limits"), f"{where}: container {container.get('name')} has no limits"
    assert isinstance(group["rayStartParams"], dict), f"{where}: rayStartParams is required (may be empty)"


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", where
    assert spec["authOptions"]["mode"] == "token", where
    _check_group(spec["headGroupSpec"], f"{where} headGroupSpec")
    groups = spec["workerGroupSpecs"]
    assert len({group["groupName"] for group in groups}) == len(groups), f"{where}: group names repeat"
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}: {group['groupName']}"
        _check_group(group, f"{where} {group['groupName']}")
    gpu_groups = [group for group in groups
                  if any(container["resources"]["limits"].get("nvidia.com/gpu")
                         for container in group["template"]["spec"]["containers"])]
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    assert all(group["minReplicas"] >= 1 for group in gpu_groups), \
        f"{where}: the learner's GPUs must be there when the run starts (it fails at once otherwise)"


@pytest.mark.parametrize("path,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifest_has_the_fields_the_operator_needs(path, kind):
    resource = ray_resource(CLUSTER / path, kind)
    assert resource["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", resource["metadata"]["name"])
    spec = resource["spec"] if kind == "RayCluster" else resource["spec"]["rayClusterSpec"]
    _check_cluster_spec(spec, path)


def test_rayjob_entrypoint_trains_a_config_of_this_project():
    job = ray_resource(CLUSTER / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["rlhf-ray", "train"] and argv[-2:] == ["--address", "auto"]
    config, overrides = argv[2], argv[3:-2]
    loaded = load_config(REPO / config, overrides)  # the config exists and the overrides are valid keys
    assert Path(loaded.output_dir).is_absolute(), "run outputs must go to the shared volume"
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_shared_volume_claim_is_the_one_the_pods_mount():
    claim = ray_resource(CLUSTER / "shared-volume.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for path, kind in [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")]:
        spec = ray_resource(CLUSTER / path, kind)["spec"]
        spec = spec if kind == "RayCluster" else spec["rayClusterSpec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            claims = [volume["persistentVolumeClaim"]["claimName"] for volume in group["template"]["spec"]["volumes"]
                      if "persistentVolumeClaim" in volume]
            assert claims == [claim["metadata"]["name"]], f"{path}: {group.get('groupName', 'head')}"
