"""Artifact directory layout, manifest schema and integrity checks.

    artifacts/<version>/manifest.json, state.onnx, scorer.onnx, items.npz
    artifacts/latest            # a text file holding the newest version name

The manifest is plain JSON (see `docs/artifacts.md`); this module reads it and checks
every file's sha256 before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Final

MANIFEST_FORMAT: Final = 1
MANIFEST_NAME: Final = "manifest.json"
LATEST_NAME: Final = "latest"
SERVABLE_MODEL_TYPES: Final = ("ifa",)
_VERSION_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(RuntimeError):
    """An artifact that must not be loaded."""


class ArtifactMissing(ArtifactError):
    pass


class ArtifactHashMismatch(ArtifactError):
    pass


class ArtifactWrongModel(ArtifactError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_version_name(version: str) -> str:
    if not _VERSION_RE.match(version) or version == LATEST_NAME:
        raise ArtifactError(f"invalid artifact version name {version!r}")
    return version


def resolve_version(artifacts_dir: Path, version: str | None = None) -> Path:
    """The directory of `version` (default: the one named by `latest`), inside artifacts_dir.

    Only names matching a safe pattern are accepted, so a version can never point
    outside the configured directory.
    """
    root = Path(artifacts_dir).resolve()
    if not version or version == LATEST_NAME:
        pointer = root / LATEST_NAME
        if not pointer.is_file():
            raise ArtifactMissing(f"no artifact found: {pointer} does not exist")
        version = pointer.read_text().strip()
    path = root / check_version_name(version)
    if not (path / MANIFEST_NAME).is_file():
        raise ArtifactMissing(f"artifact {version!r} has no {MANIFEST_NAME} under {root}")
    if not path.resolve().is_relative_to(root):
        # a symlink out of the configured directory: whoever can write the directory
        # could point the service at any model on the machine
        raise ArtifactError(f"artifact {version!r} resolves outside {root}: refused")
    return path


def load_manifest(version_dir: Path) -> dict[str, Any]:
    path = Path(version_dir) / MANIFEST_NAME
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactMissing(f"missing {path}") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: a manifest is a JSON object, not {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{path}: unsupported manifest format {manifest.get('format')!r}")
    return manifest


def verify_files(version_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse an artifact whose files are missing or differ from the manifest's sha256."""
    model_type = manifest.get("model_type")
    if model_type not in SERVABLE_MODEL_TYPES:
        raise ArtifactWrongModel(
            f"artifact model type {model_type!r} is not servable (only {SERVABLE_MODEL_TYPES})"
        )
    files: dict[str, str] = manifest.get("files") or {}
    if not files:
        raise ArtifactError("manifest lists no files")
    for name, digest in files.items():
        path = Path(version_dir) / name
        if Path(name).name != name:
            raise ArtifactError(f"manifest file name {name!r} must be a plain name")
        if not path.is_file():
            raise ArtifactMissing(f"artifact file {name} is missing from {version_dir}")
        if not path.resolve().is_relative_to(Path(version_dir).resolve()):
            raise ArtifactError(f"artifact file {name} resolves outside {version_dir}: refused")
        actual = sha256_file(path)
        if actual != digest:
            raise ArtifactHashMismatch(
                f"{name}: sha256 {actual[:12]}… does not match manifest {digest[:12]}…"
            )
