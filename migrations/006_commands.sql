-- hydrod schema, version 6: signed commands to nodes, tracked to a final state (SPEC §7).

-- The node segment a node itself uses in its topics since it was bound: its uid,
-- or its hardware id for nodes that keep that. Taken from its config_report from
-- its own gh/zone; NULL (never reported from there) means its uid.
ALTER TABLE nodes ADD COLUMN topic_key text;

CREATE TABLE commands (
    id          bigserial PRIMARY KEY,  -- creation order: per node, commands go out in it
    cmd_id      text NOT NULL UNIQUE,
    node_id     bigint NOT NULL REFERENCES nodes (id),
    channel     text NOT NULL,
    cmd         text NOT NULL,
    params      jsonb NOT NULL,
    ttl_s       double precision NOT NULL,
    status      text NOT NULL CHECK (status IN ('QUEUED', 'SENT', 'ACK', 'DONE', 'NO_EFFECT', 'ERROR',
                                                'INVALID', 'BUSY', 'TIMEOUT', 'EXPIRED')),
    topic       text,   -- as last published
    payload     jsonb,  -- as last published, with `sig`
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- When it was handed to the broker link, committed before the hand-over. A
    -- command handed over is never handed over again: it may have reached the node.
    handed_at   timestamptz,
    sent_at     timestamptz,  -- the broker's PUBACK
    acked_at    timestamptz,
    finished_at timestamptz,
    expires_at  timestamptz NOT NULL,
    late        boolean NOT NULL DEFAULT false,  -- its final answer came after TIMEOUT
    error_code  text,
    error_message text,
    details     jsonb
);
-- What is waiting to go out, per node in creation order.
CREATE INDEX commands_waiting ON commands (node_id, id) WHERE status = 'QUEUED';
-- What is waiting for an answer, for the timeout sweep.
CREATE INDEX commands_open ON commands (status) WHERE status IN ('QUEUED', 'SENT', 'ACK');
CREATE INDEX commands_by_node ON commands (node_id, id DESC);

-- Every change of a command's status, with its time.
CREATE TABLE command_transitions (
    id          bigserial PRIMARY KEY,
    command_id  bigint NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    status      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    late        boolean NOT NULL DEFAULT false,
    detail      jsonb  -- the node's answer (error_code, details) or why hydrod moved it
);
CREATE INDEX command_transitions_command ON command_transitions (command_id, id);

-- Answers are kept as node events (SPEC §1) and also move their command. At start,
-- hydrod applies to its open commands any answer kept while it was not there to.
CREATE INDEX node_events_command_response ON node_events ((payload->>'cmd_id')) WHERE kind = 'command_response';
