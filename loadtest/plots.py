"""PNG plots of a bench report: cost vs N, cost vs M, HTTP latency percentiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(rep: dict[str, Any], out_dir: Path) -> list[str]:
    """Write what the report has data for; returns the file names (relative to out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    ip = (rep.get("derived") or {}).get("inprocess") or {}

    def loglog(name: str, title: str, xlabel: str, series: dict[str, dict[int, float]]) -> None:
        series = {k: v for k, v in series.items() if v}
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in series.items():
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per call (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    loglog(
        "bench_build_state_vs_n.png",
        "Cold: build_state vs history length N",
        "N (events)",
        {"ifa build_state (ONNX)": ip.get("build_state_ms", {})},
    )
    loglog(
        "bench_score_vs_m.png",
        "Warm: score vs candidates M",
        "M (candidates)",
        {
            "ifa score (ONNX)": ip.get("score_ms", {}),
            "softmax_full (torch, N=100k)": ip.get("softmax_full_ms", {}),
        },
    )

    load = (rep.get("http") or {}).get("load") or {}
    bars = {k: v for k, v in load.items() if "p50_ms" in v}
    for name in ("cold", "refresh_100"):
        s = (rep.get("http") or {}).get(name)
        if s and "p50_ms" in s:
            bars[f"{name}_c1"] = s
    if bars:
        fig, ax = plt.subplots(figsize=(8, 4))
        keys = list(bars)
        width = 0.2
        for j, (pct, label) in enumerate(
            (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max"))
        ):
            xs = [i + (j - 1.5) * width for i in range(len(keys))]
            ax.bar(xs, [bars[k].get(pct, 0.0) for k in keys], width, label=label)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("ms (client side, log scale)")
        ax.axhline(3.0, color="grey", ls="--", lw=0.8)
        ax.axhline(10.0, color="grey", ls=":", lw=0.8)
        ax.set_title("HTTP latency on loopback (N=100k, M=500); lines: 3 ms, 10 ms")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "bench_http_latency.png", dpi=110)
        plt.close(fig)
        written.append("bench_http_latency.png")
    return written
