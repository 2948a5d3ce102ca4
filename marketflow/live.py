"""The live-change messages processes exchange through Redis (contract: Redis, roles): pure
encoding and decoding, no I/O.

- `updates`: one message per flush of an ingesting instance, with the *full current value* of
  every latest price, bucket and key meta the flush changed. A reader merges a bucket by the
  higher count and a latest price by the newer timestamp, so re-delivery and overlap with a
  re-read are harmless. `seq` grows by one per message of an instance; a gap, a new instance
  or `"resync": true` (the writer rewrote every window whole) makes a reader re-read the keys.
- `status:{INSTANCE}`: what an ingesting instance reports every second (its sources, pipeline,
  stores, the oldest minute it has not committed to PostgreSQL).
- `control`: a mode switch asked of every ingesting instance, answered on a reply channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import orjson

from marketflow.models import COUNT, FIRST, FIRST_TS, LAST, LAST_TS, MAX, MIN, SUM, Bucket, Key

Base = tuple[int, Bucket]  # (minute start ms, the resumed row as a bucket)


@attrs.frozen
class KeyMeta:
    """What readers need besides the buckets to answer like the ingesting process: the first
    held minute (older ones are PostgreSQL's) and the rows held minutes resumed from."""

    source: str
    symbol: str
    horizon_ms: int
    bases: tuple[Base, ...] = ()


@attrs.frozen
class Update:
    """One decoded `updates` message."""

    instance: str
    seq: int
    mode: str
    resync: bool
    latest: list[tuple[Key, float, int]]
    buckets: list[tuple[Key, int, Bucket]]
    meta: list[KeyMeta]


def bucket_fields(b: Bucket) -> dict[str, Any]:
    return {
        "count": int(b[COUNT]),
        "sum": b[SUM],
        "min": b[MIN],
        "max": b[MAX],
        "first": b[FIRST],
        "last": b[LAST],
        "first_ms": int(b[FIRST_TS]),
        "last_ms": int(b[LAST_TS]),
    }


def _bucket(d: Mapping[str, Any]) -> Bucket:
    return [
        int(d["count"]),
        float(d["sum"]),
        float(d["min"]),
        float(d["max"]),
        float(d["first"]),
        float(d["last"]),
        int(d["first_ms"]),
        int(d["last_ms"]),
    ]


def encode_update(
    *,
    instance: str,
    seq: int,
    mode: str,
    latest: Iterable[tuple[Key, float, int]] = (),
    buckets: Iterable[tuple[Key, int, Bucket]] = (),
    meta: Iterable[KeyMeta] = (),
    resync: bool = False,
) -> bytes:
    body: dict[str, Any] = {"instance": instance, "seq": seq, "mode": mode}
    if resync:
        body["resync"] = True
    body["latest"] = [
        {"symbol": k[1], "exchange": k[0], "price": price, "timestamp": ts}
        for k, price, ts in latest
    ]
    body["buckets"] = [
        {"symbol": k[1], "exchange": k[0], "second": sec, **bucket_fields(b)}
        for k, sec, b in buckets
    ]
    body["meta"] = [encode_meta(m) for m in meta]
    return orjson.dumps(body)


def encode_meta(m: KeyMeta) -> dict[str, Any]:
    return {
        "symbol": m.symbol,
        "exchange": m.source,
        "horizon": m.horizon_ms,
        "bases": [{"minute": minute, **bucket_fields(b)} for minute, b in m.bases],
    }


def decode_meta(d: Mapping[str, Any]) -> KeyMeta:
    return KeyMeta(
        str(d["exchange"]),
        str(d["symbol"]),
        int(d["horizon"]),
        tuple((int(b["minute"]), _bucket(b)) for b in d.get("bases", ())),
    )


def decode_update(raw: bytes | str) -> Update:
    """Raises ValueError (or KeyError/TypeError) on a message that is not ours."""
    d = orjson.loads(raw)
    return Update(
        instance=str(d["instance"]),
        seq=int(d["seq"]),
        mode=str(d["mode"]),
        resync=bool(d.get("resync", False)),
        latest=[
            ((str(e["exchange"]), str(e["symbol"])), float(e["price"]), int(e["timestamp"]))
            for e in d.get("latest", ())
        ],
        buckets=[
            ((str(e["exchange"]), str(e["symbol"])), int(e["second"]), _bucket(e))
            for e in d.get("buckets", ())
        ],
        meta=[decode_meta(e) for e in d.get("meta", ())],
    )


def encode_base(b: Bucket) -> str:
    """A resumed row as the `meta:` hash stores it (same field order as a window member)."""
    return (
        f"{int(b[COUNT])}|{b[SUM]!r}|{b[MIN]!r}|{b[MAX]!r}|{b[FIRST]!r}|{b[LAST]!r}"
        f"|{int(b[FIRST_TS])}|{int(b[LAST_TS])}"
    )


def decode_base(text: str) -> Bucket:
    count, total, low, high, first, last, first_ms, last_ms = text.split("|")
    return [
        int(count),
        float(total),
        float(low),
        float(high),
        float(first),
        float(last),
        int(first_ms),
        int(last_ms),
    ]


def meta_fields(m: KeyMeta) -> dict[str, str]:
    """The `meta:{SOURCE:SYMBOL}` hash of one key."""
    fields = {"horizon": str(m.horizon_ms)}
    for minute, b in m.bases:
        fields[f"base:{minute}"] = encode_base(b)
    return fields


def meta_from_fields(key: Key, fields: Mapping[str, str]) -> KeyMeta | None:
    """Inverse of `meta_fields`; None when the hash is missing or not ours."""
    try:
        horizon = int(fields["horizon"])
        bases = tuple(
            sorted(
                (int(name[5:]), decode_base(value))
                for name, value in fields.items()
                if name.startswith("base:")
            )
        )
    except (KeyError, ValueError):
        return None
    return KeyMeta(key[0], key[1], horizon, bases)


def encode_control(*, op: str, mode: str, id: str, reply: str, sender: str) -> bytes:
    return orjson.dumps({"op": op, "mode": mode, "id": id, "reply": reply, "sender": sender})
