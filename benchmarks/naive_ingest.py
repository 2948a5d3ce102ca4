"""The naive baseline consumer: one Redis round trip per update (for bench_ingest --naive).

Same parser as marketflow; each valid update is written at once as HSET latest + ZADD of a
one-tick member, sent together (one round trip), so the bench's bucket count check still holds.
"""

from __future__ import annotations

import argparse
import itertools
import socket

import redis

from marketflow.config import DEFAULT_SYMBOLS
from marketflow.feeds.framing import FeedParser


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--source", default="exchange1")
    args = parser.parse_args()
    r = redis.Redis()
    feed = FeedParser(DEFAULT_SYMBOLS, max_skew_ms=3_600_000)
    seq = itertools.count()
    with socket.create_connection(("127.0.0.1", args.port)) as sock:
        while data := sock.recv(65536):
            for symbol, price, ts in feed.feed(data):
                key = f"{args.source}:{symbol}"
                pipe = r.pipeline(transaction=False)
                pipe.hset(f"{args.prefix}latest:{{{key}}}", mapping={"price": price, "ts": ts})
                member = (
                    f"{ts // 1000}|1|{price!r}|{price!r}|{price!r}|{price!r}|{price!r}|{next(seq)}"
                )
                pipe.zadd(f"{args.prefix}window:{{{key}}}", {member: ts // 1000})
                pipe.execute()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
