"""The README's configuration and metrics tables, generated from `Settings` and `Metrics`.

The code is the one source: a field's description and default, a metric's help text,
type and the label values it creates up front. `python -m service.reference README.md`
rewrites both tables between their markers; a test fails when the README drifts.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from pydantic import SecretStr

from service.metrics import Metrics
from service.settings import Settings

SETTINGS_MARKERS = ("<!-- settings-table:start -->", "<!-- settings-table:end -->")
METRICS_MARKERS = ("<!-- metrics-table:start -->", "<!-- metrics-table:end -->")


def _default(value: object) -> str:
    if value is None or isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def settings_table() -> str:
    rows = ["| env | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `IFA_{name.upper()}` | `{_default(field.default)}` | {field.description} |")
    return "\n".join(rows)


def _seconds(le: float) -> str:
    return f"{le * 1000:g} ms" if le < 1 else f"{le:g} s"


def metrics_table() -> str:
    """One row per metric family of a fresh registry: what a first scrape shows."""
    rows = [
        "| metric | type | labels (values present from the first scrape) | meaning |",
        "|---|---|---|---|",
    ]
    metrics = Metrics()
    for family in metrics.registry.collect():
        values: dict[str, dict[str, None]] = defaultdict(dict)  # ordered, distinct
        bounds: list[float] = []
        for sample in family.samples:
            for key, value in sample.labels.items():
                if key == "le":
                    if value != "+Inf":
                        bounds.append(float(value))
                else:
                    values[key][value] = None
        names = _label_names(metrics, family.name)
        labels = ", ".join(
            f"`{n}` = {', '.join(values[n])}" if len(values[n]) > 1 else f"`{n}`" for n in names
        )
        kind = family.type
        if kind == "histogram" and bounds and family.name.endswith("_seconds"):
            kind += f" ({_seconds(min(bounds))}..{_seconds(max(bounds))})"
        name = family.name + ("_total" if family.type == "counter" else "")
        rows.append(f"| `{name}` | {kind} | {labels} | {family.documentation} |")
    return "\n".join(rows)


def _label_names(metrics: Metrics, family: str) -> tuple[str, ...]:
    """Label names in declaration order (a family without samples still has them)."""
    for metric in vars(metrics).values():
        if getattr(metric, "_name", None) == family:
            return tuple(metric._labelnames)
    return ()


def _replace(text: str, markers: tuple[str, str], table: str) -> str:
    start, end = markers
    head, sep, rest = text.partition(start)
    if not sep or end not in rest:
        raise ValueError(f"markers {start!r} ... {end!r} not found")
    return f"{head}{start}\n{table}\n{end}{rest.partition(end)[2]}"


def render(text: str) -> str:
    """`text` with both generated tables put between their markers."""
    text = _replace(text, SETTINGS_MARKERS, settings_table())
    return _replace(text, METRICS_MARKERS, metrics_table())


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    path.write_text(render(path.read_text()))
    print(f"rewrote the settings and metrics tables of {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
