-- hydrod schema, version 4: what the MQTT link needs to keep its promises.

-- A message with no identity of its own (a heartbeat, a last will, a status or
-- event whose ts hydrod had to replace) is known, for one delivery, by its
-- packet id and a hash of its bytes: `<packet id>:<hash>`. A copy the broker
-- redelivers (DUP set) after it was stored is found by it and stored no more.
-- NULL for a QoS 0 message (the broker never sends one twice) and for rows
-- that carry the node's own identity (`dedup`).
ALTER TABLE node_events ADD COLUMN delivery text;
CREATE INDEX node_events_delivery ON node_events (node_key, kind, delivery) WHERE delivery IS NOT NULL;

-- Every topic filter hydrod subscribed with, per MQTT client id. MQTT cannot
-- list a persistent session's subscriptions, so on connect hydrod unsubscribes
-- those of these that it no longer wants (after a change of mqtt.shared_group).
-- Written before the subscription is made, so it is never short of one.
CREATE TABLE mqtt_subscriptions (
    client_id  text NOT NULL,
    filter     text NOT NULL,
    first_used timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, filter)
);
