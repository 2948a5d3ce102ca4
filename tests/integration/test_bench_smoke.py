"""Smoke test of the benchmark harness: `benchmarks.run --quick --only ingest` prints figures.

Benchmarks are not pass/fail tests (their targets are figures in docs/performance.md); this only
checks that the harness still runs end to end — blasters, a real marketflow, Redis, PostgreSQL,
the collection of results and the table — and that the exact loss check still finds no loss.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.procs import REPO


def test_quick_ingest_bench_prints_a_figure_with_zero_loss() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "ingest", "--no-write"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [
        json.loads(line)
        for line in result.stdout.splitlines()
        if line.startswith('{"bench": "ingest"')
    ]
    runs = [r for r in records if r["design"] == "marketflow"]
    assert runs, result.stdout
    for run in runs:
        assert run["sent"] > 0
        assert run["updates_per_s"] > 0
        assert run["lost"] == 0, run  # ticks in the Redis buckets = ticks sent
        assert run["db_lost"] == 0, run  # PostgreSQL tick_count sum = ticks sent
    assert "| Ingest, one process" in result.stdout
    assert "updates/s" in result.stdout
