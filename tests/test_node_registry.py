"""Registration end to end: real Mosquitto, real PostgreSQL, hydrod as a process."""

import threading

from harness import Subscriber, fixtures, metric_value, publish, query, wait_until


def hello(hardware_id, node_type="ph", **extra):
    return {"message_type": "node_hello", "hardware_id": hardware_id, "node_type": node_type,
            "fw_version": "1.0.0", "capabilities": ["ph"], **extra}


def node_rows(dsn):
    return {row[0]: row[1:] for row in query(
        dsn, "SELECT hardware_id, uid, type, fw_version, capabilities, lifecycle_state, status FROM nodes")}


def test_the_firmware_node_hellos_register_with_their_uids_and_types(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    hellos = [m for m in fixtures().messages if m["topic"] == "hydro/node_hello"]
    publish(broker.port, [(m["topic"], m["payload"]) for m in hellos])
    wait_until(lambda: len(node_rows(database)) == 3, what="3 nodes")
    rows = node_rows(database)
    assert rows["esp32-a1b2c3d4e5f6"][:2] == ("nd-ph-a1b2c3d4e5f6", "ph")
    assert rows["esp32-78e36ddde468"][:2] == ("nd-clim-78e36ddde468", "climate")
    assert rows["esp32-0a1b2c3d4e5f"][:2] == ("nd-node-0a1b2c3d4e5f", "unknown")
    assert all(r[4] == "REGISTERED_BACKEND" and r[5] == "online" for r in rows.values())
    assert rows["esp32-78e36ddde468"][3] == ["temperature", "humidity", "co2", "lighting", "ventilation"]
    assert len(daemon.events("node_registered")) == 3


def test_a_repeat_hello_updates_the_node_and_keeps_its_uid(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", hello("esp32-a1b2c3d4e5f6"))])
    wait_until(lambda: node_rows(database), what="node")
    publish(broker.port, [("hydro/gh-1/zn-1/nd-ph-a1b2c3d4e5f6/node_hello",
                           hello("esp32-a1b2c3d4e5f6", node_type="ec", fw_version="2.0.0",
                                 capabilities=["ec"]))])
    daemon.wait_for("node_updated", node_uid="nd-ph-a1b2c3d4e5f6")
    uid, node_type, fw, caps, *_ = node_rows(database)["esp32-a1b2c3d4e5f6"]
    assert (uid, node_type, fw, caps) == ("nd-ph-a1b2c3d4e5f6", "ec", "2.0.0", ["ec"])
    assert query(database, "SELECT count(*) FROM nodes")[0][0] == 1


def test_uid_collisions_get_a_numbered_suffix_and_a_provisioned_uid_wins(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [
        ("hydro/node_hello", hello("esp32-a1b2c3d4e5f6")),
        ("hydro/node_hello", hello("ESP32:A1:B2:C3:D4:E5:F6")),
        ("hydro/node_hello", hello("esp32_a1b2c3d4e5f6")),
        ("hydro/node_hello", hello("esp32-ffff", provisioning_meta={"node_uid": "tank-3", "node_name": "Tank"})),
    ])
    wait_until(lambda: len(node_rows(database)) == 4, what="4 nodes")
    rows = node_rows(database)
    assert rows["esp32-a1b2c3d4e5f6"][0] == "nd-ph-a1b2c3d4e5f6"
    assert {rows["ESP32:A1:B2:C3:D4:E5:F6"][0], rows["esp32_a1b2c3d4e5f6"][0]} == {
        "nd-ph-a1b2c3d4e5f6-1", "nd-ph-a1b2c3d4e5f6-2"}
    assert rows["esp32-ffff"][0] == "tank-3"


def test_a_config_report_before_its_node_hello_is_held_and_then_applied(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    report = next(m for m in fixtures().messages if m["topic"].endswith("/config_report"))
    publish(broker.port, [(report["topic"], report["payload"])])
    daemon.wait_for("config_report_held", node_key="esp32-a1b2c3d4e5f6")
    assert query(database, "SELECT count(*) FROM held_config_reports")[0][0] == 1
    publish(broker.port, [("hydro/node_hello", hello("esp32-a1b2c3d4e5f6"))])
    wait_until(lambda: query(database, "SELECT config FROM nodes WHERE config IS NOT NULL"), what="config")
    [(config,)] = query(database, "SELECT config FROM nodes")
    assert config == report["payload"]
    assert query(database, "SELECT count(*) FROM held_config_reports")[0][0] == 0


def test_a_time_request_is_answered_with_integer_seconds(make_daemon, broker):
    daemon = make_daemon()
    daemon.wait_ready()
    with Subscriber(broker.port, "hydro/time/response") as sub:
        publish(broker.port, [("hydro/time/request", {"message_type": "time_request", "uptime": 12})])
        [answer] = sub.wait_for(1)
    body = answer.json()
    assert body["message_type"] == "time_response"
    assert isinstance(body["unix_ts"], int) and body["unix_ts"] == body["server_time"]
    assert answer.retain is False and answer.qos == 1


def test_hellos_sent_while_hydrod_is_stopped_or_starting_are_all_registered_once(
        make_daemon, broker, database):
    """The start-up race hydrod exists for: nothing a node says before or during start-up is lost."""
    first = make_daemon()
    first.wait_ready()  # creates hydrod's persistent session in the broker
    assert first.terminate() == 0
    while_stopped = [("hydro/node_hello", hello(f"esp32-a{i:011x}")) for i in range(300)]
    publish(broker.port, while_stopped)

    second = make_daemon(mqtt={"client_id": first.config["mqtt"]["client_id"]}, start=False)
    during_start = [("hydro/node_hello", hello(f"esp32-b{i:011x}")) for i in range(300)]
    publisher = threading.Thread(target=publish, args=(broker.port, during_start))
    second.start()
    publisher.start()
    publisher.join(30)
    wait_until(lambda: query(database, "SELECT count(*) FROM nodes")[0][0] >= 600, timeout=30,
               what="600 nodes")
    second.wait_for("node_registered", node_uid="nd-ph-b0000000012b")
    rows = query(database, "SELECT hardware_id, uid FROM nodes")
    assert len(rows) == 600
    assert len({uid for _, uid in rows}) == 600
    assert {hw for hw, _ in rows} == {m[1]["hardware_id"] for m in while_stopped + during_start}
    assert len(second.events("node_registered")) == 600
    assert query(database, "SELECT count(*) FROM dead_letters")[0][0] == 0


def test_a_bad_hello_is_dead_lettered_and_the_next_one_still_registers(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [
        ("hydro/node_hello", b"{not json"),
        ("hydro/node_hello", {"message_type": "node_hello"}),
        ("hydro/node_hello", {"message_type": "node_hello", "hardware_id": "bad id with spaces"}),
        ("hydro/node_hello", hello("esp32-0000000000aa")),
    ])
    wait_until(lambda: node_rows(database), what="the good node")
    reasons = sorted(r[0] for r in query(database, "SELECT reason FROM dead_letters"))
    assert reasons == ["bad_json", "bad_payload", "bad_payload"]
    assert len(daemon.events("message_rejected")) == 3
    assert query(database, "SELECT payload FROM dead_letters WHERE reason = 'bad_json'")[0][0] == b"{not json"


def test_a_held_report_for_a_suffixed_uid_is_applied_when_that_node_registers(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", hello("esp32-a1b2c3d4e5f6"))])
    wait_until(lambda: node_rows(database), what="first node")
    # A report naming the uid the next colliding node will get, before that node says hello.
    report = {"node_id": "nd-ph-a1b2c3d4e5f6-1", "version": 3, "channels": []}
    publish(broker.port, [("hydro/gh-1/zn-1/nd-ph-a1b2c3d4e5f6-1/config_report", report)])
    daemon.wait_for("config_report_held", node_key="nd-ph-a1b2c3d4e5f6-1")
    publish(broker.port, [("hydro/node_hello", hello("ESP32:A1:B2:C3:D4:E5:F6"))])
    wait_until(lambda: query(database, "SELECT config FROM nodes WHERE uid = 'nd-ph-a1b2c3d4e5f6-1'"
                                       " AND config IS NOT NULL"), what="held report applied")
    assert query(database, "SELECT count(*) FROM held_config_reports")[0][0] == 0


def test_a_repeat_hello_without_firmware_or_capabilities_keeps_the_stored_ones(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", hello("esp32-a1b2c3d4e5f6", capabilities=["ph", "temperature"],
                                                     hardware_revision="rev-b"))])
    wait_until(lambda: node_rows(database), what="node")
    publish(broker.port, [("hydro/node_hello", {"message_type": "node_hello", "hardware_id": "esp32-a1b2c3d4e5f6",
                                                "node_type": "ph", "fw_version": None})])
    record = daemon.wait_for("node_updated", node_uid="nd-ph-a1b2c3d4e5f6")
    assert record["changed"] == []
    [(fw, caps, revision)] = query(database, "SELECT fw_version, capabilities, hardware_revision FROM nodes")
    assert (fw, caps, revision) == ("1.0.0", ["ph", "temperature"], "rev-b")
    # Given ones still replace them, an empty list too.
    publish(broker.port, [("hydro/node_hello", hello("esp32-a1b2c3d4e5f6", fw_version="1.1.0", capabilities=[]))])
    wait_until(lambda: query(database, "SELECT fw_version, capabilities FROM nodes") == [("1.1.0", [])],
               what="the new firmware and no capabilities")


def test_a_held_report_whose_node_never_says_hello_expires_logged_and_counted(make_daemon, broker, database):
    daemon = make_daemon(nodes={"held_report_ttl_s": 1.0, "offline_after_s": 2.0})
    daemon.wait_ready()
    topic = "hydro/gh-temp/zn-temp/esp32-0000deadbeef/config_report"
    publish(broker.port, [(topic, {"node_id": "esp32-0000deadbeef", "version": 1, "channels": []})])
    daemon.wait_for("config_report_held", node_key="esp32-0000deadbeef")
    record = daemon.wait_for("config_report_expired", node_key="esp32-0000deadbeef")
    assert record["topic"] == topic and record["age_s"] >= 1.0 and record["ttl_s"] == 1.0
    assert query(database, "SELECT count(*) FROM held_config_reports")[0][0] == 0
    assert metric_value(daemon.http("GET", "/metrics")[1], "hydrod_held_reports_expired_total") == 1
