"""History: what the history writer makes of telemetry, heartbeats, status, last
wills and node events, and its periodic sweep.

`write` stages each message as a row (store.STAGE_COLUMNS), or refuses it by the
protocol's rules, and has store.write_history store the staged rows in one
statement; it says what was refused, and what was there already (a redelivery,
or the same sample or event sent again). `sweep` marks silent nodes offline
and drops held config reports whose node never said hello. The batching, the
commit and the dead letters are the batcher's (core/batcher.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

import psycopg

from .. import protocol, store
from ..protocol import (EVENT_KINDS, HEARTBEAT, LWT, MS_KINDS, REJECT, STATUS, TELEMETRY,
                        Heartbeat, Rejected, Routed, Status, Telemetry)
from .batcher import Refusal, Written

_REJECT_DETAIL = {
    protocol.TOO_LARGE: f"payload over {protocol.MAX_PAYLOAD} bytes",
    protocol.UNKNOWN_TOPIC: "topic shape not in the protocol (SPEC §1)",
}


class History:
    def __init__(self, *, metrics, log, offline_after_s: float, held_report_ttl_s: float):
        self.metrics = metrics
        self.log = log
        self.offline_after_s = offline_after_s
        self.held_report_ttl_s = held_report_ttl_s

    def write(self, cur: psycopg.Cursor, items: list[Routed]) -> Written:
        rows, refused = [], []
        replaced: Counter[str] = Counter()
        for item in items:
            try:
                row = stage(item, replaced)
            except Rejected as exc:
                refused.append(Refusal(item, exc.reason, exc.detail))
                continue
            if row is None:
                refused.append(Refusal(item, item.reason or protocol.UNKNOWN_TOPIC,
                                       item.detail or _REJECT_DETAIL.get(item.reason or "", "")))
            else:
                rows.append((*row, _delivery(item) if row[-1] is None and item.kind != TELEMETRY else None,
                             item.dup))
        statuses: dict[str, str] = {}
        duplicates: Counter[str] = Counter()  # accepted, not stored again
        redelivered: list[Routed] = []
        if rows:
            by_seq = {item.seq: item for item in items}
            done = store.write_history(cur, rows)
            for seq, reason, detail in done.refused:
                item = by_seq[seq]
                refused.append(Refusal(item, reason, detail or _explain(reason, item)))
            statuses = done.statuses
            # What was accepted and not written was there already: a redelivery, or the same
            # sample or event (same ts, same bytes) sent again.
            accepted = Counter(row[1] for row in rows)
            accepted.subtract(by_seq[seq].kind for seq, _, _ in done.refused)
            duplicates = Counter({kind: count - done.written.get(kind, 0)
                                  for kind, count in accepted.items() if count > done.written.get(kind, 0)})
            redelivered = [by_seq[seq] for seq in done.redelivered]
        for rule, count in replaced.items():
            self.metrics.ts_replaced.labels(rule).inc(count)

        def announce() -> None:
            for uid, status in statuses.items():
                self.log.info("node_online" if status == "online" else "node_offline", node_uid=uid)
            for kind, count in duplicates.items():
                self.metrics.duplicates.labels(kind).inc(count)
            if duplicates:
                self.log.debug("duplicates_skipped", by_kind=dict(duplicates), redelivered=len(redelivered),
                               first_topic=redelivered[0].topic if redelivered else None)

        return Written(refused, sum(duplicates.values()), announce)

    def sweep(self, cur: psycopg.Cursor) -> Callable[[], None]:
        """Mark nodes silent for offline_after_s offline; drop expired held reports.
        Returns what to announce once committed."""
        silent = store.mark_silent_offline(cur, self.offline_after_s)
        expired = store.expire_held_reports(cur, self.held_report_ttl_s)

        def announce() -> None:
            for uid in silent:
                self.log.info("node_offline", node_uid=uid, reason="silent", after_s=self.offline_after_s)
            self.metrics.nodes_marked_offline.inc(len(silent))
            for node_key, topic, age_s in expired:
                self.log.info("config_report_expired", node_key=node_key, topic=topic, age_s=round(age_s, 3),
                              ttl_s=self.held_report_ttl_s)
            self.metrics.held_reports_expired.inc(len(expired))

        return announce


def stage(item: Routed, replaced: Counter) -> tuple | None:
    """One staging row (store.STAGE_COLUMNS, but the last two) for an item, None for a reject;
    Rejected for a payload that breaks the protocol's rules. Counts replaced timestamps by rule."""
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
