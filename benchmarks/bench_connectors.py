"""Exchange connector parsers: trades per second per core, each venue on its own recording.

    .venv/bin/python -m benchmarks.bench_connectors [--seconds 0.5] [--repeat 5]

For each venue, the recorded frames (text, as trio-websocket hands them over) go through
(a) `parse`: the venue module's parser alone, on the frames that carry trades;
(b) `feed`: a connector's whole per-frame path, `TradeParser.feed` (parse, map the pair, drop
    replayed trade ids, the tick rules), on the same frames in receive turns of 64 frames;
(c) `frames`: every recorded frame (heartbeats, tickers, acks too) through the parser.
One process, one thread: the figures are per core. Best of `--repeat` runs of `--seconds` each.
Prints one JSON line per case, then a table. Target: >= 200,000 trades/s per core for the JSON
venues (all five are JSON). Figures go to docs/connectors.md with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from benchmarks.common import commit, machine
from marketflow.feeds.trades import TradeParser
from marketflow.feeds.venues import VENUES
from marketflow.feeds.venues.base import Trade
from tests.venue_server import load

TURN = 64  # frames per receive turn in the `feed` case
TARGET = 200_000


def best_rate(work: Callable[[], int], seconds: float, repeat: int) -> float:
    """Units per second of `work()` (which returns how many units it did), best of `repeat`."""
    best = 0.0
    for _ in range(repeat):
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        while True:
            done += work()
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, done / (now - started))
    return best


def bench_venue(kind: str, seconds: float, repeat: int) -> dict[str, object]:
    venue = VENUES[kind]
    _, frames = load(kind)
    sink: list[Trade] = []
    trade_frames = []
    for frame in frames:
        sink.clear()
        if venue.parse(frame, sink) is None and sink:
            trade_frames.append(frame)
    pairs = {}
    newest = 0
    for frame in trade_frames:
        sink.clear()
        venue.parse(frame, sink)
        for pair, _, ts, _ in sink:
            pairs[pair] = pair.replace("/", "").replace("-", "")
            newest = max(newest, ts)

    def parse_trades() -> int:
        out: list[Trade] = []
        parse = venue.parse
        for frame in trade_frames:
            parse(frame, out)
        return len(out)

    per_pass = parse_trades()

    def parse_frames() -> int:
        out: list[Trade] = []
        parse = venue.parse
        for frame in frames:
            parse(frame, out)
            out.clear()
        return len(frames)

    turns = [trade_frames[i : i + TURN] for i in range(0, len(trade_frames), TURN)]

    def feed() -> int:
        # a fresh parser per pass: the recording's trade ids would be replays the second time
        parser = TradeParser(
            venue.parse,
            pairs,
            max_skew_ms=10**13,
            max_future_ms=10**6,
            clock=lambda: newest / 1000,
        )
        ticks = 0
        for turn in turns:
            ticks += len(parser.feed(turn))
        assert sum(parser.rejected.values()) == 0
        return ticks

    return {
        "bench": "connectors",
        "case": f"{kind} parser",
        "venue": kind,
        "frames": len(frames),
        "trade_frames": len(trade_frames),
        "trades": per_pass,
        "parse_trades_per_s": round(best_rate(parse_trades, seconds, repeat)),
        "feed_trades_per_s": round(best_rate(feed, seconds, repeat)),
        "frames_per_s": round(best_rate(parse_frames, seconds, repeat)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for kind in VENUES:
        record = bench_venue(kind, args.seconds, args.repeat)
        print(json.dumps(record), flush=True)
        rows.append(record)
    print(f"\n{machine()}, commit {commit()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| venue | trades in recording | parse, trades/s | feed, trades/s | frames/s | target |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        met = "met" if int(str(r["feed_trades_per_s"])) >= TARGET else "missed"
        print(
            f"| {r['venue']} | {r['trades']} in {r['trade_frames']} of {r['frames']} frames"
            f" | {int(str(r['parse_trades_per_s'])):,} | {int(str(r['feed_trades_per_s'])):,}"
            f" | {int(str(r['frames_per_s'])):,} | >= {TARGET:,} ({met}) |"
        )


if __name__ == "__main__":
    main()
