"""Inside service/, imports go down the layers only:

    app (composition root) -> http -> usecases -> engine -> store

`settings`, `metrics` (with its `metrics_buffer`) and `ifa_common` are shared by every
layer; `commands` and `reference` are tools beside the app. A module-level or
function-level import that goes up (or sideways into a layer above) fails here, with the
file and the import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"
RANK = {"store": 1, "engine": 2, "usecases": 3, "http": 4, "app": 5}
SHARED = {"settings", "metrics", "metrics_buffer"}
TOOLS = {"commands", "reference"}  # may import anything in service/


def _layer(module: str) -> str | None:
    """service.<x>[.<y>] -> its layer name, None for shared modules and the package."""
    parts = module.split(".")
    if parts[0] != "service" or len(parts) < 2 or parts[1] in SHARED | {"__init__"}:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def test_service_imports_only_go_down() -> None:
    wrong = []
    for path in sorted(SERVICE.rglob("*.py")):
        rel = path.relative_to(SERVICE.parent).with_suffix("")
        own = _layer(".".join(rel.parts))
        if own is None or own in TOOLS:
            continue
        assert own in RANK, f"{path}: a module outside the layers {sorted(RANK)}"
        for line, module in _imports(path):
            target = _layer(module)
            if target is not None and target not in TOOLS and RANK[target] > RANK[own]:
                wrong.append(f"{rel}:{line} ({own}) imports {module} ({target})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from service.http.routes import router\n")
    ((line, module),) = _imports(bad)
    assert line == 1 and _layer(module) == "http" and RANK["http"] > RANK["engine"]
