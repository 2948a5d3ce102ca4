"""PostgreSQL adapter for per-minute aggregates (contract: PostgreSQL). Schema and queries:
docs/storage.md."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from types import TracebackType
from typing import Any, Self

import attrs
import psycopg
from psycopg import errors, sql

from marketflow.config import PostgresConfig
from marketflow.models import Bucket, Extreme, MinuteRow, RangeStats

log = logging.getLogger("marketflow.postgres")

Connection = psycopg.Connection[tuple[Any, ...]]

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
WEEK_MS = 7 * 86_400_000
WEEK_OFFSET_MS = 4 * 86_400_000  # weeks start on Monday; 1970-01-01 was a Thursday
# Open range bounds are clamped to these (0001-01-01 and 9999-12-31 UTC, in ms).
MIN_MS = -62_135_596_800_000
MAX_MS = 253_402_214_400_000
# One advisory lock key shared by every instance: migrations run one at a time, once.
MIGRATION_LOCK_KEY = 0x6D66_6D69_6772  # "mfmigr"
# Rows per INSERT statement; several statements still share the batch's one transaction.
UPSERT_CHUNK = 1000

# ms <-> timestamptz conversions done by the server, exactly (no float seconds on the way).
UPSERT_SQL = """
INSERT INTO aggregates AS a
    (exchange, pair_name, "timestamp", tick_count, average_price, min_price, max_price,
     open_price, close_price, open_time, close_time, epoch)
SELECT e, s, timestamptz 'epoch' + m * interval '1 millisecond', c, av, lo, hi, op, cl,
       timestamptz 'epoch' + ot * interval '1 millisecond',
       timestamptz 'epoch' + ct * interval '1 millisecond', ep
  FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::float8[], %s::float8[],
              %s::float8[], %s::float8[], %s::float8[], %s::bigint[], %s::bigint[], %s::bigint[])
       AS u (e, s, m, c, av, lo, hi, op, cl, ot, ct, ep)
ON CONFLICT (exchange, pair_name, "timestamp") DO UPDATE SET
    tick_count = EXCLUDED.tick_count,
    average_price = EXCLUDED.average_price,
    min_price = EXCLUDED.min_price,
    max_price = EXCLUDED.max_price,
    open_price = EXCLUDED.open_price,
    close_price = EXCLUDED.close_price,
    open_time = EXCLUDED.open_time,
    close_time = EXCLUDED.close_time,
    epoch = EXCLUDED.epoch
-- A replay of identical values writes nothing (no dead tuple, no rollup refresh).
WHERE (a.tick_count, a.average_price, a.min_price, a.max_price, a.open_price, a.close_price,
       a.open_time, a.close_time)
      IS DISTINCT FROM (EXCLUDED.tick_count, EXCLUDED.average_price, EXCLUDED.min_price,
                        EXCLUDED.max_price, EXCLUDED.open_price, EXCLUDED.close_price,
                        EXCLUDED.open_time, EXCLUDED.close_time)
"""

# Fencing: register each source's epoch (the newest wins) and read it back, locking the source's
# row until the batch commits, so a writer under an older epoch is refused consistently.
FENCE_SQL = """
INSERT INTO source_epochs AS f (exchange, epoch)
SELECT e, max(ep) FROM unnest(%s::text[], %s::bigint[]) AS u (e, ep) WHERE ep > 0 GROUP BY e
 ORDER BY e
ON CONFLICT (exchange) DO UPDATE SET epoch = greatest(f.epoch, EXCLUDED.epoch)
RETURNING exchange, epoch
"""

# Rows written before migration 0003 have no tick times: read as the minute's start and end.
ROWS_SQL = """
SELECT exchange, pair_name, (extract(epoch FROM "timestamp") * 1000)::bigint, tick_count,
       average_price * tick_count, min_price, max_price, open_price, close_price,
       (extract(epoch FROM coalesce(open_time, "timestamp")) * 1000)::bigint,
       (extract(epoch FROM coalesce(close_time, "timestamp" + interval '59.999 seconds'))
        * 1000)::bigint
  FROM aggregates
 WHERE exchange = %(exchange)s AND pair_name = %(symbol)s
   AND "timestamp" >= timestamptz 'epoch' + %(from_ms)s::bigint * interval '1 millisecond'
   AND "timestamp" < timestamptz 'epoch' + %(to_ms)s::bigint * interval '1 millisecond'
 ORDER BY "timestamp"
