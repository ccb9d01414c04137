"""The Kubernetes manifests, offline: every overlay renders with kustomize and every object validates against the
Kubernetes 1.32 API schemas (strict: unknown fields are errors); the rendered values are the repository's own
(experiments, models and versions, batch settings, pinned versions); and TorchServe, which runs with token
authorization off in the cluster, is reachable only from the router's pods. Nothing here runs on a cluster."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from router.config import DATABASE_URL_ENV, POSTGRESQL, load_config, parse_config
from serving import manifests
from serving.models_file import DEFAULT_MODELS_FILE, read_models
from serving.project import MODEL_CONFIGS, REPO, mar_file_name
from serving.ts_config import SNAPSHOT_KEYS, allowed_urls, read_properties

K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
OVERLAYS = ("demo", "production")
KUBERNETES_VERSION = "1.32.0"
KUBECTL = shutil.which("kubectl")
# TorchServe's listeners that would answer anyone once token authorization is off (7071 stays on loopback).
GUARDED_PORTS = {8080, 8081, 7070}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")

Objects = list[dict[str, Any]]


def render_tree(root: Path, sources: manifests.Sources | None = None) -> Path:
    """A copy of deploy/k8s with its generated/ folder rendered from `sources` (default: the repository's files),
    so the real generated/ folder stays as it is."""
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("generated"))
    manifests.render(root / "base" / "generated", sources or manifests.Sources())
    return root


def kustomize(overlay: Path) -> Objects:
    assert KUBECTL is not None
    result = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Objects]:
    root = render_tree(tmp_path_factory.mktemp("k8s") / "k8s")
    return {overlay: kustomize(root / "overlays" / overlay) for overlay in OVERLAYS}


def find(objects: Objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Objects of `kind`; `name` matches the name kustomize gave (generated ConfigMaps carry a hash suffix)."""
    return [obj for obj in objects if obj["kind"] == kind and
            (name is None or re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", obj["metadata"]["name"]))]


def one(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(objects: Objects) -> Iterator[dict[str, Any]]:
    yield from (obj for obj in objects if obj["kind"] in ("Deployment", "StatefulSet"))


def mounted_config_maps(workload: dict[str, Any]) -> set[str]:
    return {volume["configMap"]["name"] for volume in workload["spec"]["template"]["spec"].get("volumes", [])
            if "configMap" in volume}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "these checks read matchLabels only"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def config_map_file(objects: Objects, name: str, key: str) -> str:
    return str(one(objects, "ConfigMap", name)["data"][key])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_api_schemas(rendered: dict[str, Objects], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "Namespace"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises on any schema error
    namespace = one(objects, "Namespace", {"demo": "torchserve-kit-demo", "production": "torchserve-kit"}[overlay])
    assert all(obj["metadata"].get("namespace") == namespace["metadata"]["name"]
               for obj in objects if obj["kind"] != "Namespace")


def test_the_router_configmap_has_the_repositorys_experiments(rendered: dict[str, Objects]) -> None:
    repo = load_config(REPO / "router" / "experiments.yaml")
    for objects in rendered.values():
        cluster = parse_config(yaml.safe_load(config_map_file(objects, "router-experiments", "experiments.yaml")))
        assert cluster.experiments == repo.experiments
        assert cluster.experiments_digest == repo.experiments_digest  # replicas share overrides with these
        assert (cluster.sticky_header, cluster.override_header) == (repo.sticky_header, repo.override_header)
        assert (cluster.timeouts, cluster.circuit_breaker) == (repo.timeouts, repo.circuit_breaker)
        assert cluster.listen.host == "0.0.0.0"
        assert cluster.store.backend == POSTGRESQL and cluster.store.url_env == DATABASE_URL_ENV
        # TorchServe from its headless Service, on the ports the Service has.
        assert cluster.torchserve.hosts == () and cluster.torchserve.resolve is not None
        service = one(objects, "Service", cluster.torchserve.resolve.name)
        assert service["spec"]["clusterIP"] == "None"
        ports = {port["port"] for port in service["spec"]["ports"]}
        resolve = cluster.torchserve.resolve
        assert {resolve.inference_port, resolve.management_port, resolve.grpc_port} <= ports
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(one(objects, "Deployment",
                                                                                    "torchserve")))
        # The router's pods: the file mounted where they read it, the URL and tokens from Secrets, its ports.
        router = one(objects, "Deployment", "router")
        container = router["spec"]["template"]["spec"]["containers"][0]
        assert "/etc/router/experiments.yaml" in container["args"]
        env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
        assert set(env) == {"ROUTER_CLIENT_TOKEN", "ROUTER_ADMIN_TOKEN", cluster.store.url_env}
        assert {port["containerPort"] for port in container["ports"]} == {cluster.listen.rest_port,
                                                                          cluster.listen.grpc_port}
        assert router["spec"]["replicas"] >= 2
        # Locust reaches the router through its Service, with the same experiments.
        seen_by_locust = parse_config(yaml.safe_load(config_map_file(objects, "locust-router", "router.yaml")))
        assert seen_by_locust.experiments == repo.experiments
        router_service = one(objects, "Service", seen_by_locust.listen.host)
        assert {port["port"] for port in router_service["spec"]["ports"]} == {cluster.listen.rest_port,
                                                                              cluster.listen.grpc_port}


def test_the_torchserve_configmap_loads_exactly_the_declared_models(rendered: dict[str, Objects]) -> None:
    entries = read_models(DEFAULT_MODELS_FILE)
    for objects in rendered.values():
        properties = read_properties(config_map_file(objects, "torchserve-config", "config.properties"))
        assert properties["disable_token_authorization"] == "true"
        assert properties["enable_model_api"] == "false"
        assert properties["model_store"] == str(manifests.POD_MODEL_STORE)
        assert properties["allowed_urls"] == allowed_urls(manifests.POD_MODEL_STORE)
        assert properties["grpc_management_address"] == "127.0.0.1"
        snapshot = json.loads(properties["model_snapshot"])
        assert {name: set(versions) for name, versions in snapshot["models"].items()} == {
            entry.name: set(entry.versions) for entry in entries}
        assert snapshot["modelCount"] == sum(len(entry.versions) for entry in entries)
        for entry in entries:
            settings = yaml.safe_load((MODEL_CONFIGS / f"{entry.variant}.yaml").read_text())
            for version in entry.versions:
                rendered_version = snapshot["models"][entry.name][version]
                assert rendered_version["defaultVersion"] == (version == entry.default)
                assert rendered_version["marName"] == mar_file_name(entry.name, version)
                assert {key: rendered_version[key] for key in SNAPSHOT_KEYS} == {key: settings[key]
                                                                                for key in SNAPSHOT_KEYS}
        # The pods mount it where TorchServe is told to read it, and the image puts the archives in that store.
        torchserve = one(objects, "Deployment", "torchserve")
        container = torchserve["spec"]["template"]["spec"]["containers"][0]
        config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")["mountPath"]
        assert f"{config_mount}/config.properties" in container["args"]
    dockerfile = (DOCKER / "torchserve.Dockerfile").read_text()
    assert f"COPY --chown=10001:10001 model_store/*.mar {manifests.POD_MODEL_STORE}/" in dockerfile


# Measured by `python -m loadtest.pod_memory` on `make serve`'s stack (docs/kubernetes.md): proportional set size;
# the frontend's is the larger of two runs (572 and 576 MiB).
WORKER_PSS_MIB = 336
FRONTEND_PSS_MIB = 576


def mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, f"memory quantity {quantity!r}: give it in Mi or Gi"
    return int(match[1]) * units[match[2]]


def test_the_torchserve_pod_has_the_memory_its_declared_workers_were_measured_at(
        rendered: dict[str, Objects]) -> None:
    """Every worker the rendered model snapshot loads (serving/models.yaml × handlers/model_configs/) at its
    measured size: a model added to the models file without a larger pod would be OOM-killed."""
    for objects in rendered.values():
        snapshot = json.loads(read_properties(config_map_file(objects, "torchserve-config", "config.properties"))[
            "model_snapshot"])
        workers = sum(settings["maxWorkers"] for versions in snapshot["models"].values()
                      for settings in versions.values())
        container = one(objects, "Deployment", "torchserve")["spec"]["template"]["spec"]["containers"][0]
        resources = container["resources"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"]  # Guaranteed QoS
        assert mebibytes(resources["limits"]["memory"]) >= workers * WORKER_PSS_MIB + FRONTEND_PSS_MIB, workers


def pinned(requirement_name: str) -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name, _, version = requirement.partition("==")
        if name == requirement_name:
            return version
    raise AssertionError(f"pyproject.toml pins no {requirement_name}")


def test_image_tags_are_the_versions_pinned_in_pyproject(rendered: dict[str, Objects]) -> None:
    kit_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    torch, torchserve = pinned("torch"), pinned("torchserve")
    expected = {
        "torchserve-kit/torchserve": f"{torchserve}-torch{torch}",
        "torchserve-kit/router": kit_version,
        "torchserve-kit/locust": f"{kit_version}-torch{torch}",
    }
    for objects in rendered.values():
        images = {container["image"] for workload in workloads(objects)
                  for container in workload["spec"]["template"]["spec"]["containers"]}
        kit_images = {image.rpartition(":")[0]: image.rpartition(":")[2] for image in images
                      if image.startswith("torchserve-kit/")}
        assert kit_images == expected
        assert all(re.fullmatch(r"[^:]+:[\w][\w.-]*", image) and not image.endswith(":latest") for image in images)
    arguments = {"TORCH_VERSION": torch, "TORCHVISION_VERSION": pinned("torchvision"),
                 "TORCHSERVE_VERSION": torchserve, "MODEL_ARCHIVER_VERSION": pinned("torch-model-archiver"),
                 "ONNXRUNTIME_VERSION": pinned("onnxruntime")}
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        text = dockerfile.read_text()
        assert "NOT BUILT" in text
        for name, version in re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE):
            assert arguments[name] == version, f"{dockerfile.name}: {name}"
        assert re.search(r"^USER 10001", text, re.MULTILINE), f"{dockerfile.name} must not run as root"
        tag = re.search(r"-t (torchserve-kit/\w+):(\S+)", text)
        assert tag is not None and expected[tag.group(1)] == tag.group(2)


def test_a_weight_changed_in_the_repository_changes_the_rendered_configmap(
        rendered: dict[str, Objects], tmp_path: Path) -> None:
    experiments = tmp_path / "experiments.yaml"
    original = (REPO / "router" / "experiments.yaml").read_text()
    changed = re.sub(r"(full: +\{model: fashion-full(?:-onnx)?, +version: \"1.0\", weight: )40", r"\g<1>55", original)
    assert changed != original
    experiments.write_text(changed)
    root = render_tree(tmp_path / "k8s", manifests.Sources(experiments=experiments))
    objects = kustomize(root / "overlays" / "demo")
    config_map = one(objects, "ConfigMap", "router-experiments")
    cluster = parse_config(yaml.safe_load(config_map["data"]["experiments.yaml"]))
    assert cluster.experiments["fashion"].weights["full"] == 55
    before = one(rendered["demo"], "ConfigMap", "router-experiments")["metadata"]["name"]
    assert config_map["metadata"]["name"] != before  # a new name: the router pods roll
    router = one(objects, "Deployment", "router")
    assert config_map["metadata"]["name"] in mounted_config_maps(router)


def policies_for(objects: Objects, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [policy for policy in find(objects, "NetworkPolicy") if selects(policy["spec"]["podSelector"], labels)]


def admitted_peers(policies: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """Every `from` peer some policy admits on `port` (a rule without ports admits every port; one without
    `from`, everyone: returned as an empty peer, which matches anything)."""
    peers = []
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in {entry["port"] for entry in rule["ports"]}:
                continue
            peers += rule.get("from", [{}])
    return peers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_torchserve_is_reachable_only_from_the_router(rendered: dict[str, Objects], overlay: str) -> None:
    objects = rendered[overlay]
    default_deny = [policy for policy in find(objects, "NetworkPolicy")
                    if policy["spec"]["podSelector"] == {} and policy["spec"].get("ingress", []) == []]
    assert default_deny and default_deny[0]["spec"]["policyTypes"] == ["Ingress"]
    router_labels = pod_labels(one(objects, "Deployment", "router"))
    torchserve_labels = pod_labels(one(objects, "Deployment", "torchserve"))
    policies = policies_for(objects, torchserve_labels)
    for port in GUARDED_PORTS:
        peers = admitted_peers(policies, port)
        assert peers, f"port {port}: the router must be let in"
        for peer in peers:  # a pod selector in this namespace that picks the router's pods, and only that
            assert set(peer) == {"podSelector"} and selects(peer["podSelector"], router_labels)
            assert not selects(peer["podSelector"], torchserve_labels)
    metrics = admitted_peers(policies, 8082)
    assert metrics and all(peer["podSelector"]["matchLabels"] == {"torchserve-kit/scrape-metrics": "true"}
                           for peer in metrics)
    if overlay == "demo":  # PostgreSQL: the router's pods only
        postgres = policies_for(objects, pod_labels(one(objects, "StatefulSet", "postgres")))
        peers = admitted_peers(postgres, 5432)
        assert peers and all(set(peer) == {"podSelector"} and selects(peer["podSelector"], router_labels)
                             for peer in peers)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_runs_with_token_auth_off_outside_a_networkpolicy(rendered: dict[str, Objects], overlay: str) -> None:
    """Whichever workload mounts a TorchServe config with token authorization off, the listeners that config
    opens are reachable only from the router's pods, whatever its labels are."""
    objects = rendered[overlay]
    router_labels = pod_labels(one(objects, "Deployment", "router"))
    open_configs = {}
    for config_map in find(objects, "ConfigMap"):
        for text in config_map.get("data", {}).values():
            properties = read_properties(text) if "disable_token_authorization" in text else {}
            if properties.get("disable_token_authorization") == "true":
                ports = {int(properties[key].rpartition(":")[2])
                         for key in ("inference_address", "management_address")}
                if properties.get("grpc_inference_address", "127.0.0.1") != "127.0.0.1":
                    ports.add(int(properties.get("grpc_inference_port", 7070)))
                open_configs[config_map["metadata"]["name"]] = ports
    assert open_configs, "the TorchServe config renders with token authorization off"
    users = [workload for workload in workloads(objects) if mounted_config_maps(workload) & set(open_configs)]
    assert users, "some workload runs TorchServe"
    for workload in users:
        labels = pod_labels(workload)
        ports = set().union(*(open_configs[name] for name in mounted_config_maps(workload) & set(open_configs)))
        assert ports == GUARDED_PORTS
        for port in ports:
            peers = admitted_peers(policies_for(objects, labels), port)
            assert peers, f"{workload['metadata']['name']}: no policy admits the router on {port}"
            assert all(set(peer) == {"podSelector"} and selects(peer["podSelector"], router_labels)
                       for peer in peers), f"{workload['metadata']['name']}: port {port} is open beyond the router"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_unprivileged(rendered: dict[str, Objects], overlay: str) -> None:
    for workload in workloads(rendered[overlay]):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_secrets_only_in_the_demo_and_marked_as_demo(rendered: dict[str, Objects]) -> None:
    assert find(rendered["production"], "Secret") == []
    demo_secrets = find(rendered["demo"], "Secret")
    assert {secret["metadata"]["name"].rsplit("-", 1)[0] for secret in demo_secrets} == {
        "router-tokens", "router-database", "postgres-credentials"}
    for secret in demo_secrets:
        for value in secret["data"].values():
            decoded = base64.b64decode(value).decode()
            assert decoded in ("router",) or "NOT-A-SECRET" in decoded
