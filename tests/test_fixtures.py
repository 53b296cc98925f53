"""Every firmware fixture (tests/fixtures), published as firmware sends it, with its expected effect."""

from datetime import datetime, timezone

from harness import Subscriber, fixtures, publish, query, wait_until

PH = "nd-ph-a1b2c3d4e5f6"


def utc(unix):
    return datetime.fromtimestamp(unix, tz=timezone.utc)


def test_every_firmware_fixture_has_its_expected_effect(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    found = fixtures()
    messages = [(m["topic"], m["payload"]) for m in found.messages] + list(found.raw)
    assert len(messages) == 16
    with Subscriber(broker.port, "hydro/time/response") as clock:
        publish(broker.port, messages)
        [answer] = clock.wait_for(1)
    assert answer.json()["message_type"] == "time_response"
    # The last fixture is the ph node's last will: once the node is offline, everything before is in.
    wait_until(lambda: query(database, "SELECT status FROM nodes WHERE uid = %s", (PH,)) == [("offline",)],
               what="the last will applied")
    # heartbeat, three status messages, command_response, error, event, lwt
    assert query(database, "SELECT count(*) FROM node_events")[0][0] == 8

    nodes = {uid: (node_type, config) for uid, node_type, config in
             query(database, "SELECT uid, type, config FROM nodes")}
    assert set(nodes) == {PH, "nd-clim-78e36ddde468", "nd-node-0a1b2c3d4e5f"}
    assert nodes["nd-node-0a1b2c3d4e5f"][0] == "unknown"  # node_type "pump"
    report = next(m["payload"] for m in found.messages if m["topic"].endswith("/config_report"))
    assert nodes[PH][1] == report  # the report from the temp namespace, kept

    samples = query(database, "SELECT channel, metric_type, value, ts FROM telemetry_samples ORDER BY channel")
    assert samples == [("ph_sensor", "PH", 5.86, utc(1710001234)),
                       ("solution_temp_c", "TEMPERATURE", 21.5, utc(1710001234))]

    [(uptime, heap, rssi)] = query(database, "SELECT uptime_seconds, free_heap_bytes, rssi FROM nodes WHERE uid = %s",
                                   (PH,))
    assert (uptime, heap, rssi) == (3600, 102000, -62)

    events = query(database, "SELECT kind, node_key, node_id IS NULL, ts, received_at, payload FROM node_events"
                             " ORDER BY id")
    by_kind = {}
    for kind, key, orphan, ts, received_at, payload in events:
        by_kind.setdefault(kind, []).append((key, orphan, ts, received_at, payload))
    # Arrival order, node by node: the unknown irrigation node's event waits for no other node's hello.
    irrigation = "nd-irr-0c0d0e0f1011"
    assert [kind for kind, key, *_ in events if key != irrigation] == [
        "status", "status", "heartbeat", "command_response", "error", "status", "lwt"]
    assert [kind for kind, key, *_ in events if key == irrigation] == ["event"]
    statuses = {str(s[4].get("ts")): s for s in by_kind["status"]}
    # Uptime ts 12 (clock not synced) is replaced by the receive time; real clocks are kept.
    assert statuses["12"][2] == statuses["12"][3]
    assert statuses["1710001555"][2] == utc(1710001555)
    assert statuses["1710001234"][2] == utc(1710001234)
    assert by_kind["command_response"][0][2] == utc(1710003399.123)  # ms
    assert by_kind["error"][0][2] == utc(1710001234)  # ms
    assert by_kind["lwt"][0][4] == "offline"
    # The level switch event comes from a node hydrod does not know: kept, without a node.
    [(key, orphan, ts, _, _)] = by_kind["event"]
    assert (key, orphan, ts) == (irrigation, True, utc(1710001234))

    # The irrigation node's sample has no node to belong to.
    assert query(database, "SELECT reason, topic FROM dead_letters") == [
        ("unknown_node", "hydro/gh-1/zn-1/nd-irr-0c0d0e0f1011/level_clean_min/telemetry")]
    assert daemon.events("actor_failed") == []
