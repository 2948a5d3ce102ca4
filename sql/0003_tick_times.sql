-- The times of each minute's first and last tick, to the millisecond, and open/close on the
-- hourly rollup.
--
-- Why: candles across sources take the earliest open and the latest close by the ticks' own
-- timestamps, and an API process that cannot reach Redis answers "latest" from the newest row's
-- close at its close_time. A minute's start says neither.
--
-- Rows written before this migration keep NULL times and are read as the minute's start (open)
-- and end (close): `coalesce(open_time, "timestamp")`, `coalesce(close_time, "timestamp" +
-- interval '59.999 seconds')`.
ALTER TABLE aggregates
    ADD COLUMN open_time  timestamptz,
    ADD COLUMN close_time timestamptz;

-- Keep writers out while the rollup gains its columns and its functions change.
LOCK TABLE aggregates IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE aggregates_hourly
    ADD COLUMN open_price  double precision,
    ADD COLUMN open_time   timestamptz,
    ADD COLUMN close_price double precision,
    ADD COLUMN close_time  timestamptz;

UPDATE aggregates_hourly h
   SET open_price = m.open_price, open_time = m.open_time,
       close_price = m.close_price, close_time = m.close_time
  FROM (SELECT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC') AS hour,
               (array_agg(open_price ORDER BY coalesce(open_time, "timestamp"), "timestamp"))[1]
                   AS open_price,
               min(coalesce(open_time, "timestamp")) AS open_time,
               (array_agg(close_price
                          ORDER BY coalesce(close_time, "timestamp" + interval '59.999 seconds')
                                   DESC, "timestamp" DESC))[1] AS close_price,
               max(coalesce(close_time, "timestamp" + interval '59.999 seconds')) AS close_time
          FROM aggregates
         GROUP BY 1, 2, 3) AS m
 WHERE h.exchange = m.exchange AND h.pair_name = m.pair_name AND h.hour = m.hour;

ALTER TABLE aggregates_hourly
    ALTER COLUMN open_price SET NOT NULL,
    ALTER COLUMN open_time SET NOT NULL,
    ALTER COLUMN close_price SET NOT NULL,
    ALTER COLUMN close_time SET NOT NULL;

-- Still covering: range statistics and hourly candles read one series' hours from the index.
ALTER TABLE aggregates_hourly DROP CONSTRAINT aggregates_hourly_pkey;
ALTER TABLE aggregates_hourly ADD CONSTRAINT aggregates_hourly_pkey PRIMARY KEY (exchange, pair_name, hour)
    INCLUDE (tick_count, price_sum, min_price, min_at, max_price, max_at, first_minute, last_minute,
             open_price, open_time, close_price, close_time);

-- New minutes: merge into their hours; the earlier open and the later close win.
CREATE OR REPLACE FUNCTION aggregates_hourly_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO aggregates_hourly AS h
        (exchange, pair_name, hour, tick_count, price_sum, min_price, min_at, max_price, max_at,
         first_minute, last_minute, open_price, open_time, close_price, close_time)
    SELECT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC'),
           sum(tick_count), sum(average_price * tick_count),
           min(min_price), (array_agg("timestamp" ORDER BY min_price, "timestamp"))[1],
           max(max_price), (array_agg("timestamp" ORDER BY max_price DESC, "timestamp"))[1],
           min("timestamp"), max("timestamp"),
           (array_agg(open_price ORDER BY coalesce(open_time, "timestamp"), "timestamp"))[1],
           min(coalesce(open_time, "timestamp")),
           (array_agg(close_price
                      ORDER BY coalesce(close_time, "timestamp" + interval '59.999 seconds') DESC,
                               "timestamp" DESC))[1],
           max(coalesce(close_time, "timestamp" + interval '59.999 seconds'))
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
        last_minute = greatest(h.last_minute, EXCLUDED.last_minute),
        open_price = CASE WHEN EXCLUDED.open_time < h.open_time
                          THEN EXCLUDED.open_price ELSE h.open_price END,
        open_time = least(h.open_time, EXCLUDED.open_time),
        close_price = CASE WHEN EXCLUDED.close_time >= h.close_time
                           THEN EXCLUDED.close_price ELSE h.close_price END,
        close_time = greatest(h.close_time, EXCLUDED.close_time);
    RETURN NULL;
END
$$;

-- Rewrite the given (distinct) hours from their minutes; drop those left without minutes.
CREATE OR REPLACE FUNCTION aggregates_hourly_refresh(
    exchanges text[], pair_names text[], hours timestamptz[]
) RETURNS void LANGUAGE plpgsql AS $$
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
                      min(a."timestamp"), max(a."timestamp"),
                      (array_agg(a.open_price
                                 ORDER BY coalesce(a.open_time, a."timestamp"), a."timestamp"))[1],
                      min(coalesce(a.open_time, a."timestamp")),
                      (array_agg(a.close_price
                                 ORDER BY coalesce(a.close_time,
                                                   a."timestamp" + interval '59.999 seconds') DESC,
                                          a."timestamp" DESC))[1],
                      max(coalesce(a.close_time, a."timestamp" + interval '59.999 seconds'))
                 FROM aggregates a
                WHERE a.exchange = k.exchange AND a.pair_name = k.pair_name
                  AND a."timestamp" >= k.hour AND a."timestamp" < k.hour + interval '1 hour'
               ) AS m (tick_count, price_sum, min_price, min_at, max_price, max_at,
                       first_minute, last_minute, open_price, open_time, close_price, close_time)
    ), emptied AS (
        DELETE FROM aggregates_hourly h
         USING recomputed r
         WHERE r.tick_count IS NULL
           AND h.exchange = r.exchange AND h.pair_name = r.pair_name AND h.hour = r.hour
    )
    INSERT INTO aggregates_hourly AS h
        (exchange, pair_name, hour, tick_count, price_sum, min_price, min_at, max_price, max_at,
         first_minute, last_minute, open_price, open_time, close_price, close_time)
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
        last_minute = EXCLUDED.last_minute,
        open_price = EXCLUDED.open_price,
        open_time = EXCLUDED.open_time,
        close_price = EXCLUDED.close_price,
        close_time = EXCLUDED.close_time;
END
$$;
