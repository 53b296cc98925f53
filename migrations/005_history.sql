-- hydrod schema, version 5: history over months and years (SPEC §8).
--
-- telemetry_samples becomes a table partitioned by day (UTC) on ts, and three
-- rollup tables keep, per series and bucket, what SQL computes from the raw rows.
-- Every row of the table it replaces is copied, with its id; the rollups are
-- computed from them.

ALTER TABLE telemetry_samples RENAME TO telemetry_samples_v4;
ALTER INDEX telemetry_samples_pkey RENAME TO telemetry_samples_v4_pkey;
ALTER INDEX telemetry_samples_node_id_channel_metric_type_ts_key RENAME TO telemetry_samples_v4_key;
ALTER INDEX telemetry_samples_ts RENAME TO telemetry_samples_v4_ts;

-- No foreign key to nodes: hydrod resolves node_id from nodes in the statement
-- that inserts, and never deletes a node. A foreign key would make adding and
-- dropping a day's partition lock nodes against every write (README, Decisions).
CREATE TABLE telemetry_samples (
    id          bigint NOT NULL DEFAULT nextval('telemetry_samples_id_seq'),
    node_id     bigint NOT NULL,
    channel     text NOT NULL,
    metric_type text NOT NULL,
    value       double precision NOT NULL,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    -- A sample is its series and its ts: a redelivery is stored once. The
    -- partition key (ts) is part of it, as PostgreSQL requires.
    PRIMARY KEY (node_id, channel, metric_type, ts)
) PARTITION BY RANGE (ts);
ALTER SEQUENCE telemetry_samples_id_seq OWNED BY telemetry_samples.id;
CREATE INDEX telemetry_samples_id ON telemetry_samples (id);

-- The partition of one UTC day, named telemetry_samples_YYYYMMDD, made if it is
-- missing. Made as a plain table and then attached: ATTACH PARTITION takes a
-- SHARE UPDATE EXCLUSIVE lock on telemetry_samples, which no insert or read
-- waits for (CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE).
-- Two advisory locks (hydrod_partition_lock):
-- - 'make': partitions are made under it, so instances never race;
-- - 'prune': pruning holds it exclusively while it detaches and drops a day. A
--   writer that needs a day pruning may be dropping (older than yesterday, UTC)
--   holds it shared from its check to its commit. Days from yesterday on are
--   checked without a lock: no retention drops them (raw_days >= 1).
CREATE FUNCTION hydrod_partition_lock(what text) RETURNS bigint LANGUAGE sql IMMUTABLE
AS $$ SELECT CASE what WHEN 'make' THEN 114870785766004 WHEN 'prune' THEN 114870785766005 END $$;

CREATE FUNCTION hydrod_telemetry_partitions(days date[]) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    day date;
    part text;
    made integer := 0;
BEGIN
    FOREACH day IN ARRAY days LOOP
        part := 'telemetry_samples_' || to_char(day, 'YYYYMMDD');
        IF day < (now() AT TIME ZONE 'UTC')::date - 1 THEN
            PERFORM pg_advisory_xact_lock_shared(hydrod_partition_lock('prune'));
        END IF;
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_inherits
                              WHERE inhparent = 'telemetry_samples'::regclass
                                AND inhrelid = to_regclass(part) AND NOT inhdetachpending);
        PERFORM pg_advisory_xact_lock(hydrod_partition_lock('make'));
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_inherits
                              WHERE inhparent = 'telemetry_samples'::regclass AND inhrelid = to_regclass(part));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE telemetry_samples INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            -- The day as a constraint of its own: attaching the table again (below, after an
            -- interrupted pruning) need not scan it, and detaching it need not add one.
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (ts >= %L AND ts < %L)', part, part || '_day',
                           day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        END IF;  -- else a day whose pruning stopped after the detach: attached again
        EXECUTE format('ALTER TABLE telemetry_samples ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part,
                       day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        made := made + 1;
    END LOOP;
    RETURN made;
END
$$;

SELECT hydrod_telemetry_partitions(array_agg(DISTINCT (ts AT TIME ZONE 'UTC')::date)) FROM telemetry_samples_v4
HAVING count(*) > 0;
INSERT INTO telemetry_samples (id, node_id, channel, metric_type, value, ts, received_at, metadata)
SELECT id, node_id, channel, metric_type, value, ts, received_at, metadata FROM telemetry_samples_v4;
DROP TABLE telemetry_samples_v4;

-- Rollups: one row per series and bucket (UTC minute, hour, day).
CREATE TABLE telemetry_1m (
    node_id     bigint NOT NULL,
    channel     text NOT NULL,
    metric_type text NOT NULL,
    bucket      timestamptz NOT NULL,
    count       bigint NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    avg         double precision NOT NULL,
    last        double precision NOT NULL,
    last_ts     timestamptz NOT NULL,
    PRIMARY KEY (node_id, channel, metric_type, bucket)
) WITH (fillfactor = 80);  -- room for updates in place (HOT): a bucket is updated once per batch
CREATE TABLE telemetry_1h (LIKE telemetry_1m INCLUDING ALL) WITH (fillfactor = 80);
CREATE TABLE telemetry_1d (LIKE telemetry_1m INCLUDING ALL) WITH (fillfactor = 80);
-- Retention goes by bucket.
CREATE INDEX telemetry_1m_bucket ON telemetry_1m (bucket);
CREATE INDEX telemetry_1h_bucket ON telemetry_1h (bucket);
CREATE INDEX telemetry_1d_bucket ON telemetry_1d (bucket);

INSERT INTO telemetry_1m (node_id, channel, metric_type, bucket, count, min, max, avg, last, last_ts)
SELECT node_id, channel, metric_type, date_trunc('minute', ts, 'UTC'), count(*), min(value), max(value),
       avg(value), (array_agg(value ORDER BY ts DESC))[1], max(ts)
FROM telemetry_samples GROUP BY 1, 2, 3, 4;
INSERT INTO telemetry_1h (node_id, channel, metric_type, bucket, count, min, max, avg, last, last_ts)
SELECT node_id, channel, metric_type, date_trunc('hour', ts, 'UTC'), count(*), min(value), max(value),
       avg(value), (array_agg(value ORDER BY ts DESC))[1], max(ts)
FROM telemetry_samples GROUP BY 1, 2, 3, 4;
INSERT INTO telemetry_1d (node_id, channel, metric_type, bucket, count, min, max, avg, last, last_ts)
SELECT node_id, channel, metric_type, date_trunc('day', ts, 'UTC'), count(*), min(value), max(value),
       avg(value), (array_agg(value ORDER BY ts DESC))[1], max(ts)
FROM telemetry_samples GROUP BY 1, 2, 3, 4;
