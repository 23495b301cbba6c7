"""The KubeRay manifests in k8s/ are valid before anyone applies them.

Every object is checked against its schema with unknown fields rejected (the API server would
silently drop them): the RayService against KubeRay v1.7.0's CRD, built-in kinds and the pod
templates inside the RayService against Kubernetes' own schemas (`kubernetes-validate`).
`serveConfigV2` must parse as a Serve config with valid builder args and equal its GPU config
in config/ (`SERVE_CONFIGS`), the Ray version and image tags must match the Ray this project
installs, and breaking a manifest on purpose must be caught.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app import InvalidArgs, parse_args

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = [
    K8S / "base",
    K8S / "ha",
    K8S / "object-storage",
    K8S / "videos",
    K8S / "parallel",
]
CRD = Path(__file__).resolve().parents[1] / "data/kuberay/v1.7.0/ray.io_rayservices.yaml"
# The release file unchanged (its digest, recorded in tests/data/kuberay/README.md).
CRD_SHA256 = "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"
GPU_CONFIG = REPO / "config/sd3.5-medium.yaml"
# The config each overlay's serveConfigV2 must equal.
SERVE_CONFIGS = {
    "base": GPU_CONFIG,
    "ha": GPU_CONFIG,
    "object-storage": REPO / "config/sd3.5-medium-s3.yaml",
    "videos": REPO / "config/sd3.5-medium-videos.yaml",
    "parallel": REPO / "config/flux-dev-parallel.yaml",
}
KUBERNETES_VERSION = "1.32"
Doc = dict[str, Any]


def _strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever the CRD lists the known ones."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _crd_schema() -> Doc:
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


RAYSERVICE_VALIDATOR = jsonschema.Draft7Validator(_crd_schema())


# --- rendering: the subset of kustomize that k8s/ uses ---------------------------------------


def _merge(target: Doc, patch: Doc) -> None:
    """A JSON merge patch (RFC 7386): what a strategic merge does when no list is patched."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _json_patch(doc: Doc, operations: list[Doc]) -> None:
    """A JSON patch (RFC 6902), the ops k8s/ uses: test, remove, add, replace."""
    for operation in operations:
        *parents, last = [
            part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]
        ]
        parent: Any = doc
        for part in parents:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        key: Any = int(last) if isinstance(parent, list) and last != "-" else last
        op = operation["op"]
        if op == "test":
            assert parent[key] == operation["value"], f"patch test failed: {operation['path']}"
        elif op == "remove":
            del parent[key]
        elif op == "add" and isinstance(parent, list):
            parent.insert(len(parent) if key == "-" else key, copy.deepcopy(operation["value"]))
        elif op in ("add", "replace"):
            parent[key] = copy.deepcopy(operation["value"])
        else:
            raise AssertionError(f"k8s/ uses a JSON patch op this renderer does not know: {op}")


def render(directory: Path) -> list[Doc]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, (
        "k8s/ uses a kustomize feature this renderer does not know"
    )
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        if isinstance(patch, list):  # a JSON patch, applied to the entry's target
            kind, name = entry["target"]["kind"], entry["target"]["name"]
        else:
            kind, name = patch["kind"], patch["metadata"]["name"]
        (target,) = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
        if isinstance(patch, list):
            _json_patch(target, patch)
        elif patch.get("$patch") == "delete":
            docs.remove(target)
        else:
            _merge(target, {key: value for key, value in patch.items() if key != "metadata"})
    return docs


def _by_identity(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


# --- the checks -----------------------------------------------------------------------------


def _kubernetes_problems(doc: Doc, where: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where}: {str(error).splitlines()[0]}"]
    return []


def _pod_template_problems(template: Doc, where: str) -> list[str]:
    pod_template = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "check"},
        "template": template,
    }
    return _kubernetes_problems(pod_template, where)


def _serve_config_problems(text: str, serve_config: Path) -> list[str]:
    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as error:
        return [f"serveConfigV2 is not a Serve config: {str(error).splitlines()[0]}"]
    problems = []
    for application in config.applications:
        try:
            parse_args(application.args)
        except InvalidArgs as error:
            problems.append(f"serveConfigV2 application {application.name}: {error}")
    if yaml.safe_load(text) != yaml.safe_load(serve_config.read_text()):
        problems.append(f"serveConfigV2 differs from {serve_config.relative_to(REPO)}")
    return problems


def _images(cluster: Doc) -> list[str]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [
        container["image"]
        for group in groups
        for container in group["template"]["spec"]["containers"]
    ]