"""

# The newest minute of one series: the unique index read backwards, one row.
LATEST_ROW_SQL = """
SELECT exchange, pair_name, (extract(epoch FROM "timestamp") * 1000)::bigint, tick_count,
       average_price * tick_count, min_price, max_price, open_price, close_price,
       (extract(epoch FROM coalesce(open_time, "timestamp")) * 1000)::bigint,
       (extract(epoch FROM coalesce(close_time, "timestamp" + interval '59.999 seconds'))
        * 1000)::bigint
  FROM aggregates
 WHERE exchange = %(exchange)s AND pair_name = %(symbol)s
 ORDER BY "timestamp" DESC
 LIMIT 1
"""

# Whole hours come from the rollup, the partial hours at either end from the minutes; every
# branch is an index range scan on one series. Ties on an extreme go to the earliest minute.
RANGE_STATS_SQL = """
WITH parts AS (
    SELECT tick_count, price_sum, min_price, min_at, max_price, max_at, first_minute, last_minute
      FROM aggregates_hourly
     WHERE exchange = %(exchange)s AND pair_name = %(symbol)s
       AND hour >= timestamptz 'epoch' + %(hours_from)s::bigint * interval '1 millisecond'
       AND hour < timestamptz 'epoch' + %(hours_to)s::bigint * interval '1 millisecond'
    UNION ALL
    SELECT tick_count, average_price * tick_count, min_price, "timestamp", max_price, "timestamp",
           "timestamp", "timestamp"
      FROM aggregates
     WHERE exchange = %(exchange)s AND pair_name = %(symbol)s
       AND "timestamp" >= timestamptz 'epoch' + %(from_ms)s::bigint * interval '1 millisecond'
       AND "timestamp" < timestamptz 'epoch' + %(head_to)s::bigint * interval '1 millisecond'
    UNION ALL
    SELECT tick_count, average_price * tick_count, min_price, "timestamp", max_price, "timestamp",
           "timestamp", "timestamp"
      FROM aggregates
     WHERE exchange = %(exchange)s AND pair_name = %(symbol)s
       AND "timestamp" >= timestamptz 'epoch' + %(tail_from)s::bigint * interval '1 millisecond'
       AND "timestamp" < timestamptz 'epoch' + %(to_ms)s::bigint * interval '1 millisecond'
)
SELECT t.tick_count, t.price_sum,
       hi.max_price, (extract(epoch FROM hi.max_at) * 1000)::bigint,
       lo.min_price, (extract(epoch FROM lo.min_at) * 1000)::bigint,
       (extract(epoch FROM t.first_minute) * 1000)::bigint,
       (extract(epoch FROM t.last_minute) * 1000)::bigint
  FROM (SELECT sum(tick_count)::bigint AS tick_count, sum(price_sum) AS price_sum,
               min(first_minute) AS first_minute, max(last_minute) AS last_minute
          FROM parts) AS t,
       (SELECT max_price, max_at FROM parts ORDER BY max_price DESC, max_at LIMIT 1) AS hi,
       (SELECT min_price, min_at FROM parts ORDER BY min_price, min_at LIMIT 1) AS lo
"""

# `may_write` is NULL before the first migration created the table.
WRITABLE_SQL = """
SELECT pg_is_in_recovery(), current_setting('transaction_read_only'),
       CASE WHEN to_regclass('aggregates') IS NULL THEN NULL
            ELSE has_table_privilege('aggregates', 'INSERT, UPDATE') END
"""

# Candles: one key's minutes (and, for intervals of an hour or more, whole hours from the rollup)
# grouped by interval start. `t` is the start of the interval holding the part's start,
# computed with a floor modulo so a grid offset (weeks start on Monday) and times before 1970
# align alike. Each branch reads at most limit x (its parts per interval) parts in the asked
# direction: the first (or last) `limit` intervals hold no more than that, so the limit inside a
# branch never cuts an interval the answer needs.
_MINUTE_PARTS = """
    SELECT (extract(epoch FROM "timestamp") * 1000)::bigint AS ms, tick_count,
           average_price * tick_count AS price_sum, min_price, max_price, open_price,
           (extract(epoch FROM coalesce(open_time, "timestamp")) * 1000)::bigint AS open_ms,
           close_price,
           (extract(epoch FROM coalesce(close_time, "timestamp" + interval '59.999 seconds'))
            * 1000)::bigint AS close_ms
      FROM aggregates
     WHERE exchange = %(exchange)s AND pair_name = %(symbol)s
       AND "timestamp" >= timestamptz 'epoch' + %({lo})s::bigint * interval '1 millisecond'
       AND "timestamp" < timestamptz 'epoch' + %({hi})s::bigint * interval '1 millisecond'
     ORDER BY "timestamp" {order}
     LIMIT %(minute_rows)s
