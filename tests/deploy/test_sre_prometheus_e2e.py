"""End-to-end SRE check: a real Prometheus server scrapes a real service and runs our rules.

`uvicorn --factory service.app:app_from_env` (real Redis, tiny exported model) and
Debian's `/usr/bin/prometheus` (scrape and rule evaluation every 1 s, the project's rule
files from deploy/prometheus/rules/) on loopback ports. After a few seconds of traffic
(events, warm /rank answers, some degraded `partial_state` ones) Prometheus' HTTP API
must give a finite p99 of the request duration, a degraded counter that has seen at
least the degraded answers the client got, the model info, the project's rule groups
loaded and evaluating without errors, and none of the "broken service" alerts active.

Every wait is bounded; nothing asserts on latency beyond "a finite value within the
histogram's 1 s range". Both processes are stopped in `finally` blocks.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from e2e.uvicorn_proc import Service, service_env
from svc_helpers import seed_sequence, wait_until

from service.store.embedded_redis import free_port

from .conftest import load_yaml_docs
from .test_deploy_prometheus import PROM, RULES
from .test_live_metrics import events

JOB = "ifa-rank"  # the job name the rules select on
PROMETHEUS_INSTALL = "apt-get install -y --no-install-recommends prometheus"
CANDS = [1, 5, 9, 13, 60, 61]
WARM_USERS = [f"sre-warm-{i}" for i in range(4)]
COLD_USERS = [f"sre-cold-{i}" for i in range(3)]
# Alerts that mean "the service is broken", which a healthy run must never activate
# (not even pending: they are all inactive once the first scrape has been evaluated).
MUST_STAY_INACTIVE = {
    "IfaModelNotLoaded",
    "IfaInstanceModelMissing",
    "IfaRankTargetDown",
    "IfaRankServerErrors",
    "IfaRankRedisUnreachable",
    "IfaRankShedding",
    "IfaModelVersionSkew",
}
P99 = "histogram_quantile(0.99, sum by (le) (rate(ifa_rank_request_duration_seconds_bucket[30s])))"


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if path is None:
        pytest.fail(
            "the Prometheus server binary `prometheus` is not on PATH. It ships with "
            f"Debian's `prometheus` package: `{PROMETHEUS_INSTALL}` (as root; .ci/run "
            "installs it when absent).",
            pytrace=False,
        )
    return path


def wait_for(
    what: str, predicate: Callable[[], Any], timeout_s: float, log: Callable[[], str]
) -> Any:
    """wait_until with HTTP errors counted as "not yet" and the logs on a timeout."""
    return wait_until(
        predicate, timeout_s, 0.25, what=what, tolerate=(httpx.HTTPError,), detail=log
    )


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.data = workdir / "data"
        self.log_path = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULES],
            "scrape_configs": [
                {"job_name": JOB, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
            ],
        }  # fmt: skip
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, binary: str) -> Prometheus:
        cmd = [
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.data}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200

        wait_for("prometheus ready", ready, 60, self.log)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The value of a one-element vector result (None when empty)."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


class Traffic:
    """Counts what the client saw: answers by `degraded` value, status codes."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        self.degraded: list[str] = []
        self.statuses: list[int] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def rank(self, user: str, **extra: Any) -> dict[str, Any] | None:
        r = self.client.post("/rank", json={"user_id": user, "candidates": CANDS, **extra})
        with self.lock:
            self.statuses.append(r.status_code)
            if r.status_code != 200:
                return None
            body: dict[str, Any] = r.json()
            if body["degraded"] is not None:
                self.degraded.append(body["degraded"])
        return body

    def background(self, stop: threading.Event) -> None:
        """Warm answers at a gentle pace, so the 30 s rate window always has samples."""
        try:
            i = 0
            while not stop.wait(0.1):
                self.rank(WARM_USERS[i % len(WARM_USERS)])
                i += 1
        except BaseException as e:  # reported by the test, not as a thread warning
            self.errors.append(e)


@pytest.fixture
def service(redis_url: str, tiny_artifacts: Path, tmp_path: Path) -> Iterator[Service]:
    for i, user in enumerate(COLD_USERS):
        seed_sequence(redis_url, user, 5_000, seed=10 + i)
    svc = Service(service_env(redis_url, tiny_artifacts), tmp_path / "service.log")
    try:
        yield svc.start()
    finally:
        svc.stop()


@pytest.fixture
def prometheus_bin() -> str:
    """Checked before the service starts: a missing binary fails at once."""
    return prometheus_binary()