def _rayservice_problems(doc: Doc, serve_config: Path) -> list[str]:
    problems = [
        f"RayService {'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in RAYSERVICE_VALIDATOR.iter_errors(doc)
    ]
    spec = doc.get("spec", {})
    problems += _serve_config_problems(spec.get("serveConfigV2", ""), serve_config)
    cluster = spec.get("rayClusterConfig", {})
    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {cluster.get('rayVersion')} is not {ray.__version__}")
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling is not true")
    head = cluster.get("headGroupSpec", {})
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('the head must run no model: rayStartParams num-cpus "0"')
    groups = {"head": head} | {
        f"worker group {group.get('groupName')}": group
        for group in cluster.get("workerGroupSpecs", [])
    }
    for name, group in groups.items():
        for key, value in group.get("rayStartParams", {}).items():
            if not isinstance(value, str):
                problems.append(f"{name}: rayStartParams {key} must be a string")
        if "template" in group:
            problems += _pod_template_problems(group["template"], f"{name} pod template")
    try:
        images = _images(cluster)
    except (KeyError, TypeError):
        images = []
    for image in images:
        if not image.endswith(f"-ray{ray.__version__}"):
            problems.append(f"image {image} is not tagged for Ray {ray.__version__}")
    return problems


def manifest_problems(docs: list[Doc], serve_config: Path = GPU_CONFIG) -> list[str]:
    problems = []
    for doc in docs:
        if doc.get("kind") == "RayService":
            problems += _rayservice_problems(doc, serve_config)
        else:
            where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            problems += _kubernetes_problems(doc, where)
    return problems


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda path: path.name)
def test_manifests_validate(overlay):
    assert manifest_problems(render(overlay), SERVE_CONFIGS[overlay.name]) == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda path: path.name)
def test_rendering_matches_kustomize(overlay):
    output = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True
    ).stdout
    assert _by_identity(list(yaml.safe_load_all(output))) == _by_identity(render(overlay))


def test_the_crd_is_kuberays_v1_7_0():
    assert hashlib.sha256(CRD.read_bytes()).hexdigest() == CRD_SHA256
    assert "rayservices.ray.io" in CRD.read_text()[:2000]


