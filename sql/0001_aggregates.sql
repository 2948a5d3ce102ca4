-- Per-minute aggregates (contract: PostgreSQL): one row per (exchange, pair_name, minute).
-- A minute without ticks has no row. Rows carry the minute's full totals and are overwritten
-- (never added to) by the idempotent upsert in marketflow/store/postgres.py.
CREATE TABLE aggregates (
    pair_name     text             NOT NULL,
    exchange      text             NOT NULL,
    "timestamp"   timestamptz      NOT NULL,  -- start of the minute, UTC
    average_price double precision NOT NULL,  -- tick-weighted: sum of prices / tick_count
    min_price     double precision NOT NULL,
    max_price     double precision NOT NULL,
    tick_count    bigint           NOT NULL,
    open_price    double precision NOT NULL,
    close_price   double precision NOT NULL,
    CONSTRAINT aggregates_tick_count_positive CHECK (tick_count > 0),
    CONSTRAINT aggregates_minute_aligned CHECK (extract(epoch FROM "timestamp")::numeric % 60 = 0),
    -- The upsert's conflict target, and the access path of every per-series query the store
    -- makes (`rows`, the minute edges of `range_stats`): equality on (exchange, pair_name) plus
    -- a range on "timestamp" reads one series' minutes in time order and never touches another
    -- series' rows.
    CONSTRAINT aggregates_exchange_pair_minute_key UNIQUE (exchange, pair_name, "timestamp")
);

-- The contract: one symbol across exchanges, newest first ("the last minutes of BTCUSDT anywhere").
-- The store's own queries are per exchange and use the unique index above.
CREATE INDEX aggregates_pair_name_timestamp_idx ON aggregates (pair_name, "timestamp" DESC);
