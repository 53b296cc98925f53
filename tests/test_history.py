"""core/history.py, driven synchronously on a real PostgreSQL (no actor, no broker):
what each kind of history becomes, what is refused and why, what is announced only
once committed, and the offline sweep. Messages are classified by their topic as
MqttIo does (protocol.classify); what the wire adds (routing, DUP, redelivery) is
in test_db_writer.py and test_mqtt_session.py."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import psycopg
import pytest

from harness import RecordingLog, fixtures, query, routed
from hydrod import store
from hydrod.core.history import History
from hydrod.metrics import Metrics

HW, UID = "esp32-a1b2c3d4e5f6", "nd-ph-a1b2c3d4e5f6"
AT = f"hydro/gh-1/zn-1/{UID}"


def utc(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, tz=timezone.utc)


@pytest.fixture
def history():
    return History(metrics=Metrics(), log=RecordingLog(), offline_after_s=60.0, held_report_ttl_s=3600.0)


@pytest.fixture
def write(migrated, history):
    """write(*messages) -> Written: (topic, payload) pairs, numbered in order, written by
    `history` in one committed transaction, as the batcher does."""
    with psycopg.connect(migrated) as conn:
        store.prepare_connection(conn)
        seq = iter(range(1_000_000))

        def run(*messages, received_at=None):
            items = [routed(next(seq), topic, payload, received_at=received_at) for topic, payload in messages]
            with conn.transaction(), conn.cursor() as cur:
                return history.write(cur, items)

        yield run


def register(dsn, hardware_id=HW, base=UID, seen_at=None):
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        store.register_node(cur, hardware_id=hardware_id, node_type="ph", fw_version="1.0.0", capabilities=["ph"],
                            hardware_revision=None, name=None, wanted_uid=None, base=base,
                            seen_at=seen_at or time.time())


def sample(value, ts, channel="ph", node=UID, gh="gh-1", zone="zn-1", **extra):
    return (f"hydro/{gh}/{zone}/{node}/{channel}/telemetry",
            {"metric_type": "ph", "value": value, "ts": ts, "unit": "pH", **extra})


def node(dsn):
    [row] = query(dsn, "SELECT status, last_heartbeat_at, uptime_seconds, free_heap_bytes, rssi, fw_version"
                       " FROM nodes WHERE uid = %s", (UID,))
    return dict(zip(("status", "last_heartbeat_at", "uptime", "free_heap", "rssi", "fw_version"), row))


# --- telemetry -----------------------------------------------------------------------


def test_samples_are_stored_upper_case_with_their_metadata_and_one_sent_twice_once(history, write, migrated):
    register(migrated)
    written = write(sample(6.1, 1_764_000_000), sample(6.2, 1_764_000_001), sample(6.1, 1_764_000_000))
    assert written.refused == [] and written.not_stored == 1
    assert query(migrated, "SELECT metric_type, value, metadata FROM telemetry_samples ORDER BY ts") == [
        ("PH", 6.1, {"unit": "pH"}), ("PH", 6.2, {"unit": "pH"})]
    assert history.metrics.duplicates.labels("telemetry")._value.get() == 0  # not before the commit
    written.announce()
    assert history.metrics.duplicates.labels("telemetry")._value.get() == 1


def test_an_older_sample_arriving_late_leaves_telemetry_last_unchanged_and_a_newer_one_updates_it(write, migrated):
    register(migrated)
    last = lambda: query(migrated, "SELECT value, ts FROM telemetry_last")  # noqa: E731
    t = 1_764_000_000
    write(sample(6.0, t))
    write(sample(5.0, t - 100))
    assert last() == [(6.0, utc(t))]
    write(sample(7.0, t + 100))
    assert last() == [(7.0, utc(t + 100))]
    assert query(migrated, "SELECT count(*) FROM telemetry_samples") == [(3,)]


def test_a_node_is_found_by_its_uid_or_else_by_its_hardware_id(write, migrated):
    register(migrated)
    register(migrated, hardware_id="esp32-000000000001", base=HW)  # a node whose uid is another's hardware id
    query(migrated, "UPDATE nodes SET gh_uid = 'gh-1', zone_uid = 'zn-1'")  # bound: topics may keep the hw id
    assert write(sample(6.0, 1_764_000_000, node=HW), sample(6.0, 1_764_000_000, node=UID)).refused == []
    rows = query(migrated, "SELECT n.hardware_id FROM telemetry_samples s JOIN nodes n ON n.id = s.node_id"
                           " ORDER BY n.hardware_id")
    assert rows == [("esp32-000000000001",), (HW,)]


def test_history_from_an_unknown_node_or_another_zone_is_refused_naming_why(write, migrated):
    register(migrated)
    query(migrated, "UPDATE nodes SET gh_uid = 'gh-1', zone_uid = 'zn-1'")
    written = write(sample(6.0, 1_764_000_000, node="nd-nobody"), sample(6.0, 1_764_000_000, zone="zn-2"),
                    (f"{AT}/status", {"status": "SLEEPING"}))
    assert sorted((r.item.seq, r.reason, r.detail) for r in written.refused) == [
        (0, "unknown_node", "no node with uid or hardware id `nd-nobody`"),
        (1, "zone_mismatch", f"node `{UID}` is bound elsewhere; it sent on gh-1/zn-2"),
        (2, "bad_payload", "status must be ONLINE or OFFLINE, not 'SLEEPING'")]
    assert query(migrated, "SELECT count(*) FROM telemetry_samples") == [(0,)]


# Valid JSON of the right shape whose values PostgreSQL would refuse (issue 7): each is
# refused before the database, naming the field, and costs its batch mates nothing.
BEYOND_COLUMNS = [
    ("heartbeat", b'{"uptime":1,"free_heap":102000,"rssi":3000000000,"fw_version":"1.0.0"}', "$.rssi"),
    ("heartbeat", b'{"uptime":2,"free_heap":18446744073709551615,"rssi":-62}', "$.free_heap"),
    ("beyond/telemetry", b'{"metric_type":"PH","value":6.0,"ts":1710000000,"note":1e1000000}', "$.note"),
    ("nul/telemetry", b'{"metric_type":"PH","value":6.0,"ts":1710000000,"note":"a\\u0000b"}', "$.note"),
    ("error", b'{"code":1e400,"ts":1710000000}', "$.code"),
]


def test_values_beyond_their_columns_are_refused_before_the_database_naming_the_field(write, migrated):
    register(migrated)
    good = [sample(6.0, 1_710_000_000 + i, channel="good") for i in range(4)]
    written = write(*good[:2], *((f"{AT}/{suffix}", payload) for suffix, payload, _ in BEYOND_COLUMNS), *good[2:])
    assert sorted(r.item.seq for r in written.refused) == [2, 3, 4, 5, 6]
    for refusal in written.refused:
        field = BEYOND_COLUMNS[refusal.item.seq - 2][2]
        assert refusal.reason == "bad_payload" and f"`{field}`" in refusal.detail, refusal.detail
    assert query(migrated, "SELECT count(*) FROM telemetry_samples") == [(4,)]
    assert query(migrated, "SELECT count(*) FROM node_events") == [(0,)]


# --- liveness and events -------------------------------------------------------------


def test_a_heartbeat_updates_liveness_and_vitals_and_sets_the_node_online(write, migrated):
    register(migrated)
    write((f"{AT}/lwt", b"offline"))
    assert node(migrated)["status"] == "offline" and node(migrated)["last_heartbeat_at"] is None
    beat = next(m for m in fixtures().messages if m["topic"].endswith("/heartbeat"))
    write((beat["topic"], beat["payload"]), received_at=time.time() + 1)
    row = node(migrated)
    assert row["status"] == "online" and row["last_heartbeat_at"] is not None
    assert (row["uptime"], row["free_heap"], row["rssi"], row["fw_version"]) == (3600, 102000, -62, "1.0.0")


def test_status_offline_and_lwt_set_a_node_offline_and_status_online_sets_it_online(write, migrated):
    register(migrated, seen_at=time.time() - 10)
    now = int(time.time())
    for step, (kind, payload, expected) in enumerate([
            ("status", {"status": "OFFLINE", "ts": now}, "offline"),
            ("status", {"status": "ONLINE", "ts": now + 1}, "online"),
            ("lwt", "offline", "offline"),
            ("status", {"status": "ONLINE", "ts": now + 2}, "online")]):
        write((f"{AT}/{kind}", payload), received_at=now + step)
        assert node(migrated)["status"] == expected, (kind, payload)
    assert query(migrated, "SELECT kind FROM node_events ORDER BY id") == [
        ("status",), ("status",), ("lwt",), ("status",)]


def test_a_status_change_is_announced_only_once_committed(history, write, migrated):
    register(migrated, seen_at=time.time() - 5)
    written = write((f"{AT}/lwt", b"offline"))
    assert history.log.events("node_offline") == []
    written.announce()
    assert history.log.events("node_offline", node_uid=UID)


def test_a_safe_mode_status_is_kept_as_a_status_event_and_counts_as_alive(write, migrated):
    register(migrated, seen_at=time.time() - 5)
    safe = next(m for m in fixtures().messages if m["payload"].get("state") == "safe_mode")
    assert write((safe["topic"], safe["payload"])).refused == []
    assert query(migrated, "SELECT kind, payload, ts FROM node_events") == [
        ("status", safe["payload"], utc(1710001234))]
    assert node(migrated)["status"] == "online"


def test_command_response_and_error_timestamps_in_milliseconds_are_stored_as_seconds(write, migrated):
    register(migrated)
    messages = [m for m in fixtures().messages if m["topic"].endswith(("/command_response", "/error"))]
    write(*((m["topic"], m["payload"]) for m in messages))
    assert query(migrated, "SELECT kind, channel, ts, payload FROM node_events ORDER BY kind") == [
        ("command_response", "pump_acid", utc(1710003399.123), messages[0]["payload"]),
        ("error", None, utc(1710001234.0), messages[1]["payload"])]


def test_a_diagnostics_message_is_stored_as_a_node_event(write, migrated):
    register(migrated)
    payload = {"ts": 1710001234, "wifi_rssi": -61, "free_heap": 98000, "mqtt_reconnects": 2}
    assert write((f"{AT}/diagnostics", payload)).refused == []
    assert query(migrated, "SELECT n.uid, e.kind, e.payload, e.ts FROM node_events e"
                           " JOIN nodes n ON n.id = e.node_id") == [(UID, "diagnostics", payload, utc(1710001234))]


def test_an_event_sent_again_with_its_own_ts_is_stored_once_and_a_new_one_is_kept(history, write, migrated):
    register(migrated)
    event = {"event_code": "level_switch_changed", "state": True, "ts": 1710001234}
    topic = f"{AT}/level_clean_min/event"
    written = write((topic, event), (topic, event), (topic, dict(event, ts=1710001294, state=False)))
    assert written.not_stored == 1
    written.announce()
    assert history.metrics.duplicates.labels("event")._value.get() == 1
    assert query(migrated, "SELECT ts FROM node_events ORDER BY ts") == [(utc(1710001234),), (utc(1710001294),)]


def test_every_heartbeat_is_kept_even_one_byte_for_byte_like_an_earlier_one(write, migrated):
    # After a reboot a node can send a heartbeat like an old one: it is a heartbeat all the
    # same. Only the broker's redelivery (DUP) is skipped (test_mqtt_session.py).
    register(migrated)
    beat = {"uptime": 3600, "free_heap": 102000, "rssi": -62, "fw_version": "1.0.0"}
    written = write((f"{AT}/heartbeat", beat), (f"{AT}/heartbeat", beat), (f"{AT}/heartbeat", dict(beat, uptime=3615)))
    assert written.not_stored == 0 and written.refused == []
    assert query(migrated, "SELECT payload->>'uptime' FROM node_events ORDER BY id") == [
        ("3600",), ("3600",), ("3615",)]
    assert node(migrated)["uptime"] == 3615


# --- the sweep -----------------------------------------------------------------------


def test_the_sweep_sets_silent_nodes_offline_and_drops_expired_held_reports(migrated):
    history = History(metrics=Metrics(), log=RecordingLog(), offline_after_s=1.0, held_report_ttl_s=1.0)
    register(migrated, seen_at=time.time() - 10)
    register(migrated, hardware_id="esp32-000000000001", base="nd-ph-live")
    query(migrated, "INSERT INTO held_config_reports (node_key, gh, zone, topic, payload, received_at)"
                    " VALUES ('esp32-0000deadbeef', 'gh-temp', 'zn-temp', 't', '{}', now() - interval '1 hour')")
    with psycopg.connect(migrated) as conn, conn.transaction(), conn.cursor() as cur:
        announce = history.sweep(cur)
    assert query(migrated, "SELECT uid, status FROM nodes ORDER BY uid") == [(UID, "offline"), ("nd-ph-live", "online")]
    assert query(migrated, "SELECT count(*) FROM held_config_reports") == [(0,)]
    assert history.log.events("node_offline") == []
    announce()
    assert history.log.events("node_offline", node_uid=UID, reason="silent")
    assert history.log.events("config_report_expired", node_key="esp32-0000deadbeef", ttl_s=1.0)
    assert history.metrics.nodes_marked_offline._value.get() == 1
    assert history.metrics.held_reports_expired._value.get() == 1
