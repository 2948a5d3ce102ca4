"""Run the fault suite and rewrite the figures table in docs/reliability.md.

    .venv/bin/python -m tests.faults.report              # run tests/faults (pytest -n 2), rewrite
    .venv/bin/python -m tests.faults.report --from F     # only render the JSON lines in F

Each passing fault test appends one JSON line of figures to $MARKETFLOW_FAULTS_REPORT (see
tests/faults/conftest.py); this script points that variable at a fresh file, runs the suite and
replaces the text between the two `faults-table` markers of docs/reliability.md. The exit code is
pytest's, and the table is rewritten only when the suite passed (or with --from).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
BEGIN = "<!-- faults-table:begin (written by tests/faults/report.py) -->"
END = "<!-- faults-table:end -->"

# Table order: the numbering of docs/reliability.md.
ORDER = [
    "test_redis_killed_and_restarted_three_times_during_ingest",
    "test_redis_that_answers_ping_but_refuses_writes_is_down_at_once_and_recovers_by_itself",
    "test_postgres_cut_across_two_minute_boundaries_then_restored",
    "test_postgres_restarted_while_connections_are_held",
    "test_postgres_that_answers_select_1_but_refuses_upserts_is_down_at_once_and_recovers",
    "test_postgres_down_and_a_full_disk_refuse_new_minutes_at_pending_rows_max",
    "test_journaled_minutes_pruned_from_memory_are_never_silently_missing_from_an_answer",
    "test_feed_flapping_every_two_seconds_delivers_every_line_exactly_once",
    "test_burst_of_ten_and_a_hundred_times_the_normal_rate_loses_nothing",
    "test_sigterm_under_load_exits_0_in_time_with_every_accepted_tick_stored",
    "test_sigterm_while_a_step_of_many_rows_is_written_then_restart_counts_every_tick_once",
    "test_sigkill_under_load_then_restart_loses_at_most_one_flush_and_doubles_nothing",
    "test_restart_inside_a_minute_while_migrations_wait_resumes_its_stored_row",
    "test_sigterm_while_the_restore_waits_on_postgres_exits_0_in_time",
    "test_clock_skewed_ticks_are_refused_and_ticks_within_skew_land_in_their_minute",
    "test_a_hundred_megabytes_without_a_newline_keep_memory_bounded",
    "test_hostile_lines_are_counted_and_never_stop_the_reader",
    "test_a_thousand_websocket_clients_come_and_go_repeatedly",
    "test_slow_clients_hold_sockets_yet_health_answers_and_timeouts_close_them",
    "test_a_flood_of_malformed_requests_never_gets_a_500_and_ingest_goes_on",
]


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _lost(row: dict[str, Any]) -> str:
    lost = row.get("ticks_lost")
    text = _num(lost)
    if row.get("ticks_lost_bound") is not None:
        text += (
            f" (≈ {row.get('ticks_lost_ms', '?')} ms of ticks, counting unread socket data;"
            f" ≥ {row.get('ticks_lost_accepted_min', '?')} of them surely accepted;"
            f" ≤ {row['ticks_lost_bound']:,} asserted)"
        )
    return text


def render(rows: list[dict[str, Any]], suite_s: float | None) -> str:
    by_test = {row["test"]: row for row in rows}
    ordered = [by_test[t] for t in ORDER if t in by_test]
    ordered += [row for row in rows if row["test"] not in ORDER]
    lines = [
        "| # | scenario | ticks sent | lost | doubled | recovery | peak RSS | notes |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for n, row in enumerate(ordered, 1):
        recovery = row.get("recovery_s")
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} MB | {} |".format(
                n,
                row.get("scenario", row["test"]),
                _num(row.get("ticks_sent")),
                _lost(row),
                _num(row.get("rows_doubled")),
                "-" if recovery is None else f"{recovery:g} s",
                _num(row.get("peak_rss_mb")),
                row.get("recovery_note", ""),
            )
        )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    where = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    took = f"; suite wall time {suite_s:.0f} s with `pytest -n 2`" if suite_s is not None else ""
    lines += ["", f"Measured {stamp} on {where}{took}."]
    return "\n".join(lines)


def rewrite(table: str) -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="render this results file")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args(argv)
    suite_s: float | None = None
    code = 0
    if args.source is not None:
        results = args.source
    else:
        results = Path(tempfile.mkstemp(prefix="faults-", suffix=".jsonl")[1])
        command = [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider"]
        started = time.monotonic()
        code = subprocess.call(
            [*command, "tests/faults", *args.pytest_args],
            cwd=REPO,
            env={**os.environ, "MARKETFLOW_FAULTS_REPORT": str(results)},
        )
        suite_s = time.monotonic() - started
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if code != 0:
        print(f"fault suite failed (exit {code}); {DOC} left as it was", file=sys.stderr)
        return code
    rewrite(render(rows, suite_s))
    print(f"{len(rows)} scenarios written to {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
