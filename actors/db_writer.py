"""DbWriter: the node history service. Owns the connection pool for history.

It stores telemetry, heartbeats, status, last wills and node events in
batches (see consumer.py for when a batch is written and acknowledged),
dead-letters whatever breaks the rules, and marks silent nodes offline.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg

from .. import protocol, store
from ..protocol import (EVENT_KINDS, HEARTBEAT, LWT, MS_KINDS, REJECT, STATUS, TELEMETRY,
                        Heartbeat, Rejected, Routed, Status, Telemetry)
from .base import Ticker
from .consumer import BatchConsumer, Refusal

_REJECT_DETAIL = {
    protocol.TOO_LARGE: f"payload over {protocol.MAX_PAYLOAD} bytes",
    protocol.UNKNOWN_TOPIC: "topic shape not in the protocol (SPEC §1)",
}


@dataclass(frozen=True)
class SweepOffline:
    """Ticker: mark nodes silent for `offline_after_s` offline; drop expired held reports."""


class DbWriter(BatchConsumer):
    def __init__(self, context, *, offline_after_s: float, held_report_ttl_s: float, **kwargs):
        super().__init__(context, **kwargs)
        self.offline_after_s = offline_after_s
        self.held_report_ttl_s = held_report_ttl_s
        self._sweeper: Ticker | None = None
        self._status_changes: dict[str, str] = {}
        self._duplicates: Counter[str] = Counter()  # of the last write: accepted, not stored again
        self._redelivered: list[Routed] = []

    def on_start(self) -> None:
        super().on_start()
        interval = min(self.offline_after_s / 4, 5.0)
        self._sweeper = Ticker(f"{self.ctx.name}-offline", self.ctx.address, SweepOffline(), interval).start()

    def release(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        super().release()

    def configure_connection(self, conn: psycopg.Connection) -> None:
        store.prepare_connection(conn)

    def handle_other(self, message: Any) -> Any:
        match message:
            case SweepOffline():
                self._sweep_offline()
            case _:
                return super().handle_other(message)
        return None

    def committed(self) -> None:
        for uid, status in self._status_changes.items():
            self.log.info("node_online" if status == "online" else "node_offline", node_uid=uid)
        for kind, count in self._duplicates.items():
            self.metrics.duplicates.labels(kind).inc(count)
        if self._duplicates:
            self.log.debug("duplicates_skipped", by_kind=dict(self._duplicates), redelivered=len(self._redelivered),
                           first_topic=(self._redelivered or [None])[0] and self._redelivered[0].topic)

    def not_stored(self) -> int:
        return sum(self._duplicates.values())

    def write(self, cur: psycopg.Cursor, items: list[Routed]) -> list[Refusal]:
        self._status_changes: dict[str, str] = {}
        self._duplicates, self._redelivered = Counter(), []
        rows, refused = [], []
        replaced: Counter[str] = Counter()
        for item in items:
            try:
                row = self._stage(item, replaced)
            except Rejected as exc:
                refused.append(Refusal(item, exc.reason, exc.detail))
                continue
            if row is None:
                refused.append(Refusal(item, item.reason or protocol.UNKNOWN_TOPIC,
                                       item.detail or _REJECT_DETAIL.get(item.reason or "", "")))
            else:
                rows.append((*row, _delivery(item) if row[-1] is None and item.kind != TELEMETRY else None,
                             item.dup))
        if rows:
            by_seq = {item.seq: item for item in items}
            done = store.write_history(cur, rows)
            for seq, reason, detail in done.refused:
                item = by_seq[seq]
                refused.append(Refusal(item, reason, detail or _explain(reason, item)))
            self._status_changes = done.statuses
            # What was accepted and not written was there already: a redelivery, or the same
            # sample or event (same ts, same bytes) sent again.
            accepted = Counter(row[1] for row in rows)
            accepted.subtract(by_seq[seq].kind for seq, _, _ in done.refused)
            self._duplicates = Counter({kind: count - done.written.get(kind, 0)
                                        for kind, count in accepted.items() if count > done.written.get(kind, 0)})
            self._redelivered = [by_seq[seq] for seq in done.redelivered]
        for rule, count in replaced.items():
            self.metrics.ts_replaced.labels(rule).inc(count)
        return refused

    @staticmethod
    def _stage(item: Routed, replaced: Counter) -> tuple | None:
        """One staging row (store.STAGE_COLUMNS) for an item, None for a reject."""
        kind = item.kind
        if kind == TELEMETRY:
            sample = protocol.decode(item.payload, Telemetry)
            ts, rule = protocol.normalise_ts(sample.ts, item.received_at)
            if rule:
                replaced[rule] += 1
            return (item.seq, kind, item.node, item.gh, item.zone, item.channel,
                    sample.metric_type.upper(), sample.value, ts, item.received_at,
                    True, None, None, None, None, item.payload.decode(), None)
        if kind == HEARTBEAT:
            beat = protocol.decode(item.payload, Heartbeat)
            return (item.seq, kind, item.node, item.gh, item.zone, None, None, None,
                    item.received_at, item.received_at, True, beat.uptime, beat.free_heap,
                    beat.rssi, beat.fw_version, item.payload.decode(),
                    None)  # no identity of its own: two alike are two heartbeats (see _delivery)
        if kind == STATUS:
            status = protocol.decode(item.payload, Status)
            if status.status is None:
                online = True  # a safe-mode report: kept as an event, the node is alive
            elif status.status.upper() in ("ONLINE", "OFFLINE"):
                online = status.status.upper() == "ONLINE"
            else:
                raise Rejected(protocol.BAD_PAYLOAD, f"status must be ONLINE or OFFLINE, not {status.status!r}")
            ts, rule = protocol.normalise_ts(status.ts, item.received_at)
            if rule and rule != protocol.TS_MISSING:
                replaced[rule] += 1
            return (item.seq, kind, item.node, item.gh, item.zone, None, None, None, ts,
                    item.received_at, online, None, None, None, None, item.payload.decode(),
                    None if rule else _dedup(ts, item.payload))
        if kind == LWT:
            if item.payload.strip().lower() != b"offline":
                raise Rejected(protocol.BAD_PAYLOAD, "a last will must be `offline`")
            return (item.seq, kind, item.node, item.gh, item.zone, None, None, None,
                    item.received_at, item.received_at, False, None, None, None, None, '"offline"', None)
        if kind in EVENT_KINDS:
            event = protocol.decode_object(item.payload)
            raw_ts = event.get("ts")
            if isinstance(raw_ts, bool) or not isinstance(raw_ts, (int, float)):
                raw_ts = None
            ts, rule = protocol.normalise_ts(raw_ts, item.received_at, milliseconds=kind in MS_KINDS)
            if rule:
                replaced[rule] += 1
            return (item.seq, kind, item.node, item.gh, item.zone, item.channel, None, None, ts,
                    item.received_at, True, None, None, None, None, item.payload.decode(),
                    None if rule else _dedup(ts, item.payload))
        if kind == REJECT:
            return None
        raise Rejected(protocol.UNKNOWN_TOPIC, f"hydrod does not store `{kind}` messages")

    def _sweep_offline(self) -> None:
        # Also the writer's heartbeat on the database: with no traffic, /healthz still
        # learns of an outage within one sweep.
        try:
            with self.transaction() as cur:
                silent = store.mark_silent_offline(cur, self.offline_after_s)
                expired = store.expire_held_reports(cur, self.held_report_ttl_s)
        except psycopg.OperationalError as exc:
            self._database_down(exc, retry=bool(self._pending))
            return
        if not self._pending:
            self._database_up()
        for uid in silent:
            self.log.info("node_offline", node_uid=uid, reason="silent", after_s=self.offline_after_s)
        self.metrics.nodes_marked_offline.inc(len(silent))
        for node_key, topic, age_s in expired:
            self.log.info("config_report_expired", node_key=node_key, topic=topic, age_s=round(age_s, 3),
                          ttl_s=self.held_report_ttl_s)
        self.metrics.held_reports_expired.inc(len(expired))


def _dedup(ts: float, payload: bytes) -> str:
    """The identity of an event the node stamped itself: its ts and its bytes."""
    return f"{ts:.6f}:{hashlib.blake2b(payload, digest_size=12).hexdigest()}"


def _delivery(item: Routed) -> str | None:
    """One delivery of a row without an identity of its own: the broker's packet id and
    the bytes. A copy the broker sends again (DUP) after it was stored has the same one,
    and is skipped; a new message alike is stored (README, "Stored once"). QoS 0 messages
    are never sent again: None."""
    if not item.mid:
        return None
    return f"{item.mid}:{hashlib.blake2b(item.payload, digest_size=12).hexdigest()}"


def _explain(reason: str, item: Routed) -> str:
    if reason == protocol.UNKNOWN_NODE:
        return f"no node with uid or hardware id `{item.node}`"
    if reason == protocol.ZONE_MISMATCH:
        return f"node `{item.node}` is bound elsewhere; it sent on {item.gh}/{item.zone}"
    return ""
