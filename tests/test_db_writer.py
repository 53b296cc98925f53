"""DbWriter: the node history service, against real Mosquitto and PostgreSQL.

Each test runs hydrod as a subprocess, talks to it as firmware does (MQTT) and
reads what it committed from the database. What each kind of history becomes is
tested on the plain class, synchronously, in test_history.py."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest

from harness import (Subscriber, bind_node, fixtures, hello, metric_value, publish, query, register_node,
                     wait_until)

PH_HW = "esp32-a1b2c3d4e5f6"
PH_UID = "nd-ph-a1b2c3d4e5f6"


def utc(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, tz=timezone.utc)


def telemetry_topic(node: str, channel: str, gh: str = "gh-1", zone: str = "zn-1") -> str:
    return f"hydro/{gh}/{zone}/{node}/{channel}/telemetry"


def sample(metric: str = "PH", value: float = 6.0, ts: float | None = None, **extra) -> dict:
    payload = {"metric_type": metric, "value": value, **extra}
    if ts is not None:
        payload["ts"] = ts
    return payload


def samples_on(dsn: str, channel: str) -> list[tuple]:
    return query(dsn, "SELECT metric_type, value, ts, received_at, metadata FROM telemetry_samples"
                      " WHERE channel = %s ORDER BY ts", (channel,))


def dead_letters(dsn: str) -> list[tuple[str, str, bytes]]:
    return [(topic, reason, bytes(payload)) for topic, reason, payload in
            query(dsn, "SELECT topic, reason, payload FROM dead_letters ORDER BY id")]


def rows_once(count: int, dsn: str, sql: str, params: tuple = ()):
    """A predicate for wait_until: the rows of `sql` once there are at least `count`."""
    def check() -> list[tuple] | None:
        rows = query(dsn, sql, params)
        return rows if len(rows) >= count else None
    return check


def node(dsn: str, uid: str) -> dict:
    rows = query(dsn, "SELECT status, last_seen_at, last_heartbeat_at, uptime_seconds, free_heap_bytes,"
                      " rssi, fw_version FROM nodes WHERE uid = %s", (uid,))
    assert rows, f"no node {uid}"
    keys = ("status", "last_seen_at", "last_heartbeat_at", "uptime_seconds", "free_heap_bytes",
            "rssi", "fw_version")
    return dict(zip(keys, rows[0]))


@pytest.fixture
def hydrod(make_daemon):
    daemon = make_daemon()
    daemon.wait_ready()
    return daemon


# --- telemetry --------------------------------------------------------------------


def test_firmware_telemetry_is_stored_with_channel_from_topic_and_other_keys_as_metadata(
        hydrod, broker, database):
    register_node(broker.port, database, PH_HW, "ph")
    register_node(broker.port, database, "esp32-0c0d0e0f1011", "irrig")
    telemetry = [m for m in fixtures().messages if m["topic"].endswith("/telemetry")]
    assert len(telemetry) == 3
    publish(broker.port, [(m["topic"], m["payload"]) for m in telemetry])

    rows = wait_until(rows_once(3, database, "SELECT n.uid, s.channel, s.metric_type, s.value, s.ts,"
                                             " s.metadata FROM telemetry_samples s"
                                             " JOIN nodes n ON n.id = s.node_id ORDER BY s.channel"),
                      10, "three fixture samples")
    assert rows == [
        ("nd-irr-0c0d0e0f1011", "level_clean_min", "WATER_LEVEL_SWITCH", 1.0, utc(1710001234), {}),
        (PH_UID, "ph_sensor", "PH", 5.86, utc(1710001234),
         {"unit": "pH", "raw": 1465, "stable": False, "flow_active": False, "corrections_allowed": False}),
        (PH_UID, "solution_temp_c", "TEMPERATURE", 21.5, utc(1710001234), {"unit": "C"}),
    ]


def test_each_timestamp_rule_is_applied_and_every_replacement_is_counted(hydrod, broker, database):
    register_node(broker.port, database, PH_HW)
    now = time.time()
    past = int(now) - 3600
    before = now
    publish(broker.port, [
        (telemetry_topic(PH_UID, "seconds"), sample(ts=past)),
        (telemetry_topic(PH_UID, "millis"), sample(ts=past * 1000 + 250)),
        (telemetry_topic(PH_UID, "uptime"), sample(ts=12)),
        (telemetry_topic(PH_UID, "future"), sample(ts=int(now) + 3600)),
    ])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 4, 10,
               "four samples")
    after = time.time()
    stored = {channel: (ts, received_at) for channel, ts, received_at in
              query(database, "SELECT channel, ts, received_at FROM telemetry_samples")}

    assert stored["seconds"][0] == utc(past)
    assert stored["millis"][0] == utc(past + 0.25)
    for replaced in ("uptime", "future"):
        ts, received_at = stored[replaced]
        assert ts == received_at, f"{replaced}: ts should be the receive time"
        assert utc(before - 1) <= ts <= utc(after + 1), replaced

    status, text = hydrod.http("GET", "/metrics")
    assert status == 200
    assert metric_value(text, "hydrod_ts_replaced_total", rule="uptime") == 1.0
    assert metric_value(text, "hydrod_ts_replaced_total", rule="future") == 1.0
    # A millisecond ts is converted, not replaced.
    assert not metric_value(text, "hydrod_ts_replaced_total", rule="millis")


def test_the_same_samples_published_twice_are_stored_once(hydrod, broker, database):
    register_node(broker.port, database, PH_HW)
    base = int(time.time()) - 10_000
    batch = [(telemetry_topic(PH_UID, "dup"), sample(value=i, ts=base + i)) for i in range(200)]
    publish(broker.port, batch)
    publish(broker.port, batch)
    # Published after both copies on the same link: once it is stored, so are they.
    publish(broker.port, [(telemetry_topic(PH_UID, "sentinel"), sample(ts=base))])
    wait_until(lambda: samples_on(database, "sentinel"), 10, "the sentinel sample")

    counts = query(database, "SELECT count(*), min(value), max(value) FROM telemetry_samples"
                             " WHERE channel = 'dup'")
    assert counts == [(200, 0.0, 199.0)]
    # Both copies were received and settled: the second as a duplicate, none refused or dropped.
    assert dead_letters(database) == []

    def counted() -> tuple:
        metrics = hydrod.http("GET", "/metrics")[1]
        return (metric_value(metrics, "hydrod_messages_received_total", kind="telemetry"),
                metric_value(metrics, "hydrod_messages_stored_total", actor="db_writer"),
                metric_value(metrics, "hydrod_messages_duplicate_total", kind="telemetry"))

    wait_until(lambda: counted() == (401, 201, 200), 5, "401 received: 201 stored, 200 duplicates")


def test_telemetry_from_a_bound_node_on_another_zone_is_dead_lettered_as_zone_mismatch(
        hydrod, broker, database):
    uid = register_node(broker.port, database, PH_HW)
    bind_node(hydrod, broker.port, database, uid, "gh-1", "zn-1")
    t = int(time.time()) - 100
    publish(broker.port, [
        (telemetry_topic(uid, "intruder", gh="gh-2", zone="zn-9"), sample(ts=t)),
        (telemetry_topic(uid, "home", gh="gh-1", zone="zn-1"), sample(ts=t)),
    ])
    wait_until(lambda: samples_on(database, "home"), 10, "the sample from the node's own zone")
    letters = wait_until(lambda: dead_letters(database), 10, "a dead letter")
    assert [(topic, reason) for topic, reason, _ in letters] == [
        (telemetry_topic(uid, "intruder", gh="gh-2", zone="zn-9"), "zone_mismatch")]
    assert samples_on(database, "intruder") == []


def test_telemetry_from_an_unknown_node_is_dead_lettered_as_unknown_node(hydrod, broker, database):
    topic = telemetry_topic("nd-ph-000000000000", "ph")
    publish(broker.port, [(topic, sample(ts=1710000000))])
    letters = wait_until(lambda: dead_letters(database), 10, "a dead letter")
    assert [(t, reason) for t, reason, _ in letters] == [(topic, "unknown_node")]
    assert query(database, "SELECT count(*) FROM telemetry_samples") == [(0,)]
    hydrod.wait_for("message_rejected", reason="unknown_node", topic=topic)


BAD_INPUTS = {
    # channel: (payload bytes, expected dead-letter reason)
    "not_json": (b"pH 6.1", "bad_json"),
    "not_utf8": (b'{"metric_type":"PH","value":\xff\xfe}', "bad_encoding"),
    "wrong_type": (b'{"metric_type":"PH","value":"abc","ts":1710000000}', "bad_payload"),
    "nan": (b'{"metric_type":"PH","value":NaN,"ts":1710000000}', "bad_json"),
    "huge_number": (b'{"metric_type":"PH","value":1e999,"ts":1710000000}', "bad_payload"),
    "too_large": (json.dumps(sample(ts=1710000000, pad="x" * (64 * 1024))).encode(), "too_large"),
    "no_metric": (b'{"value":6.1,"ts":1710000000}', "bad_payload"),
}


def test_each_class_of_bad_input_is_dead_lettered_with_its_reason_and_logged_and_later_samples_are_stored(
        hydrod, broker, database):
    register_node(broker.port, database, PH_HW)
    publish(broker.port, [(telemetry_topic(PH_UID, channel), payload)
                          for channel, (payload, _) in BAD_INPUTS.items()])
    publish(broker.port, [(telemetry_topic(PH_UID, "good"), sample(value=6.2, ts=1710000001))])

    wait_until(lambda: samples_on(database, "good"), 10, "the good sample after the bad ones")
    wait_until(rows_once(len(BAD_INPUTS), database, "SELECT id FROM dead_letters"), 10,
               "a dead letter per bad input")
    letters = dead_letters(database)
    got = {topic.split("/")[4]: (reason, payload) for topic, reason, payload in letters}
    # A payload over 64 KiB is kept as its first 64 KiB: memory is bounded per message.
    assert got == {channel: (reason, payload[:64 * 1024]) for channel, (payload, reason) in BAD_INPUTS.items()}
    assert query(database, "SELECT channel FROM telemetry_samples") == [("good",)]
    for channel, (_, reason) in BAD_INPUTS.items():
        hydrod.wait_for("message_rejected", reason=reason, topic=telemetry_topic(PH_UID, channel))
    assert hydrod.events("actor_failed") == []


def test_a_row_postgresql_refuses_is_dead_lettered_as_store_refused_without_its_payload_in_the_detail(
        hydrod, broker, database):
    # A rule hydrod cannot know of: a constraint an operator added. PostgreSQL refuses
    # the row; its batch mates are stored, and the detail is PostgreSQL's primary
    # message and SQLSTATE, not its error context (which quotes the whole row).
    register_node(broker.port, database, PH_HW)
    query(database, "ALTER TABLE telemetry_samples ADD CONSTRAINT no_sevens CHECK (value <> 7.77)")
    refused = b'{"metric_type":"PH","value":7.77,"ts":1710000050,"secret_marker":"do-not-echo"}'
    topic = telemetry_topic(PH_UID, "refused")
    publish(broker.port, [(telemetry_topic(PH_UID, "good"), sample(ts=1710000000 + i)) for i in range(20)]
            + [(topic, refused)]
            + [(telemetry_topic(PH_UID, "good"), sample(ts=1710000100 + i)) for i in range(20)])
    wait_until(rows_once(1, database, "SELECT id FROM dead_letters"), 10, "the refused sample")
    wait_until(lambda: len(samples_on(database, "good")) == 40, 10, "the other 40 samples")
    [(letter_topic, reason, payload, detail)] = query(
        database, "SELECT topic, reason, payload, detail FROM dead_letters")
    assert (letter_topic, reason, bytes(payload)) == (topic, "store_refused", refused)
    assert "no_sevens" in detail and "23514" in detail
    assert "do-not-echo" not in detail and "7.77" not in detail
    logged = hydrod.wait_for("message_rejected", reason="store_refused", topic=topic)
    assert "do-not-echo" not in json.dumps(logged)


# --- liveness and events -------------------------------------------------------------


def test_a_node_silent_for_offline_after_s_is_marked_offline_and_logged(make_daemon, broker, database):
    daemon = make_daemon(nodes={"offline_after_s": 1.0})
    daemon.wait_ready()
    uid = register_node(broker.port, database, PH_HW)
    # It may already be offline by now; what matters is the monitor did it.
    wait_until(lambda: node(database, uid)["status"] == "offline", 10, "the silent node offline")
    record = daemon.wait_for("node_offline", node_uid=uid, reason="silent")
    assert record["after_s"] == 1.0
    silent_for = query(database, "SELECT extract(epoch FROM now() - last_seen_at) FROM nodes"
                                 " WHERE uid = %s", (uid,))[0][0]
    assert float(silent_for) >= 1.0
    # A message from the node brings it back.
    publish(broker.port, [hello(PH_HW)])
    wait_until(lambda: node(database, uid)["status"] == "online", 10, "online again after a hello")


def test_a_payload_nested_beyond_reason_is_dead_lettered_even_on_the_clock_topic(hydrod, broker, database):
    deep = b'{"message_type":"time_request","x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    with Subscriber(broker.port, "hydro/time/response") as clock:
        publish(broker.port, [("hydro/time/request", deep),
                              (f"hydro/gh-1/zn-1/{PH_UID}/diagnostics", deep)])
        rows = wait_until(rows_once(2, database, "SELECT reason, topic FROM dead_letters ORDER BY topic"),
                          10, "two dead letters")
        # The node still gets its clock.
        [answer] = clock.wait_for(1)
    assert rows == [("bad_json", f"hydro/gh-1/zn-1/{PH_UID}/diagnostics"), ("bad_json", "hydro/time/request")]
    assert hydrod.events("actor_failed") == []
    assert answer.json()["message_type"] == "time_response"


