"""deploy/k8s: parsed and checked where it matters (probes, ports, env, GPU, drain, scaling)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from .conftest import DEPLOY, ROOT, load_yaml_docs

K8S = DEPLOY / "k8s"
PORT = 8000
ROUTES = {"/healthz", "/readyz"}


def _all_docs() -> dict[Path, list[dict[str, Any]]]:
    return {p: load_yaml_docs(p) for p in sorted(K8S.rglob("*.yaml"))}


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, for the files the kustomization applies."""
    (kust,) = load_yaml_docs(K8S / "kustomization.yaml")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for res in kust["resources"]:
        for doc in load_yaml_docs(K8S / res):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"duplicate {key}"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def deployment(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return objects[("Deployment", "ifa-rank")]


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_every_manifest_parses_and_is_typed() -> None:
    docs = _all_docs()
    assert len(docs) >= 9
    for path, items in docs.items():
        assert items, f"{path} is empty"
        for doc in items:
            if path.name == "prometheus-adapter-rules.yaml":
                assert doc["rules"][0]["name"]["as"] == "ifa_inflight_requests"
                continue
            assert "apiVersion" in doc and "kind" in doc, path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path


def test_kustomization(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    (kust,) = load_yaml_docs(K8S / "kustomization.yaml")
    assert kust["namespace"] == "ifa"
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    assert "secret.example.yaml" not in kust["resources"], "never apply the example secret"
    kinds = {kind for kind, _ in objects}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    } <= kinds


def test_image_and_port(container: dict[str, Any]) -> None:
    assert "ifa-rank" in container["image"]
    assert not container["image"].endswith(":latest")
    assert container["ports"] == [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
    assert container["args"] == ["ifa-rank", "serve", "--host", "0.0.0.0", "--port", str(PORT)]


def _probe_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(match)


def test_probes(container: dict[str, Any]) -> None:
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    for name, probe in probes.items():
        get = probe["httpGet"]
        assert get["path"] in ROUTES, f"{name} path {get['path']}"
        assert _probe_port(container, get["port"]) == PORT, name
        assert probe["timeoutSeconds"] >= 1
    # liveness must not depend on Redis; readiness does (model loaded + Redis answers)
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for model load"


def test_resources_include_gpu(container: dict[str, Any]) -> None:
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    for key in ("cpu", "memory"):
        assert key in res["requests"], key
    assert "memory" in res["limits"]


def _sleep_seconds(container: dict[str, Any]) -> int:
    pre = container["lifecycle"]["preStop"]
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    assert cmd[0] == "sleep"
    return int(cmd[1])


def test_drain_and_grace_period(
    deployment: dict[str, Any],
    container: dict[str, Any],
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = deployment["spec"]["template"]["spec"]
    pre_stop = _sleep_seconds(container)
    assert pre_stop >= 5, "give endpoint removal time to propagate"
    budget_s = (
        int(objects[("ConfigMap", "ifa-rank-config")]["data"]["IFA_DEFAULT_BUDGET_MS"]) / 1000
    )
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > pre_stop + budget_s + 5, "grace must cover preStop + the longest budget + drain"
    # and uvicorn's own graceful-shutdown timeout, when the service sets one
    serve = ROOT / "service" / "commands.py"
    if serve.is_file():
        match = re.search(r"timeout_graceful_shutdown\s*=\s*(\d+)", serve.read_text())
        if match:
            assert grace >= pre_stop + int(match.group(1)) + 5, "SIGKILL would cut the drain"
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_env_names_are_settings(
    container: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]], env_names: set[str]
) -> None:
    config = objects[("ConfigMap", "ifa-rank-config")]["data"]
    unknown = set(config) - env_names
    assert not unknown, f"ConfigMap keys that are not Settings fields: {sorted(unknown)}"
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values are strings"
    assert "IFA_ADMIN_TOKEN" not in config, "the token belongs in a Secret"
    assert config["IFA_REDIS_URL"].startswith(("redis://", "rediss://"))
    assert "localhost" not in config["IFA_REDIS_URL"]
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == ["ifa-rank-config"]
    env = {e["name"]: e for e in container.get("env", [])}
    unknown = {n for n in env if n.startswith("IFA_")} - env_names
    assert not unknown, f"env entries that are not Settings fields: {sorted(unknown)}"
    token = env["IFA_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["name"] == "ifa-rank-admin"
    (example,) = load_yaml_docs(K8S / "secret.example.yaml")
    assert example["kind"] == "Secret" and token["key"] in example["stringData"]


def test_pod_security_and_spread(deployment: dict[str, Any], container: dict[str, Any]) -> None:
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys
    assert spec["affinity"]["podAntiAffinity"]
    # a read-only root needs writable scratch where the app writes
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/app/var"} <= mounts


def test_selectors_line_up(
    objects: dict[tuple[str, str], dict[str, Any]], deployment: dict[str, Any]
) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    sel = deployment["spec"]["selector"]["matchLabels"]
    assert sel.items() <= pod_labels.items()
    svc = objects[("Service", "ifa-rank")]["spec"]
    assert svc["selector"].items() <= pod_labels.items()
    (port,) = svc["ports"]
    assert port["targetPort"] in ("http", PORT)
    pdb = objects[("PodDisruptionBudget", "ifa-rank")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in pdb or "minAvailable" in pdb


def _check_hpa(hpa: dict[str, Any]) -> None:
    spec = hpa["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ifa-rank",
    }
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]


def test_hpa_cpu(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    hpa = objects[("HorizontalPodAutoscaler", "ifa-rank")]
    _check_hpa(hpa)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_hpa_custom_metric_variant_replaces_the_cpu_one(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (hpa,) = load_yaml_docs(K8S / "custom-metrics" / "hpa-inflight.yaml")
    _check_hpa(hpa)
    assert (
        hpa["metadata"]["name"]
        == objects[("HorizontalPodAutoscaler", "ifa-rank")]["metadata"]["name"]
    )
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods[0]["metric"]["name"] == "ifa_inflight_requests"
    inflight_limit = int(objects[("ConfigMap", "ifa-rank-config")]["data"]["IFA_MAX_INFLIGHT"])
    assert float(pods[0]["target"]["averageValue"]) < inflight_limit, "scale before shedding"
