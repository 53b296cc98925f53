"""hydrod's counters: one Prometheus registry per daemon, served on /metrics and
summarised in the periodic `stats` log line."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter("hydrod_messages_received", "MQTT messages received, by kind", ["kind"], registry=r)
        self.stored = Counter("hydrod_messages_stored", "Messages committed, by actor", ["actor"], registry=r)
        self.rejected = Counter("hydrod_messages_rejected", "Messages dead-lettered or refused, by reason",
                                ["reason"], registry=r)
        self.duplicates = Counter("hydrod_messages_duplicate",
                                  "Messages not stored again: a broker redelivery, or the same sample or event"
                                  " sent twice, by kind", ["kind"], registry=r)
        self.acked = Counter("hydrod_messages_acked", "QoS 1 messages acknowledged to the broker", registry=r)
        self.answered = Counter("hydrod_messages_answered",
                                "Time requests settled by their answer (nothing to store)", registry=r)
        self.deferred = Counter("hydrod_messages_deferred",
                                "Messages left to the broker for redelivery (received while stopping)", registry=r)
        self.ts_replaced = Counter("hydrod_ts_replaced", "Node timestamps replaced by the receive time, by rule",
                                   ["rule"], registry=r)
        self.batch_seconds = Histogram("hydrod_batch_seconds", "Time to write and commit one batch", ["actor"],
                                       registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                            0.5, 1, 2.5, 5))
        self.db_up = Gauge("hydrod_db_up", "1 when the actor's last database write succeeded", ["actor"], registry=r)
        self.mqtt_connected = Gauge("hydrod_mqtt_connected", "1 while the broker link is up", registry=r)
        self.pending = Gauge("hydrod_messages_pending", "Messages received and not yet acknowledged", registry=r)
        self.publish_deferred = Counter("hydrod_publish_deferred",
                                        "Publishes not sent because the link was down", registry=r)
        self.http_connections_shed = Counter("hydrod_http_connections_shed",
                                             "Idle HTTP connections closed to make room for a new one", registry=r)
        self.restarts = Counter("hydrod_actor_restarts", "Actor restarts, by actor", ["actor"], registry=r)
        self.nodes_registered = Counter("hydrod_nodes_registered", "Nodes created by a node_hello", registry=r)
        self.nodes_marked_offline = Counter("hydrod_nodes_marked_offline", "Nodes marked offline for silence",
                                            registry=r)
        self.held_reports_expired = Counter("hydrod_held_reports_expired",
                                            "Held config_reports dropped: their node never said hello", registry=r)
        self.configs_resent = Counter("hydrod_configs_resent",
                                      "Last applied configs sent again to bound nodes back in the temp namespace",
                                      registry=r)
        self.configs_published = Counter("hydrod_configs_published", "Configs taken by the broker", registry=r)
        self.configs_applied = Counter("hydrod_configs_applied", "Configs acknowledged by their node", registry=r)
        self.config_timeouts = Counter("hydrod_config_timeouts", "Configs never acknowledged", registry=r)
        self.commands = Counter("hydrod_commands", "Commands entering each status (SPEC §7)", ["status"], registry=r)
        self.command_responses = Counter("hydrod_command_responses",
                                         "command_responses by what became of them: applied, ignored (duplicate,"
                                         " out of order), unknown (no such command of that node), invalid",
                                         ["outcome"], registry=r)
        self.history_prunings = Counter("hydrod_history_prunings",
                                        "Retention rounds done (history_pruned), at start-up and hourly", registry=r)
        self.history_prune_failures = Counter("hydrod_history_prune_failures",
                                              "Retention rounds that failed (history_prune_failed)", registry=r)
        self.history_partitions_dropped = Counter("hydrod_history_partitions_dropped",
                                                  "Days of raw samples dropped by retention", registry=r)
        self.history_rollup_rows_deleted = Counter("hydrod_history_rollup_rows_deleted",
                                                   "Rollup rows deleted by retention, by table", ["table"],
                                                   registry=r)

    def accounts(self) -> dict[str, int]:
        """Where the received messages went. Once nothing is pending,
        received == committed + duplicate + answered + rejected. `refused` (QoS 0 turned away at the
        door: overload, stopping) and `deferred` (QoS 1 left to the broker while stopping)
        were never taken in, so they are not part of `received`."""
        rejected = _values(self.rejected, "reason")
        refused = rejected.pop("overload", 0) + rejected.pop("stopping", 0)
        rejected.pop("message_dropped", 0)  # an internal request, not a received message
        total = lambda metric, label="": int(sum(_values(metric, label).values()))  # noqa: E731
        return {"received": total(self.received, "kind"), "committed": total(self.stored, "actor"),
                "duplicate": total(self.duplicates, "kind"), "answered": total(self.answered), "rejected": int(sum(rejected.values())),
                "pending": total(self.pending), "refused": int(refused), "deferred": total(self.deferred)}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self) -> dict[str, object]:
        """Every counter and gauge for the `stats` log line, jq-friendly: a number,
        or {label value: number} for a labelled one (`.messages_received_total.telemetry`)."""
        out: dict[str, object] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket", "_sum")):
                    continue
                name = sample.name.removeprefix("hydrod_")
                if sample.labels:
                    out.setdefault(name, {})[",".join(sample.labels.values())] = sample.value  # type: ignore[index]
                else:
                    out[name] = sample.value
        return out


def _values(metric: Counter | Gauge, label: str = "") -> dict[str, float]:
    """A counter's totals (or a gauge's values), by the value of `label`."""
    return {sample.labels.get(label, ""): sample.value for family in metric.collect()
            for sample in family.samples if not sample.name.endswith("_created")}
