"""`python -m loadtest.log_cost`: the impression log's CPU per record, the writer's and
Redis's, against a real Redis (the figures are not judged here: a benchmark, not a
test)."""

from __future__ import annotations

import asyncio
import json
import math
import os

import pytest

from loadtest.log_cost import main, measure


def test_log_cost_writes_every_record_and_reports_both_sides() -> None:
    out = asyncio.run(measure(m=50, records=64, repeats=2))
    assert out["m"] == 50 and out["records"] == 64 and out["repeats"] == 2
    assert out["writer_cpu_us_per_record"] > 0, out
    assert math.isfinite(out["redis_cpu_us_per_record"]), out  # read from Redis's /proc


def test_the_command_prints_json_and_names_the_code_it_measured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--m", "20", "--records", "32", "--repeats", "1", "--code", "."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["code"] == os.path.abspath(".") and out["records"] == 32
