-- hydrod schema, version 2: node state that must hold across instances and restarts.

-- The time of the message that set `status` (its own ts where the node gave a
-- real one, never later than when it was received; else when it was received).
-- A status is only replaced by one at least as new, whichever instance commits last.
ALTER TABLE nodes ADD COLUMN status_at timestamptz;

-- When hydrod last sent a bound node, back in the temp namespace, its last
-- applied config again: at most once per nodes.config_resend_interval_s.
ALTER TABLE nodes ADD COLUMN config_resent_at timestamptz;

-- When a config was handed to the broker link. A config_report acknowledges
-- only configs sent: a queued one the node cannot have.
ALTER TABLE node_configs ADD COLUMN sent_at timestamptz;
UPDATE node_configs SET sent_at = coalesce(published_at, created_at) WHERE status <> 'queued';

-- Held reports of nodes that never say hello expire: found by age.
CREATE INDEX held_config_reports_received ON held_config_reports (received_at);