"""
_HOUR_PARTS = """
    SELECT (extract(epoch FROM hour) * 1000)::bigint AS ms, tick_count, price_sum, min_price,
           max_price, open_price, (extract(epoch FROM open_time) * 1000)::bigint AS open_ms,
           close_price, (extract(epoch FROM close_time) * 1000)::bigint AS close_ms
      FROM aggregates_hourly
     WHERE exchange = %(exchange)s AND pair_name = %(symbol)s
       AND hour >= timestamptz 'epoch' + %(hours_from)s::bigint * interval '1 millisecond'
       AND hour < timestamptz 'epoch' + %(hours_to)s::bigint * interval '1 millisecond'
     ORDER BY hour {order}
     LIMIT %(hour_rows)s
"""
_GROUP_PARTS = """
SELECT t AS ms, sum(tick_count)::bigint AS tick_count, sum(price_sum) AS price_sum,
       min(min_price) AS min_price, max(max_price) AS max_price,
       (array_agg(open_price ORDER BY open_ms))[1] AS open_price, min(open_ms) AS open_ms,
       (array_agg(close_price ORDER BY close_ms DESC))[1] AS close_price,
       max(close_ms) AS close_ms
  FROM (SELECT ms - mod(mod(ms - %(offset)s, %(interval)s) + %(interval)s, %(interval)s) AS t,
               tick_count, price_sum, min_price, max_price, open_price, open_ms, close_price,
               close_ms
          FROM ({parts}) AS p) AS g
 GROUP BY t
 ORDER BY t {order}
 LIMIT %(limit)s
"""
# A one-minute candle is its minute's row, a one-hour candle its rollup row: no grouping but
# for the minutes of a partial hour at either end.
_AS_CANDLES = """
SELECT ms, tick_count, price_sum, min_price, max_price, open_price, open_ms, close_price,
       close_ms
  FROM ({parts}) AS p
 ORDER BY ms {order}
 LIMIT %(limit)s
"""


def _candle_sql(kind: str, order: str) -> str:
    """`kind`: "minute" (1m), "minutes" (grouped minutes), "hour" (1h), "hours" (grouped hours
    and edge minutes)."""
    head = _MINUTE_PARTS.format(lo="from_ms", hi="head_to", order=order)
    hours = _HOUR_PARTS.format(order=order)
    tail = _MINUTE_PARTS.format(lo="tail_from", hi="to_ms", order=order)
    if kind == "minute":
        parts = _MINUTE_PARTS.format(lo="from_ms", hi="to_ms", order=order)
        return _AS_CANDLES.format(parts=parts, order=order)
    if kind == "minutes":
        parts = _MINUTE_PARTS.format(lo="from_ms", hi="to_ms", order=order)
        return _GROUP_PARTS.format(parts=parts, order=order)
    if kind == "hour":
        branches = [
            _GROUP_PARTS.format(parts=head, order=order),
            hours,
            _GROUP_PARTS.format(parts=tail, order=order),
        ]
    else:
        every = " UNION ALL ".join(f"({b})" for b in (head, hours, tail))
        branches = [_GROUP_PARTS.format(parts=every, order=order)]
    return _AS_CANDLES.format(parts=" UNION ALL ".join(f"({b})" for b in branches), order=order)


CANDLE_SQL = {
    (kind, newest_first): _candle_sql(kind, "DESC" if newest_first else "ASC")
    for kind in ("minute", "minutes", "hour", "hours")
    for newest_first in (False, True)
}


def candle_kind(interval_ms: int) -> str:
    if interval_ms == MINUTE_MS:
        return "minute"
    if interval_ms == HOUR_MS:
        return "hour"
    return "hours" if interval_ms > HOUR_MS else "minutes"


def candle_params(
    exchange: str,
    symbol: str,
    interval_ms: int,
    from_ms: int | None,
    to_ms: int,
    limit: int,
) -> dict[str, Any]:
    """CANDLE_SQL's parameters: the range split as `range_params` does (whole hours from the
    rollup, the minutes at either end), the grid, and how many parts a branch may read."""
    params = range_params(exchange, symbol, from_ms, to_ms)
    params.update(
        interval=interval_ms,
        offset=WEEK_OFFSET_MS if interval_ms == WEEK_MS else 0,
        limit=limit,
        minute_rows=limit * (interval_ms // MINUTE_MS),
        hour_rows=limit * max(1, interval_ms // HOUR_MS),
    )
    return params


MIGRATIONS_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class PostgresStoreError(Exception):
    """A PostgreSQL call failed: unreachable, timed out or refused. Never holds the password."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@attrs.frozen
