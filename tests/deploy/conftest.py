"""Fixtures for the deploy/ checks: repository paths, the settings' env names, promtool."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMTOOL_INSTALL = "apt-get install -y --no-install-recommends prometheus"


def load_yaml_docs(path: Path) -> list[Any]:
    """All documents of a YAML file, empty documents dropped."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def settings_env_names() -> set[str]:
    """The IFA_ env names the service accepts.

    From `service.settings.Settings` when it can be imported (the source of truth once the
    service exists), else from the settings table of docs/CONTRACTS.md.
    """
    try:
        from service.settings import Settings  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return _contract_env_names()
    prefix = str(Settings.model_config.get("env_prefix", "IFA_"))
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def _contract_env_names() -> set[str]:
    text = (ROOT / "docs" / "CONTRACTS.md").read_text(encoding="utf-8")
    names = set(re.findall(r"^\|\s*`(IFA_[A-Z0-9_]+)`\s*\|", text, flags=re.MULTILINE))
    assert names, "no IFA_ settings table found in docs/CONTRACTS.md"
    return names


@pytest.fixture(scope="session")
def env_names() -> set[str]:
    return settings_env_names()


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH. It ships with Debian's `prometheus` package: "
            f"`{PROMTOOL_INSTALL}` (as root; .ci/run installs it when absent).",
            pytrace=False,
        )
    return path
