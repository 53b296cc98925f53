-- hydrod schema, version 1 (SPEC §4). Times are timestamptz, in UTC.

CREATE TABLE nodes (
    id                bigserial PRIMARY KEY,
    uid               text NOT NULL UNIQUE,
    hardware_id       text NOT NULL UNIQUE,
    type              text NOT NULL DEFAULT 'unknown',
    fw_version        text,
    hardware_revision text,
    capabilities      jsonb NOT NULL DEFAULT '[]',
    name              text,
    lifecycle_state   text NOT NULL DEFAULT 'REGISTERED_BACKEND' CHECK (lifecycle_state IN (
        'MANUFACTURED', 'UNPROVISIONED', 'PROVISIONED_WIFI', 'REGISTERED_BACKEND',
        'ASSIGNED_TO_ZONE', 'ACTIVE', 'DEGRADED', 'MAINTENANCE', 'DECOMMISSIONED')),
    status            text NOT NULL DEFAULT 'offline' CHECK (status IN ('online', 'offline')),
    gh_uid            text,
    zone_uid          text,
    config            jsonb,
    config_reported_at timestamptz,
    node_secret       text,
    last_seen_at      timestamptz,
    last_heartbeat_at timestamptz,
    uptime_seconds    double precision,
    free_heap_bytes   bigint,
    rssi              integer,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX nodes_online_seen ON nodes (last_seen_at) WHERE status = 'online';

CREATE TABLE node_configs (
    id           bigserial PRIMARY KEY,
    node_id      bigint NOT NULL REFERENCES nodes (id),
    version      bigint NOT NULL,
    config       jsonb NOT NULL,
    payload      text NOT NULL,  -- the exact bytes published
    topic        text NOT NULL,
    status       text NOT NULL CHECK (status IN ('queued', 'published', 'applied', 'timeout')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    applied_at   timestamptz
);
CREATE INDEX node_configs_node ON node_configs (node_id, version);
CREATE INDEX node_configs_open ON node_configs (status) WHERE status IN ('queued', 'published');

-- A config_report from a node that is not registered yet waits here, the
-- latest one per node, until its node_hello arrives.
CREATE TABLE held_config_reports (
    node_key    text PRIMARY KEY,  -- the topic's node segment: a uid or a hardware id
    gh          text NOT NULL,
    zone        text NOT NULL,
    topic       text NOT NULL,
    payload     jsonb NOT NULL,
    received_at timestamptz NOT NULL
);

CREATE TABLE telemetry_samples (
    id          bigserial PRIMARY KEY,
    node_id     bigint NOT NULL REFERENCES nodes (id),
    channel     text NOT NULL,
    metric_type text NOT NULL,
    value       double precision NOT NULL,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    UNIQUE (node_id, channel, metric_type, ts)
);
CREATE INDEX telemetry_samples_ts ON telemetry_samples (ts);

CREATE TABLE telemetry_last (
    node_id     bigint NOT NULL REFERENCES nodes (id),
    channel     text NOT NULL,
    metric_type text NOT NULL,
    value       double precision NOT NULL,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (node_id, channel, metric_type)
);

CREATE TABLE node_events (
    id          bigserial PRIMARY KEY,
    node_id     bigint REFERENCES nodes (id),
    node_key    text NOT NULL,  -- the topic's node segment, kept when the node is unknown
    channel     text,
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    -- The node's own ts and a hash of the payload, when the node stamped it: a
    -- redelivered event is then stored once. NULL when hydrod had to stamp it.
    dedup       text
);
CREATE INDEX node_events_node_ts ON node_events (node_id, ts);
CREATE UNIQUE INDEX node_events_once ON node_events (node_key, kind, dedup) WHERE dedup IS NOT NULL;

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL,
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    reason      text NOT NULL,
    detail      text NOT NULL DEFAULT ''
);
CREATE INDEX dead_letters_received ON dead_letters (received_at);
