"""`make run`: serve the exported model on 127.0.0.1:8000 with demo users, print a curl.

The Makefile has already prepared MovieLens-100k and trained + exported a model if
none existed. This starts `ifa-rank serve` (embedded Redis unless IFA_REDIS_URL is set),
seeds the MovieLens users' histories through POST /events (the same code path as any
client; idempotency keys make a re-run append nothing), prints a working curl with its
real answer, and keeps serving until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST, PORT = "127.0.0.1", 8000
BASE = f"http://{HOST}:{PORT}"
MARKER = Path("var/quickstart-seeded")
DEMO_USER = "ml-196"  # MovieLens user 196: a real history of 39 positives
DEMO_ITEMS = [242, 302, 377, 51, 346, 474, 265, 465, 451, 86, 1014, 222, 40, 29, 785]


def _get(path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(BASE + path, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ifa-rank serve exited with {proc.returncode} (see its log above)")
        try:
            if _get("/readyz")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready after {timeout_s:.0f}s")


def seed_demo_users() -> None:
    if MARKER.exists():
        print(f"demo users already seeded ({MARKER} exists)")
        return
    cmd = [
        sys.executable,
        "-m",
        "ifa_rank.cli",
        "seed",
        "--source",
        "movielens",
        "--prefix",
        "ml",
        "--via-http",
        BASE,
    ]
    subprocess.run(cmd, check=True)
    MARKER.parent.mkdir(parents=True, exist_ok=True)
    MARKER.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def demo_curl() -> str:
    body = json.dumps({"user_id": DEMO_USER, "candidates": DEMO_ITEMS, "top_k": 5})
    return f"curl -s {BASE}/rank -H 'content-type: application/json' \\\n  -d {shlex.quote(body)}"


def main() -> int:
    env = dict(os.environ)
    server = subprocess.Popen(
        [sys.executable, "-m", "ifa_rank.cli", "serve", "--host", HOST, "--port", str(PORT)],
        env=env,
    )

    def stop(signum: int, _frame: object) -> None:
        server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        wait_ready(server)
        seed_demo_users()
        request = urllib.request.Request(
            BASE + "/rank",
            data=json.dumps({"user_id": DEMO_USER, "candidates": DEMO_ITEMS, "top_k": 5}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            answer = r.read().decode()
        print("\nThe service is up on " + BASE + " (docs: " + BASE + "/docs). Try:\n")
        print(demo_curl())
        print("\nIt answered:\n" + answer + "\n")
        print(f"Metrics: curl -s {BASE}/metrics | grep ^ifa_    Stop: Ctrl-C\n", flush=True)
    except BaseException:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        raise
    return server.wait()


if __name__ == "__main__":
    sys.exit(main())
