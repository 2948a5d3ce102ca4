-- Hourly rollup of `aggregates`, kept exact by triggers.
--
-- Why: statistics over long periods (up to `max_period`, 3650 days) would otherwise read one row
-- per minute: a year is 525,600 rows and ~100 ms even as an index-only scan. With this table a
-- range reads its whole hours here (8,760 rows a year) and only the partial hours at either end
-- (at most 118 minutes) from `aggregates`: a few milliseconds. See docs/storage.md.
--
-- How: an INSERT into `aggregates` merges the new minutes into their hours (counts and sums add,
-- extremes compare); an UPDATE or DELETE recomputes the touched hours from their minutes, since an
-- overwritten minute's old values cannot be subtracted from a min or max. Overwrites are rare
-- (late ticks, replays after a restart), so the common path stays O(rows written).
CREATE TABLE aggregates_hourly (
    exchange     text             NOT NULL,
    pair_name    text             NOT NULL,
    hour         timestamptz      NOT NULL,  -- start of the UTC hour
    tick_count   bigint           NOT NULL,  -- sum of the minutes' tick_count
    price_sum    double precision NOT NULL,  -- sum of the minutes' average_price * tick_count
    min_price    double precision NOT NULL,
    min_at       timestamptz      NOT NULL,  -- earliest minute holding min_price
    max_price    double precision NOT NULL,
    max_at       timestamptz      NOT NULL,  -- earliest minute holding max_price
    first_minute timestamptz      NOT NULL,
    last_minute  timestamptz      NOT NULL,
    -- Covering, so range_stats reads one series' hours from the index alone (index-only scan).
    CONSTRAINT aggregates_hourly_pkey PRIMARY KEY (exchange, pair_name, hour)
        INCLUDE (tick_count, price_sum, min_price, min_at, max_price, max_at,
                 first_minute, last_minute)
);

-- Keep writers out while the rollup is backfilled and its triggers created.
LOCK TABLE aggregates IN SHARE ROW EXCLUSIVE MODE;

INSERT INTO aggregates_hourly
    (exchange, pair_name, hour, tick_count, price_sum, min_price, min_at, max_price, max_at,
     first_minute, last_minute)
SELECT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC'),
       sum(tick_count), sum(average_price * tick_count),
       min(min_price), (array_agg("timestamp" ORDER BY min_price, "timestamp"))[1],
       max(max_price), (array_agg("timestamp" ORDER BY max_price DESC, "timestamp"))[1],
       min("timestamp"), max("timestamp")
  FROM aggregates
 GROUP BY 1, 2, 3;

-- New minutes: merge into their hours.
CREATE FUNCTION aggregates_hourly_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO aggregates_hourly AS h
        (exchange, pair_name, hour, tick_count, price_sum, min_price, min_at, max_price, max_at,
         first_minute, last_minute)
    SELECT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC'),
           sum(tick_count), sum(average_price * tick_count),
           min(min_price), (array_agg("timestamp" ORDER BY min_price, "timestamp"))[1],
           max(max_price), (array_agg("timestamp" ORDER BY max_price DESC, "timestamp"))[1],
           min("timestamp"), max("timestamp")
      FROM new_minutes
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3  -- one lock order for every writer: no deadlocks between them
    ON CONFLICT (exchange, pair_name, hour) DO UPDATE SET
        tick_count = h.tick_count + EXCLUDED.tick_count,
        price_sum = h.price_sum + EXCLUDED.price_sum,
        min_price = least(h.min_price, EXCLUDED.min_price),
        min_at = CASE WHEN (EXCLUDED.min_price, EXCLUDED.min_at) < (h.min_price, h.min_at)
                      THEN EXCLUDED.min_at ELSE h.min_at END,
        max_price = greatest(h.max_price, EXCLUDED.max_price),
        max_at = CASE WHEN EXCLUDED.max_price > h.max_price
                        OR (EXCLUDED.max_price = h.max_price AND EXCLUDED.max_at < h.max_at)
                      THEN EXCLUDED.max_at ELSE h.max_at END,
        first_minute = least(h.first_minute, EXCLUDED.first_minute),
        last_minute = greatest(h.last_minute, EXCLUDED.last_minute);
    RETURN NULL;
END
$$;

