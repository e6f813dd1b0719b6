"""Hot reload under load, against a real uvicorn process: repeated /admin/reload between
two versions that score differently (and to the version already served) while four
clients rank. No request fails, and every answer's scores are exactly those of the
version the answer names. Reloads to a tampered artifact, a missing version and a path
out of the artifacts directory are refused with a 4xx while the old model keeps serving."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from conftest import copy_version
from e2e.uvicorn_proc import TOKEN, Service, start_service

from ifa_common.manifest import sha256_file
from service.store.embedded_redis import RedisServer

CANDIDATES = list(range(40))
RELOADS = ["v2", "v2", "v1", "v2", "v1", "v1", "v2", "v1"]  # same and other version
REFUSED = ["v3-tampered", "v9-missing", "../../etc"]


def other_categories(root: Path, src: str, dst: str) -> None:
    """`dst`: `src` with its items' categories permuted (a consistent manifest): the same
    graphs, other candidate features, so other scores for the same request."""
    copy_version(root, src, dst)
    items = dict(np.load(root / dst / "items.npz"))
    items["category"] = np.roll(items["category"], 3)
    np.savez(root / dst / "items.npz", **items)
    manifest = json.loads((root / dst / "manifest.json").read_text())
    manifest["files"]["items.npz"] = sha256_file(root / dst / "items.npz")
    (root / dst / "manifest.json").write_text(json.dumps(manifest, indent=2))


def post(conn: http.client.HTTPConnection, path: str, body: Any, auth: bool = False) -> Any:
    headers = {"content-type": "application/json"}
    if auth:
        headers["authorization"] = f"Bearer {TOKEN}"
    conn.request("POST", path, json.dumps(body), headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null")


def scores_by_item(answer: dict[str, Any]) -> np.ndarray:
    got = {it["item_id"]: it["score"] for it in answer["items"]}
    return np.array([got[i] for i in CANDIDATES])


def test_reloads_under_load_fail_nothing_and_every_answer_names_its_scorer(
    redis_server: RedisServer, tiny_artifacts: Path, tmp_path: Path
) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, root)
    other_categories(root, "v1", "v2")
    copy_version(root, "v1", "v3-tampered")
    with (root / "v3-tampered" / "scorer.onnx").open("ab") as f:
        f.write(b"\0")  # the manifest's sha256 no longer matches
    svc: Service = start_service(redis_server, root, tmp_path / "service.log")
    user = f"reload-{time.monotonic_ns()}"
    rank = {"user_id": user, "candidates": CANDIDATES}
    answers: list[tuple[int, dict[str, Any]]] = []
    stop = threading.Event()
    try:
        admin = http.client.HTTPConnection(svc.host, svc.port, timeout=60)
        events = [
            {"item_id": i % 50, "ts": 1_700_000_000 + i, "category": i % 7} for i in range(60)
        ]
        assert post(admin, "/events", {"user_id": user, "events": events})[0] == 200
        reference: dict[str, np.ndarray] = {}
        for version in ("v2", "v1"):  # each version's answer for this user, alone
            assert post(admin, "/admin/reload", {"version": version}, auth=True)[0] == 200
            status, answer = post(admin, "/rank", rank)
            assert status == 200 and answer["model_version"] == version
            reference[version] = scores_by_item(answer)
        assert np.abs(reference["v1"] - reference["v2"]).max() > 1e-3  # tellable apart

        def client() -> None:
            conn = http.client.HTTPConnection(svc.host, svc.port, timeout=60)
            while not stop.is_set():
                answers.append(post(conn, "/rank", rank))
            conn.close()

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        refusals: list[tuple[str, int, str]] = []
        for i, version in enumerate(RELOADS):
            time.sleep(0.25)
            status, body = post(admin, "/admin/reload", {"version": version}, auth=True)
            assert status == 200 and body["version"] == version, (status, body)
            bad = REFUSED[i % len(REFUSED)]
            status, body = post(admin, "/admin/reload", {"version": bad}, auth=True)
            admin.request("GET", "/v1/model")
            serving = json.loads(admin.getresponse().read())["version"]
            refusals.append((bad, status, serving))
            assert 400 <= status < 500, (bad, status, body)
            assert serving == version, (bad, serving)  # the old model keeps serving
        time.sleep(0.25)
    finally:
        stop.set()
        for t in clients:
            t.join()
        clean = svc.stop()
    statuses = [s for s, _ in answers]
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    seen = {"v1": 0, "v2": 0}
    for _, answer in answers:
        version = answer["model_version"]
        seen[version] += 1
        np.testing.assert_allclose(scores_by_item(answer), reference[version], atol=1e-6)
    assert seen["v1"] > 0 and seen["v2"] > 0, seen
    assert clean, svc.log()[-2000:]
    print(
        f"reload under load: {len(answers)} answers over {len(RELOADS)} reloads "
        f"({seen['v1']} by v1, {seen['v2']} by v2), all 200, each with its version's "
        f"scores; refused: {sorted({(b, s) for b, s, _ in refusals})}"
    )
