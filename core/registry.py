"""Registry: node_hello and config_report; the authority on which nodes exist.

Registration is decided in PostgreSQL under row locks (store.register_node),
so that several hydrod instances sharing the load agree on every uid. A
config_report from a node not registered yet is held in the database and
applied when its node_hello arrives. A bound node back in the temp namespace
is due its last applied config again (README, "Self-healing"): `resend` is
told, once the batch is committed. The batching and the commit are the
batcher's (core/batcher.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from .. import protocol, store
from ..protocol import CONFIG_REPORT, HELLO, NodeHello, Rejected, Routed
from .batcher import Refusal, Written
from .configs import ResendConfig


class _Batch:
    """What one write did, announced once it is committed."""

    def __init__(self) -> None:
        self.announcements: list[tuple[str, dict[str, Any]]] = []
        self.resends: list[ResendConfig] = []
        self.created: set[str] = set()  # keys (hardware id, uid) of the nodes this batch created


class Registry:
    def __init__(self, *, resend: Callable[[ResendConfig], None], resend_interval_s: float, metrics, log):
        self.resend = resend
        self.resend_interval_s = resend_interval_s
        self.metrics = metrics
        self.log = log

    def write(self, cur: psycopg.Cursor, items: list[Routed]) -> Written:
        batch = _Batch()
        refused = []
        for item in items:
            try:
                if item.kind == HELLO:
                    self._register(cur, batch, item)
                elif item.kind == CONFIG_REPORT:
                    report = protocol.decode_object(item.payload)
                    self._apply_report(cur, batch, item.node, item.gh, item.zone, item.topic, report,
                                       item.received_at)
                else:
                    raise Rejected(protocol.UNKNOWN_TOPIC, f"the registry does not take `{item.kind}`")
            except Rejected as exc:
                refused.append(Refusal(item, exc.reason, exc.detail))
        if batch.created:
            # Reports held for the nodes this batch created: found once for the batch,
            # under the node keys' locks, so a report another instance is holding
            # right now is either seen here or finds the node itself.
            store.lock_node_keys(cur, batch.created)
            for held in store.take_held_reports(cur, batch.created):
                self._apply_report(cur, batch, held["node_key"], held["gh"], held["zone"], held["topic"],
                                   held["payload"], float(held["received_at"]))
        return Written(refused, 0, lambda: self._announce(batch))

    def _announce(self, batch: _Batch) -> None:
        for event, fields in batch.announcements:
            self.log.info(event, **fields)
            if event == "node_registered":
                self.metrics.nodes_registered.inc()
            elif event == "config_applied":
                self.metrics.configs_applied.inc()
        for resend in batch.resends:
            self.resend(resend)

    def _register(self, cur: psycopg.Cursor, batch: _Batch, item: Routed) -> None:
        hello = protocol.decode(item.payload, NodeHello)
        node_type = protocol.normalise_type(hello.node_type)
        meta = hello.provisioning_meta
        result = store.register_node(
            cur, hardware_id=hello.hardware_id, node_type=node_type, fw_version=hello.fw_version,
            capabilities=hello.capabilities, hardware_revision=hello.hardware_revision,
            name=meta.node_name if meta else None, wanted_uid=protocol.provisioned_uid(hello),
            base=protocol.base_uid(hello.hardware_id, node_type), seen_at=item.received_at,
        )
        if result.created:
            batch.created.update((hello.hardware_id, result.uid))
            batch.announcements.append(("node_registered", {
                "node_uid": result.uid, "hardware_id": hello.hardware_id, "node_type": node_type,
                "fw_version": hello.fw_version}))
        else:
            batch.announcements.append(("node_updated", {
                "node_uid": result.uid, "hardware_id": hello.hardware_id, "changed": list(result.changed)}))

    def _apply_report(self, cur: psycopg.Cursor, batch: _Batch, node_key: str, gh: str, zone: str, topic: str,
                      report: dict[str, Any], received_at: float) -> None:
        outcome = store.store_config_report(cur, node_key=node_key, gh=gh, zone=zone,
                                            temp=protocol.is_temp(gh, zone), topic=topic,
                                            config=report, received_at=received_at,
                                            resend_interval_s=self.resend_interval_s)
        if outcome.uid is None:
            batch.announcements.append(("config_report_held", {"node_key": node_key, "topic": topic}))
            return
        for version in outcome.applied_versions:
            batch.announcements.append(("config_applied", {"node_uid": outcome.uid, "version": version}))
        if outcome.resend is not None:
            version, payload, hardware_id = outcome.resend
            batch.resends.append(ResendConfig(
                outcome.uid, version, protocol.temp_config_topic(hardware_id), payload))
        if outcome.bound_to is not None:
            batch.announcements.append(("node_bound", {"node_uid": outcome.uid, "gh_uid": outcome.bound_to[0],
                                                      "zone_uid": outcome.bound_to[1]}))
