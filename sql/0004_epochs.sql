-- Fencing (contract: roles): each source is ingested by one process at a time, the holder of
-- its lease in Redis, and every lease taken gets a new epoch (INCR epoch:{SOURCE}). Rows carry
-- their writer's epoch, and PostgreSQL refuses rows for a source under an older epoch than the
-- newest it has seen for that source: a holder cut off from Redis — or its journal replayed
-- later — can never overwrite the minutes of the process that took over.
--
-- Epoch 0 means "no lease" (a process that started without Redis, availability first): such
-- rows are not fenced.
CREATE TABLE source_epochs (
    exchange text   PRIMARY KEY,
    epoch    bigint NOT NULL CHECK (epoch > 0)
);

ALTER TABLE aggregates ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
