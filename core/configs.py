"""Configs: builds, records and publishes NodeConfigs, and watches for their ack.

A push is recorded as `queued` before it is published, so it survives a
broker outage and a daemon restart: queued configs are published whenever the
link comes up, and become `published` on the broker's PUBACK. The time a config
is handed to the link is committed first (`sent_at`): the node's next
config_report (core/registry.py) marks a sent config `applied`, never a queued
one it cannot have; a published config not applied within `ack_timeout_s`
becomes `timeout`. The link is `publish(topic, payload, acked)`: on the PUBACK
of a config, its shell hands `acked` back to `acked()`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import psycopg

from .. import protocol, store
from .database import Database


@dataclass(frozen=True)
class PushResult:
    node_uid: str
    version: int
    topic: str
    status: str  # "published": handed to the broker link; "queued": sent when it comes back


class PushRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ResendConfig:
    """From the registry: bound node `uid` is back in the temp namespace; send it its
    last applied config again, as published (the database has allowed it already)."""

    uid: str
    version: int
    topic: str
    payload: bytes = field(repr=False)  # holds the node's secret


@dataclass(frozen=True)
class Acked:
    """The broker took config row `config_id` (its PUBACK)."""

    config_id: int
    uid: str
    version: int
    topic: str


# --- the body -----------------------------------------------------------------------


class NodeConfigBody(msgspec.Struct):
    """The fields hydrod checks in a pushed NodeConfig; all others are passed on untouched."""

    channels: list[Any]
    node_id: str | None = None
    version: Annotated[int, msgspec.Meta(ge=1, le=2**53)] | None = None  # JSON-safe integers
    type: str | None = None
    mqtt: dict[str, Any] | None = None
    gh_uid: str | None = None
    zone_uid: str | None = None
    node_secret: str | None = None
    wifi: dict[str, Any] | None = None


_FILLED = frozenset({"node_id", "type", "mqtt", "node_secret", "version", "gh_uid", "zone_uid"})
_SECRET = re.compile(r"[0-9a-fA-F]{64}")


def build_config(node: dict[str, Any], body: Any) -> tuple[dict[str, Any], str]:
    """The NodeConfig to publish and its topic, or PushRefused naming the field."""
    if not isinstance(body, dict):
        raise PushRefused(400, "body must be a JSON object (a NodeConfig)")
    try:
        checked = msgspec.convert(body, NodeConfigBody)
    except msgspec.ValidationError as exc:
        raise PushRefused(400, f"invalid NodeConfig: {exc}") from None
    if checked.node_id is not None and checked.node_id != node["uid"]:
        raise PushRefused(400, f"invalid NodeConfig: `node_id` must be the node's uid `{node['uid']}`"
                               " - at `$.node_id`")
    if checked.node_secret is not None and not _SECRET.fullmatch(checked.node_secret):
        raise PushRefused(400, "invalid NodeConfig: `node_secret` must be 64 hex characters - at `$.node_secret`")
    for field in ("gh_uid", "zone_uid"):
        value = getattr(checked, field)
        if value is not None and (not protocol.is_segment(value) or value in (protocol.TEMP_GH, protocol.TEMP_ZONE)):
            raise PushRefused(400, f"invalid NodeConfig: `{field}` is not a usable topic segment - at `$.{field}`")
    if (checked.gh_uid is None) != (checked.zone_uid is None):
        raise PushRefused(400, "invalid NodeConfig: `gh_uid` and `zone_uid` go together")

    if node["lifecycle_state"] == "DECOMMISSIONED":
        raise PushRefused(409, f"node {node['uid']} is decommissioned")
    if checked.version is not None and checked.version <= node["last_version"]:
        raise PushRefused(409, f"`version` {checked.version} is not above the last pushed, "
                               f"{node['last_version']} - at `$.version`")
    # A field given as null is filled in like a missing one: the firmware refuses nulls.
    config = {key: value for key, value in body.items() if value is not None or key not in _FILLED}
    if node["gh_uid"] is None:
        if checked.gh_uid is None:
            raise PushRefused(409, f"node {node['uid']} is not bound to a zone: the config must name "
                                   "`gh_uid` and `zone_uid`")
        topic = protocol.temp_config_topic(node["hardware_id"])
    else:
        if checked.gh_uid is not None and (checked.gh_uid, checked.zone_uid) != (node["gh_uid"], node["zone_uid"]):
            raise PushRefused(409, f"node {node['uid']} is bound to {node['gh_uid']}/{node['zone_uid']}, "
                                   f"not {checked.gh_uid}/{checked.zone_uid}")
        config.setdefault("gh_uid", node["gh_uid"])
        config.setdefault("zone_uid", node["zone_uid"])
        topic = protocol.config_topic(node["gh_uid"], node["zone_uid"], node["uid"])
    config.setdefault("node_id", node["uid"])
    config.setdefault("type", node["type"])
    config.setdefault("mqtt", {"configured": True})
    config.setdefault("node_secret", node["node_secret"])
    config.setdefault("version", node["last_version"] + 1)
    return config, topic


# --- the publisher ------------------------------------------------------------------


class Configs:
    def __init__(self, db: Database, *, publish: Callable[[str, bytes, Acked | None], None], metrics, log,
                 ack_timeout_s: float):
        self.db = db
        self.publish = publish
        self.metrics = metrics
        self.log = log
        self.ack_timeout_s = ack_timeout_s
        self.link_up = False
        self._in_flight: set[int] = set()  # sent on this link, PUBACK not seen yet

    def push(self, uid: str, body: Any, deadline: float) -> PushResult:
        """Push `body` to node `uid`, or PushRefused. `deadline` (time.monotonic()): the
        asker gives up then, so the push must not happen after it: a caller told
        "busy" must be able to retry without pushing twice."""
        too_late = PushRefused(503, "hydrod is busy: the push was not made; it is safe to retry")
        left = deadline - time.monotonic()
        if left <= 0.05:
            raise too_late
        with self.db.transaction(timeout=left) as cur:
            # A node row locked by another writer must not hold the push past its deadline.
            cur.execute(f"SET LOCAL lock_timeout = {max(int(left * 1000) - 50, 1)}")
            try:
                node = store.node_for_push(cur, uid)
            except psycopg.errors.LockNotAvailable:
                raise too_late from None
            if node is None:
                raise PushRefused(404, f"no node with uid {uid}")
            config, topic = build_config(node, body)
            if config["node_secret"] != node["node_secret"]:
                # An operator's secret replaces the generated one, and is kept from now on.
                store.keep_node_secret(cur, node["id"], config["node_secret"])
            try:
                payload = msgspec.json.encode(config)
            except (msgspec.EncodeError, UnicodeEncodeError, OverflowError) as exc:
                raise PushRefused(400, f"invalid NodeConfig: cannot be encoded as JSON ({exc})") from None
            config_id = store.record_config(cur, node_id=node["id"], version=int(config["version"]),
                                            payload=payload, topic=topic)
            sending = self.link_up
            if sending:
                store.mark_sent(cur, [config_id])
            if time.monotonic() > deadline:
                raise too_late  # rolls the transaction back
        version = int(config["version"])
        self.log.info("config_queued", node_uid=uid, version=version, topic=topic, link_up=sending)
        if sending:
            self._send(config_id, uid, version, topic, payload)
        return PushResult(uid, version, topic, "published" if sending else "queued")

    def link_changed(self, up: bool) -> None:
        self.link_up = up
        self._in_flight.clear()
        if up:
            self._publish_queued()

    def acked(self, acked: Acked) -> None:
        self._in_flight.discard(acked.config_id)
        try:
            with self.db.transaction() as cur:
                store.mark_published(cur, acked.config_id, acked.topic)
        except psycopg.OperationalError as exc:
            # Still `queued` in the database: it is published again later, which the node tolerates.
            self.db.down(exc, doing="mark config published")
            return
        self.db.up()
        self.metrics.configs_published.inc()
        self.log.info("config_published", node_uid=acked.uid, version=acked.version, topic=acked.topic)

    def resend(self, resend: ResendConfig) -> None:
        if not self.link_up:
            # The node asks again on its next connect, once the interval is over.
            self.log.warning("config_resend_skipped", node_uid=resend.uid, version=resend.version,
                             reason="broker link down")
            return
        self.publish(resend.topic, resend.payload, None)
        self.metrics.configs_resent.inc()
        self.log.info("config_resent", node_uid=resend.uid, version=resend.version, topic=resend.topic)

    def expire(self) -> None:
        """Time out configs the node never acknowledged; send again what a dropped link lost."""
        try:
            with self.db.transaction() as cur:
                expired = store.expire_configs(cur, self.ack_timeout_s)
                queued = self._to_send(cur) if self.link_up else []
        except psycopg.OperationalError as exc:
            self.db.down(exc, doing="expire unacknowledged configs")
            return  # the schedule goes on: the next round tries again
        self.db.up()
        for uid, version, topic in expired:
            self.metrics.config_timeouts.inc()
            self.log.warning("config_timeout", node_uid=uid, version=version, topic=topic,
                             timeout_s=self.ack_timeout_s)
        # A queued config whose publish was lost with a dropped link goes out again.
        for config_id, uid, version, topic, payload in queued:
            self._send(config_id, uid, version, topic, payload)

    def _send(self, config_id: int, uid: str, version: int, topic: str, payload: bytes) -> None:
        """Hand a config to the link; its sent_at is committed already."""
        self._in_flight.add(config_id)
        self.publish(topic, payload, Acked(config_id, uid, version, topic))

    def _to_send(self, cur: psycopg.Cursor) -> list[tuple[int, str, int, str, bytes]]:
        """The queued configs not on their way yet, recorded as sent in `cur`'s transaction."""
        queued = [q for q in store.queued_configs(cur) if q[0] not in self._in_flight]
        if queued:
            store.mark_sent(cur, [q[0] for q in queued])
        return queued

    def _publish_queued(self) -> None:
        try:
            with self.db.transaction() as cur:
                queued = self._to_send(cur)
        except psycopg.OperationalError as exc:
            self.db.down(exc, doing="publish queued configs")
            return  # the next link-up or expiry round tries again
        self.db.up()
        for config_id, uid, version, topic, payload in queued:
            self._send(config_id, uid, version, topic, payload)