-- Rewrite the given (distinct) hours from their minutes; drop those left without minutes.
-- The minutes are read through a LATERAL subquery per hour, so the planner probes the unique
-- index hour by hour instead of joining whole tables.
CREATE FUNCTION aggregates_hourly_refresh(exchanges text[], pair_names text[], hours timestamptz[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- Lock first (in key order: no deadlocks). Each later statement takes a fresh snapshot, so a
    -- concurrent writer that merged minutes into one of these hours has committed by then and is
    -- counted, not lost.
    PERFORM 1
       FROM (SELECT * FROM unnest(exchanges, pair_names, hours) ORDER BY 1, 2, 3)
            AS k (exchange, pair_name, hour)
      CROSS JOIN LATERAL (
            SELECT FROM aggregates_hourly h
             WHERE h.exchange = k.exchange AND h.pair_name = k.pair_name AND h.hour = k.hour
               FOR UPDATE) AS locked;

    WITH recomputed AS (
        SELECT k.exchange, k.pair_name, k.hour, m.*
          FROM unnest(exchanges, pair_names, hours) AS k (exchange, pair_name, hour)
         CROSS JOIN LATERAL (
               SELECT sum(a.tick_count), sum(a.average_price * a.tick_count),
                      min(a.min_price),
                      (array_agg(a."timestamp" ORDER BY a.min_price, a."timestamp"))[1],
                      max(a.max_price),
                      (array_agg(a."timestamp" ORDER BY a.max_price DESC, a."timestamp"))[1],
                      min(a."timestamp"), max(a."timestamp")
                 FROM aggregates a
                WHERE a.exchange = k.exchange AND a.pair_name = k.pair_name
                  AND a."timestamp" >= k.hour AND a."timestamp" < k.hour + interval '1 hour'
               ) AS m (tick_count, price_sum, min_price, min_at, max_price, max_at,
                       first_minute, last_minute)
    ), emptied AS (
        DELETE FROM aggregates_hourly h
         USING recomputed r
         WHERE r.tick_count IS NULL
           AND h.exchange = r.exchange AND h.pair_name = r.pair_name AND h.hour = r.hour
    )
    INSERT INTO aggregates_hourly AS h
        (exchange, pair_name, hour, tick_count, price_sum, min_price, min_at, max_price, max_at,
         first_minute, last_minute)
    SELECT * FROM recomputed
     WHERE tick_count IS NOT NULL
     ORDER BY 1, 2, 3
    ON CONFLICT (exchange, pair_name, hour) DO UPDATE SET
        tick_count = EXCLUDED.tick_count,
        price_sum = EXCLUDED.price_sum,
        min_price = EXCLUDED.min_price,
        min_at = EXCLUDED.min_at,
        max_price = EXCLUDED.max_price,
        max_at = EXCLUDED.max_at,
        first_minute = EXCLUDED.first_minute,
        last_minute = EXCLUDED.last_minute;
END
$$;

-- Overwritten minutes: recompute their hours (old and new, in case a key itself changed).
CREATE FUNCTION aggregates_hourly_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An upsert whose rows were all new still fires this statement trigger: nothing to do.
    IF NOT EXISTS (SELECT FROM new_minutes) THEN
        RETURN NULL;
    END IF;
    PERFORM aggregates_hourly_refresh(array_agg(exchange), array_agg(pair_name), array_agg(hour))
       FROM (SELECT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC') AS hour
               FROM old_minutes
             UNION
             SELECT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC')
               FROM new_minutes) AS changed;
    RETURN NULL;
END
$$;

-- Deleted minutes (retention, manual fixes): recompute their hours.
CREATE FUNCTION aggregates_hourly_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM aggregates_hourly_refresh(array_agg(exchange), array_agg(pair_name), array_agg(hour))
       FROM (SELECT DISTINCT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC') AS hour
               FROM old_minutes) AS changed;
    RETURN NULL;
END
$$;

CREATE FUNCTION aggregates_hourly_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE aggregates_hourly;
    RETURN NULL;
END
$$;

-- Statement-level with transition tables: one rollup statement per upsert, not one per row.
-- (PostgreSQL allows a transition table only on a single-event trigger, hence three triggers.)
CREATE TRIGGER aggregates_hourly_insert AFTER INSERT ON aggregates
    REFERENCING NEW TABLE AS new_minutes
    FOR EACH STATEMENT EXECUTE FUNCTION aggregates_hourly_add();
CREATE TRIGGER aggregates_hourly_update AFTER UPDATE ON aggregates
    REFERENCING OLD TABLE AS old_minutes NEW TABLE AS new_minutes
    FOR EACH STATEMENT EXECUTE FUNCTION aggregates_hourly_on_update();
CREATE TRIGGER aggregates_hourly_delete AFTER DELETE ON aggregates
    REFERENCING OLD TABLE AS old_minutes
    FOR EACH STATEMENT EXECUTE FUNCTION aggregates_hourly_on_delete();
CREATE TRIGGER aggregates_hourly_truncate AFTER TRUNCATE ON aggregates
    FOR EACH STATEMENT EXECUTE FUNCTION aggregates_hourly_on_truncate();