class Migration:
    version: int
    name: str
    script: bytes


_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")


def load_migrations() -> list[Migration]:
    """The `sql/NNNN_name.sql` files (shipped inside the package as `marketflow.sql`), in
    version order."""
    found = []
    for entry in resources.files("marketflow.sql").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_bytes()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in marketflow/sql: {versions}")
    return found


def range_params(
    exchange: str, symbol: str, from_ms: int | None, to_ms: int | None
) -> dict[str, Any]:
    """Split [from_ms, to_ms) into whole hours (rollup) and the minutes at either end."""
    low = MIN_MS if from_ms is None else max(from_ms, MIN_MS)
    high = MAX_MS if to_ms is None else min(to_ms, MAX_MS)
    hours_from = -(-low // HOUR_MS) * HOUR_MS  # first hour starting at or after `low`
    hours_to = high // HOUR_MS * HOUR_MS  # hours ending at or before `high`
    if hours_from >= hours_to:  # no whole hour inside: read minutes only
        hours_from = hours_to = head_to = tail_from = high
    else:
        head_to, tail_from = hours_from, hours_to
    return {
        "exchange": exchange,
        "symbol": symbol,
        "from_ms": low,
        "to_ms": high,
        "hours_from": hours_from,
        "hours_to": hours_to,
        "head_to": head_to,
        "tail_from": tail_from,
    }


class PostgresAggregateStore:
    """Owns one PostgreSQL connection and the `aggregates` schema (satisfies `AggregateStore`).

    Blocking and thread-safe (calls are serialised); the caller runs them through
    `trio.to_thread`. Every call is bounded: `connect_timeout_s` to connect, `statement_timeout_ms`
    per statement, TCP keepalives for a peer that vanishes. The connection opens lazily; the first
    one creates the database if it is missing and applies pending migrations. After any error the
    connection is dropped and the next call reconnects. Errors surface as `PostgresStoreError`.
    """

    def __init__(
        self,
        config: PostgresConfig,
        *,
        statement_timeout_ms: int = 5000,
        connect_timeout_s: int = 2,
        migration_timeout_ms: int = 60_000,
        migrate: bool = True,
    ) -> None:
        self._config = config
        self._migrating = migrate  # the writer creates the database and migrates; readers never
        self._statement_timeout_ms = statement_timeout_ms
        self._connect_timeout_s = connect_timeout_s
        self._migration_timeout_ms = migration_timeout_ms
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._migrated = False

    # -- AggregateStore ---------------------------------------------------------------------

    def migrate(self) -> None:
        """Apply pending migrations (once per store: later calls return at once)."""
        if self._migrated:
            return
        self._call(self._apply_migrations, migrating=True)

    def upsert(self, rows: Sequence[MinuteRow]) -> int:
        """Write `rows` in one transaction; returns how many were refused by fencing (rows of a
        source under an older epoch than the newest seen for it)."""
        latest = {(r.exchange, r.symbol, r.minute): r for r in rows}  # the last one wins
        for row in latest.values():
            if row.minute % MINUTE_MS or row.count <= 0:
                raise ValueError(f"not a minute aggregate: {row!r}")
        # Key order: concurrent writers lock the same rows in the same order.
        batch = sorted(latest.values(), key=lambda r: (r.exchange, r.symbol, r.minute))
        if not batch:
            return 0

        def write(conn: Connection) -> int:
            with conn.transaction(), conn.cursor() as cur:
                fenced = [r for r in batch if r.epoch > 0]
                newest: dict[str, int] = {}
                if fenced:
                    cur.execute(
                        FENCE_SQL, ([r.exchange for r in fenced], [r.epoch for r in fenced])
                    )
                    newest = {exchange: epoch for exchange, epoch in cur.fetchall()}
                accepted = [r for r in batch if r.epoch == 0 or r.epoch >= newest[r.exchange]]
                for start in range(0, len(accepted), UPSERT_CHUNK):
                    cur.execute(UPSERT_SQL, upsert_params(accepted[start : start + UPSERT_CHUNK]))
                return len(batch) - len(accepted)

        return self._call(write)

    def register_epoch(self, exchange: str, epoch: int) -> int:
        """Make `epoch` the source's newest (if it is): from now on rows under an older one are
        refused, even before this holder writes its first row. Returns the newest epoch."""

        def write(conn: Connection) -> int:
            found = conn.execute(FENCE_SQL, ([exchange], [epoch])).fetchone()
            assert found is not None
            return int(found[1])

        return self._call(write)

    def rows(self, exchange: str, symbol: str, from_ms: int, to_ms: int) -> list[MinuteRow]:
        params = {"exchange": exchange, "symbol": symbol, "from_ms": max(from_ms, MIN_MS)}
        params["to_ms"] = min(to_ms, MAX_MS)
        found = self._call(lambda conn: conn.execute(ROWS_SQL, params).fetchall())
        return [MinuteRow(*row[:9], open_ms=row[9], close_ms=row[10]) for row in found]

    def latest_row(self, exchange: str, symbol: str) -> MinuteRow | None:
        params = {"exchange": exchange, "symbol": symbol}
        found = self._call(lambda conn: conn.execute(LATEST_ROW_SQL, params).fetchone())
        if found is None:
            return None
        return MinuteRow(*found[:9], open_ms=found[9], close_ms=found[10])

    def range_stats(
        self, exchange: str, symbol: str, from_ms: int | None, to_ms: int | None
    ) -> RangeStats | None:
        params = range_params(exchange, symbol, from_ms, to_ms)
        found = self._call(lambda conn: conn.execute(RANGE_STATS_SQL, params).fetchone())
        if found is None:
            return None
        count, total, high, high_at, low, low_at, first_ms, last_ms = found
        return RangeStats(
            count=count,
            total=total,
            high=Extreme(high, high_at, exchange),
            low=Extreme(low, low_at, exchange),
            first_ms=first_ms,
            last_ms=last_ms,
        )

    def candles(
        self,
        exchange: str,
        symbol: str,
        interval_ms: int,
        from_ms: int | None,
        to_ms: int,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[int, Bucket]]:
        if interval_ms % MINUTE_MS or interval_ms <= 0:
            raise ValueError(f"not a whole number of minutes: {interval_ms}")
        kind = candle_kind(interval_ms)
        params = candle_params(exchange, symbol, interval_ms, from_ms, to_ms, limit)
        found = self._call(
            lambda conn: conn.execute(
                CANDLE_SQL[(kind, newest_first)], params, binary=True
            ).fetchall()
        )
        if newest_first:
            found.reverse()
        return [
            (t, [count, total, low, high, open_, close, open_ms, close_ms])
            for t, count, total, low, high, open_, open_ms, close, close_ms in found
        ]

    def ping(self) -> float:
        def probe(conn: Connection) -> float:
            start = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            return (time.perf_counter() - start) * 1000

        return self._call(probe)

    def probe_write(self) -> float:
        """Would this server take our upserts? Not a replica in recovery, not read-only, INSERT
        and UPDATE granted on `aggregates` (once it exists). Raises PostgresStoreError naming the
        reason; returns the round trip in ms. Writes nothing."""

        def probe(conn: Connection) -> float:
            start = time.perf_counter()
            row = conn.execute(WRITABLE_SQL).fetchone()
            elapsed = (time.perf_counter() - start) * 1000
            assert row is not None
            in_recovery, read_only, may_write = row
            if in_recovery:
                raise PostgresStoreError("PostgreSQL is in recovery (a read-only replica)")
            if read_only == "on":
                raise PostgresStoreError("PostgreSQL transactions are read-only")
            if may_write is False:
                raise PostgresStoreError("no INSERT/UPDATE privilege on aggregates")
            return elapsed

        return self._call(probe)

    def close(self) -> None:
        """Close the connection; a statement still running on it (a call whose caller gave up,
        e.g. a migration waiting on the lock when the process stops) is cancelled first, so
        closing never waits for it."""
        conn = self._conn
        if conn is not None and self._lock.locked():
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe(timeout=self._connect_timeout_s)
        with self._lock:
            self._drop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connection handling ----------------------------------------------------------------

    def _call[T](self, fn: Callable[[Connection], T], *, migrating: bool = False) -> T:
        """Run `fn` on the (re)opened connection; on any database error drop it and raise.

        A connection that was already open and turns out broken (the server restarted, or a
        proxy dropped it while idle) gets one immediate retry on a fresh connection: every call
        here is a read or an idempotent whole-minute upsert, so running it again is safe.
        """
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                broken = False
                try:
                    if self._conn is None:
                        self._conn = self._open(migrate=self._migrating and not migrating)
                    return fn(self._conn)
                except psycopg.Error as exc:
                    broken = self._conn is not None and self._conn.broken
                    self._drop()
                    error = self._sanitized(exc)
                if attempt == 2 or not (reused and broken):
                    break
        # Raised outside the `except` block so the original (whose text came from libpq) is not
        # chained as context into tracebacks and logs.
        raise error

    def _open(self, *, migrate: bool) -> Connection:
        dbname = self._config.dbname
        try:
            conn = self._connect(dbname)
        except psycopg.OperationalError as exc:
            # libpq gives no SQLSTATE for a refused connection; the server's "database "x" does
            # not exist" names the database in quotes in every locale. Other refusals that name
            # it (no CONNECT privilege) find it exists and keep their own message.
            if f'"{dbname}"' not in str(exc) or not self._migrating:
                raise
            # Created now, or by another instance a moment ago (then it may still be empty):
            # connect again either way; without CONNECT privilege this raises the real reason.
            self._create_database()
            self._migrated = False
            conn = self._connect(dbname)
            migrate = True
        if migrate and not self._migrated:
            try:
                self._apply_migrations(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _connect(self, dbname: str) -> Connection:
        c = self._config
        options = f"-c statement_timeout={self._statement_timeout_ms}"
        # Keyword arguments, never a conninfo string: nothing to echo back in an error.
        kwargs: dict[str, Any] = {
            "host": c.host,
            "port": c.port,
            "user": c.user,
            "dbname": dbname,
            "sslmode": c.sslmode,
            "application_name": "marketflow",
            "connect_timeout": self._connect_timeout_s,
            "options": options,
            # Notice a vanished server within seconds instead of waiting on a dead socket.
            "keepalives": 1,
            "keepalives_idle": 2,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": self._statement_timeout_ms + 1000,
        }
        if c.password:
            kwargs["password"] = c.password
        return psycopg.Connection.connect(autocommit=True, **kwargs)

    def _create_database(self) -> bool:
        """Create the configured database through `postgres`; False if it was there already."""
        name = self._config.dbname
        with self._connect("postgres") as admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            try:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (errors.DuplicateDatabase, errors.UniqueViolation):
                return True  # another instance created it a moment ago
        log.info("created database %s on %s:%s", name, self._config.host, self._config.port)
        return True

    def _apply_migrations(self, conn: Connection) -> None:
        """Apply pending migrations in one transaction, under an advisory lock."""
        with conn.transaction():
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (str(self._migration_timeout_ms),),
            )
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            conn.execute(MIGRATIONS_TABLE_SQL)
            applied = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            for migration in load_migrations():
                if migration.version in applied:
                    continue
                conn.execute(migration.script)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                log.info("applied migration %04d_%s", migration.version, migration.name)
        self._migrated = True

    def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _sanitized(self, exc: psycopg.Error) -> PostgresStoreError:
        text = f"{type(exc).__name__}: {exc}".strip()
        text = re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", text)
        if self._config.password:
            text = text.replace(self._config.password, "***")
        return PostgresStoreError(text, exc.sqlstate)


def upsert_params(rows: Sequence[MinuteRow]) -> tuple[list[Any], ...]:
    """The UPSERT_SQL arrays, one per column."""
    return (
        [r.exchange for r in rows],
        [r.symbol for r in rows],
        [r.minute for r in rows],
        [r.count for r in rows],
        [r.average for r in rows],
        [r.low for r in rows],
        [r.high for r in rows],
        [r.open for r in rows],
        [r.close for r in rows],
        [r.open_ms for r in rows],
        [r.close_ms for r in rows],
        [r.epoch for r in rows],
    )