def test_prometheus_scrapes_the_service_and_evaluates_the_rules(
    prometheus_bin: str, service: Service, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{service.port}"
    (tmp_path / "prometheus").mkdir()
    prom = Prometheus(tmp_path / "prometheus", target)
    stop = threading.Event()
    traffic = Traffic(service.base_url)
    bg = threading.Thread(target=traffic.background, args=(stop,), daemon=True)
    try:
        prom.start(prometheus_bin)

        def logs() -> str:
            return f"--- prometheus\n{prom.log()}\n--- service\n{service.log()[-3000:]}"

        # Traffic: events, warm answers, and a cold user with a budget nothing fits in
        # (degraded "partial_state") followed by a generous one (shares the build) each.
        for i, user in enumerate(WARM_USERS):
            r = traffic.client.post("/events", json={"user_id": user, "events": events(20, i)})
            assert r.status_code == 200, r.text
        for user in COLD_USERS:
            traffic.rank(user, budget_ms=0.001)
            traffic.rank(user, budget_ms=60_000)
        t_end = time.monotonic() + 4
        i = 0
        while time.monotonic() < t_end:
            traffic.rank(WARM_USERS[i % len(WARM_USERS)])
            i += 1
        with traffic.lock:
            degraded_seen = len(traffic.degraded)
            statuses = set(traffic.statuses)
        assert degraded_seen > 0, "no degraded answer produced; see docs/service.md's ladder"
        assert statuses <= {200, 503}, statuses  # 503: an overload rejection, not an error
        bg.start()

        # The target is up and the service's series are in the TSDB.
        wait_for("target up", lambda: prom.scalar(f'up{{job="{JOB}"}}') == 1, 40, logs)
        targets = prom.api("targets", state="active")["activeTargets"]
        assert [(t["labels"]["job"], t["scrapeUrl"]) for t in targets] == [
            (JOB, f"http://{target}/metrics")
        ], targets

        # Every degraded answer the client saw has been counted and scraped.
        degraded = wait_for(
            "degraded counter scraped",
            lambda: (
                (v := prom.scalar("sum(ifa_rank_degraded_total)")) is not None
                and v >= degraded_seen
                and v
            ),
            40,
            logs,
        )
        assert degraded >= degraded_seen > 0
        assert (prom.scalar('sum(ifa_rank_degraded_total{reason="partial_state"})') or 0) >= 1

        # p99 of the request duration over 30 s: a finite number within the 1 s histogram.
        p99 = wait_for(
            "p99 computable",
            lambda: (v := prom.scalar(P99)) is not None and math.isfinite(v) and v,
            40,
            logs,
        )
        assert 0 < p99 <= 1.0, p99

        # The model being served, as the dashboard and IfaModelNotLoaded see it.
        (info,) = prom.query("ifa_model_info")
        assert info["metric"]["job"] == JOB and info["metric"]["instance"] == target
        assert info["metric"]["version"] == "v1" and info["metric"]["provider"], info
        assert float(info["value"][1]) == 1

        # The project's rule groups are loaded, every rule evaluates without error, and
        # the "service is broken" alerts are inactive once real samples were evaluated.
        want_groups = {
            g["name"]: len(g["rules"]) for path in RULES for g in load_yaml_docs(path)[0]["groups"]
        }
        assert want_groups and all(str(p).startswith(str(PROM)) for p in RULES)

        def rules_settled() -> dict[str, dict[str, Any]] | None:
            groups = prom.api("rules")["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"]}
            alerting = {n for n, r in rules.items() if r["type"] == "alerting"}
            assert alerting >= MUST_STAY_INACTIVE, sorted(MUST_STAY_INACTIVE - alerting)
            evaluated = all(
                not r.get("lastEvaluation", "").startswith("0001-") for r in rules.values()
            )
            inactive = all(rules[a]["state"] == "inactive" for a in MUST_STAY_INACTIVE)
            got = {g["name"]: len(g["rules"]) for g in groups}
            assert got == want_groups, got
            return rules if evaluated and inactive else None

        rules = wait_for("rules evaluated, broken-service alerts inactive", rules_settled, 40, logs)
        unhealthy = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
        assert not unhealthy, unhealthy
        firing = [
            a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"
        ]
        assert not firing, firing  # every alert has a `for:` or needs errors: none can fire
        # Recording rules produce series from the live data (their group runs every 15 s).
        wait_for(
            "recording rule output",
            lambda: (prom.scalar(f'ifa:rank_requests:rate5m{{job="{JOB}"}}') or 0) > 0,
            40,
            logs,
        )

        stop.set()
        bg.join(30)
        assert not traffic.errors, traffic.errors
        assert set(traffic.statuses) <= {200, 503}, sorted(set(traffic.statuses))
    finally:
        stop.set()
        if bg.is_alive():
            bg.join(30)
        traffic.client.close()
        prom.stop()
