"""`python -m loadtest.asgi_cost`: the in-process A/B of the request path runs against a
real Redis and the served model, and reports each variant (its timings are not judged
here: a benchmark, not a test)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from loadtest.asgi_cost import COMPARISONS, measure


@pytest.mark.parametrize("compare", sorted(COMPARISONS))
def test_asgi_cost_reports_both_variants(tiny_artifacts: Path, compare: str) -> None:
    out = asyncio.run(
        measure(str(tiny_artifacts), compare, blocks=2, block=5, m=20, progress=False, events=500)
    )
    first, second, _ = COMPARISONS[compare]
    for key in (f"{first}_us", f"{second}_us", "healthz_us", "score_alone_us"):
        assert out[key] > 0, (key, out)
    for name in (first, second):  # the loop's time per request holds the request's own
        assert out[f"{name}_loop_us"] >= out[f"{name}_us"] * 0.5, out
    assert out["blocks"] == 2 and out["requests_per_block"] == 5 and out["m"] == 20
    assert math.isfinite(out["paired_diff_us"]) and math.isfinite(out["paired_loop_diff_us"])