def test_gpu_workers_scale_with_the_generator():
    (service,) = [doc for doc in render(K8S / "base") if doc["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    (gpu,) = cluster["workerGroupSpecs"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (model,) = parse_args(serve_config["applications"][0]["args"]).models
    generator = model.deployment
    autoscaling = generator["autoscaling_config"]
    # One generator replica per GPU pod: the pods must be able to hold the most replicas.
    assert generator["ray_actor_options"]["num_gpus"] == 1
    assert gpu["minReplicas"] <= autoscaling["min_replicas"]
    assert gpu["maxReplicas"] >= autoscaling["max_replicas"]


def test_ha_variant_keeps_gcs_state_in_redis():
    docs = _by_identity(render(K8S / "ha"))
    options = docs[("RayService", "image-service")]["spec"]["rayClusterConfig"][
        "gcsFaultToleranceOptions"
    ]
    host, _, port = options["redisAddress"].partition(":")
    service = docs[("Service", host)]
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert ("Deployment", host) in docs


def _containers(service: Doc) -> dict[str, tuple[Doc, Doc]]:
    """Each pod group's (pod spec, its one container), by group."""
    cluster = service["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]} | {
        group["groupName"]: group for group in cluster["workerGroupSpecs"]
    }
    pods = {}
    for name, group in groups.items():
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        pods[name] = (spec, container)
    return pods


def test_video_variant_runs_video_replicas_on_their_own_workers_with_the_jobs_redis():
    docs = _by_identity(render(K8S / "videos"))
    service = docs[("RayService", "image-service")]
    pods = _containers(service)
    assert set(pods) == {"head", "gpu", "video"}
    # Serve builds the application on any node, and every pod may run an ingress: each
    # has the jobs' Redis URL, after the password it is made of.
    for name, (_, container) in pods.items():
        names = [variable["name"] for variable in container["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("IMAGE_SERVICE_VIDEO_REDIS_URL"), name
        (url,) = [v["value"] for v in container["env"] if v["name"].endswith("VIDEO_REDIS_URL")]
        host = url.split("@")[1].split(":")[0]
        assert ("Service", host) in docs
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (video,) = parse_args(serve_config["applications"][0]["args"]).videos.models
    actor = video.deployment["ray_actor_options"]
    group = next(
        group
        for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if group["groupName"] == "video"
    )
    # Only the video group offers the resource the video replicas ask for, one per pod.
    (resource,) = actor["resources"]
    assert yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"])) == {resource: 1}
    assert actor["num_gpus"] == 1
    assert group["maxReplicas"] >= video.deployment["autoscaling_config"]["max_replicas"]
    (_, container) = pods["video"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]


def test_object_storage_variant_keeps_images_in_a_bucket_with_no_shared_volume():
    docs = _by_identity(render(K8S / "object-storage"))
    assert ("PersistentVolumeClaim", "image-service-shared") not in docs
    assert ("PersistentVolumeClaim", "image-service-models") in docs  # weights still shared
    service = docs[("RayService", "image-service")]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    storage = parse_args(serve_config["applications"][0]["args"]).storage
    assert storage.s3 is not None and storage.directory is None
    for name, (spec, container) in _containers(service).items():
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes", [])
            if "persistentVolumeClaim" in v
        ]
        assert "image-service-shared" not in claims, name
        assert "IMAGE_SERVICE_CACHE" not in {env["name"] for env in container.get("env", [])}
        # Credentials reach every pod an ingress replica may run in, from the environment.
        assert {"secretRef": {"name": "image-service-object-store", "optional": True}} in (
            container["envFrom"]
        ), name
    # The rest is the base's.
    (base,) = [doc for doc in render(K8S / "base") if doc["kind"] == "RayService"]
    assert _containers(base)["gpu"][1]["resources"] == _containers(service)["gpu"][1]["resources"]


def test_parallel_variant_fits_one_replicas_ranks_in_one_pod():
    """A parallel replica's bundles are placed STRICT_PACK, on one node: a worker pod must
    hold all of its GPUs, and the group enough pods for the most replicas."""
    config = yaml.safe_load(SERVE_CONFIGS["parallel"].read_text())
    (model,) = parse_args(config["applications"][0]["args"]).models
    assert model.parallel is not None
    options = model.deployment_options()
    bundles = options["placement_group_bundles"]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert len(bundles) == model.parallel.world_size
    assert all(bundle["GPU"] == 1 for bundle in bundles)  # one GPU per rank
    service = _rayservice(render(K8S / "parallel"))
    (gpu,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = gpu["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    # Exactly one replica's ranks per pod: fewer GPUs and no replica fits on a node, more
    # and the rest sit idle (a second replica would need a whole second set).
    assert int(resources["limits"]["nvidia.com/gpu"]) == model.parallel.world_size
    assert int(resources["limits"]["cpu"]) >= sum(bundle["CPU"] for bundle in bundles)
    autoscaling = options["autoscaling_config"]
    assert gpu["minReplicas"] <= autoscaling["min_replicas"]
    assert gpu["maxReplicas"] >= autoscaling["max_replicas"]


def test_the_overlays_json_patch_refuses_a_base_whose_lists_moved():
    """Its `test` ops stop it from removing the wrong element of a changed base's list."""
    service = _rayservice(render(K8S / "base"))
    (head, _) = _containers(service)["head"]
    head["containers"][0]["env"].insert(0, {"name": "EXTRA", "value": "1"})
    patch = yaml.safe_load((K8S / "object-storage/object-store-credentials.yaml").read_text())
    with pytest.raises(AssertionError, match="patch test failed"):
        _json_patch(service, patch)


def test_dockerfile_builds_on_rays_image_of_the_installed_version():
    dockerfile = (K8S / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base)


def test_dockerfile_python_is_one_the_project_supports():
    # `asyncio.timeout_at` is on the request path: Python 3.11 at least.
    dockerfile = (K8S / "Dockerfile").read_text()
    (minor,) = re.findall(r"^FROM rayproject/ray:\S+-py3(\d+)-", dockerfile, flags=re.MULTILINE)
    pyproject = tomllib.loads((K8S.parent / "pyproject.toml").read_text())
    required = re.fullmatch(r">=3\.(\d+)", pyproject["project"]["requires-python"])
    assert required is not None and int(minor) >= int(required.group(1)) >= 11


def _rayservice(docs: list[Doc]) -> Doc:
    (service,) = [doc for doc in docs if doc["kind"] == "RayService"]
    return service


def _break_serve_config(docs: list[Doc], change) -> None:
    spec = _rayservice(docs)["spec"]
    config = yaml.safe_load(spec["serveConfigV2"])
    change(config)
    spec["serveConfigV2"] = yaml.safe_dump(config)


BREAKAGES = {
    "rayStartParams number": lambda docs: _rayservice(docs)["spec"]["rayClusterConfig"][
        "headGroupSpec"
    ]["rayStartParams"].update({"num-cpus": 0}),
    "misspelt field": lambda docs: _rayservice(docs)["spec"]["rayClusterConfig"].update(
        {"enableInTreeAutoscalling": True}
    ),
    "worker group without a name": lambda docs: _rayservice(docs)["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ][0].pop("groupName"),
    "other Ray version": lambda docs: _rayservice(docs)["spec"]["rayClusterConfig"].update(
        {"rayVersion": "2.9.0"}
    ),
    "bad pod template": lambda docs: _rayservice(docs)["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ][0]["template"]["spec"]["containers"][0].update({"limit": {"cpu": "1"}}),
    "bad built-in object": lambda docs: next(
        doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"
    )["spec"].update({"accessModes": "ReadWriteMany"}),
    "unknown args key": lambda docs: _break_serve_config(
        docs, lambda config: config["applications"][0]["args"].update({"modle": {}})
    ),
    "not a Serve config": lambda docs: _break_serve_config(
        docs, lambda config: config.update({"applications": "images"})
    ),
    "drift from config/": lambda docs: _break_serve_config(
        docs, lambda config: config.update({"proxy_location": "HeadOnly"})
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_a_broken_manifest_is_caught(breakage):
    docs = render(K8S / "base")
    BREAKAGES[breakage](docs)
    assert manifest_problems(docs), f"{breakage} went unnoticed"
