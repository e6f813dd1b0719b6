"""deploy/compose.yaml (+ the GPU override): the stack that `docker compose up` starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import DEPLOY, load_yaml_docs
from .test_deploy_docker import parse_dockerfile


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(DEPLOY / "compose.yaml")
    return doc


@pytest.fixture(scope="module")
def gpu_override() -> dict[str, Any]:
    (doc,) = load_yaml_docs(DEPLOY / "compose.gpu.yaml")
    return doc


def _bind_sources(service: dict[str, Any]) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        src, dest, *_ = volume.split(":")
        if src.startswith((".", "/")):
            out.append(((DEPLOY / src).resolve(), dest))
    return out


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "ifa-rank", "prometheus", "grafana"}


def test_redis_aof_and_healthcheck(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in redis["volumes"]), "AOF must live on a volume"


def test_service(compose: dict[str, Any], env_names: set[str]) -> None:
    svc = compose["services"]["ifa-rank"]
    env = svc["environment"]
    assert env["IFA_REDIS_URL"] == "redis://redis:6379/0"
    unknown = {k for k in env if k.startswith("IFA_")} - env_names
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    assert "8000:8000" in svc["ports"]
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    dests = {dest for _, dest in _bind_sources(svc)}
    assert env["IFA_ARTIFACTS_DIR"] in dests, (
        "artifacts volume must be mounted where settings point"
    )
    assert any(v.endswith(":/app/artifacts:ro") for v in svc["volumes"]), (
        "mount artifacts read-only"
    )
    build = svc["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()
    _, stages = parse_dockerfile()
    assert build["target"] in {s.name for s in stages}


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for src, _ in _bind_sources(compose["services"][name]):
            assert src.exists(), f"{name}: {src} missing"


def test_prometheus_gets_config_and_rules(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    dests = {dest for _, dest in _bind_sources(prom)}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/rules"} <= dests
    (config,) = load_yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ifa-rank"]
    assert job["static_configs"][0]["targets"] == ["ifa-rank:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    graf = compose["services"]["grafana"]
    dests = {dest for _, dest in _bind_sources(graf)}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= dests


def test_gpu_override(gpu_override: dict[str, Any], compose: dict[str, Any]) -> None:
    svc = gpu_override["services"]["ifa-rank"]
    assert set(gpu_override["services"]) <= set(compose["services"])
    assert svc["build"]["target"] == "gpu"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_cluster_override(compose: dict[str, Any], env_names: set[str]) -> None:
    """compose.cluster.yaml: six nodes made one cluster (3 primaries + a replica each) by
    a one-shot job the service waits for; the service told one node and cluster mode."""
    (doc,) = load_yaml_docs(DEPLOY / "compose.cluster.yaml")
    services = doc["services"]
    nodes = sorted(n for n in services if n.startswith("redis-node-"))
    assert len(nodes) == 6
    for name in nodes:
        node = services[name]
        args = [*node["entrypoint"], *node["command"]]
        flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        assert args[0] == "redis-server" and flag["--cluster-enabled"] == "yes"
        assert flag["--cluster-require-full-coverage"] == "no"
        assert flag["--cluster-announce-hostname"] == node["hostname"] == name
        assert flag["--appendonly"] == "yes" and any(v.endswith(":/data") for v in node["volumes"])
        assert name in doc["volumes"]
    init = services["redis-cluster-init"]
    script = " ".join(init["command"])
    assert all(f"{n}:6379" in script for n in nodes) and "--cluster-replicas 1" in script
    assert set(init["depends_on"]) == set(nodes)
    svc = services["ifa-rank"]
    env = svc["environment"]
    assert env["IFA_REDIS_CLUSTER"] == "true"
    assert env["IFA_REDIS_URL"].split("//")[1].split(":")[0] in nodes
    assert not {k for k in env if k.startswith("IFA_")} - env_names
    assert int(env["IFA_EVENTS_WAIT_MS"]) < 50  # below IFA_REDIS_TIMEOUT_MS's default
    assert svc["depends_on"]["redis-cluster-init"]["condition"] == (
        "service_completed_successfully"
    )
    assert set(doc["services"]) - set(nodes) <= {"redis-cluster-init", *compose["services"]}
