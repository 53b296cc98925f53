"""Config push and binding (SPEC §3), through the HTTP API and the CLI."""

import json
import subprocess
import sys

from harness import Subscriber, metric_value, publish, query, wait_until

HW = "esp32-a1b2c3d4e5f6"
UID = "nd-ph-a1b2c3d4e5f6"
TEMP_TOPIC = f"hydro/gh-temp/zn-temp/{HW}/config"


def register(daemon, broker, database, hardware_id=HW):
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", {"message_type": "node_hello", "hardware_id": hardware_id,
                                                "node_type": "ph", "fw_version": "1.0.0",
                                                "capabilities": ["ph"]})])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes WHERE hardware_id = %s", (hardware_id,)),
               what="node registered")


def config_rows(dsn):
    return query(dsn, "SELECT version, status, topic, config FROM node_configs ORDER BY version")


NODE_SESSION = dict(client_id="node-a1b2", clean_start=False, session_expiry=3600)


def push_with_the_broker_down(daemon, broker, database):
    """Register the node, give it a persistent session (so the broker keeps what is
    published for it), stop the broker, and push a binding config: it is queued."""
    register(daemon, broker, database)
    with Subscriber(broker.port, TEMP_TOPIC, **NODE_SESSION):
        pass
    broker.stop()
    daemon.wait_for("mqtt_disconnected")
    status, body = daemon.http("POST", f"/api/nodes/{UID}/config",
                               json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert (status, body["status"]) == (202, "queued")
    assert config_rows(database)[0][1] == "queued"


def test_binding_an_unbound_node_goes_through_the_temp_topic_and_completes_on_its_report(
        make_daemon, broker, database):
    daemon = make_daemon()
    register(daemon, broker, database)
    with Subscriber(broker.port, "hydro/+/+/+/config") as sub:
        status, body = daemon.http("POST", f"/api/nodes/{UID}/config",
                                   json={"channels": [{"name": "ph_sensor"}], "gh_uid": "gh-1", "zone_uid": "zn-1"})
        assert status == 202
        assert body == {"node_uid": UID, "version": 1, "topic": TEMP_TOPIC, "status": "published"}
        [sent] = sub.wait_for(1)
    assert sent.topic == TEMP_TOPIC and sent.qos == 1 and sent.retain is False
    assert b": " not in sent.payload and b", " not in sent.payload  # compact JSON
    config = sent.json()
    assert config["node_id"] == UID and config["type"] == "ph" and config["version"] == 1
    assert config["mqtt"] == {"configured": True}
    assert len(config["node_secret"]) == 64 and int(config["node_secret"], 16) >= 0
    assert (config["gh_uid"], config["zone_uid"]) == ("gh-1", "zn-1")
    wait_until(lambda: config_rows(database)[0][1] == "published", what="published")
    assert config_rows(database)[0][3] == config  # exactly as published

    # The node applies it and reports from its new namespace: the bind completes.
    publish(broker.port, [(f"hydro/gh-1/zn-1/{UID}/config_report", config)])
    daemon.wait_for("config_applied", node_uid=UID, version=1)
    daemon.wait_for("node_bound", node_uid=UID, gh_uid="gh-1", zone_uid="zn-1")
    [(gh, zone, state)] = query(database, "SELECT gh_uid, zone_uid, lifecycle_state FROM nodes")
    assert (gh, zone, state) == ("gh-1", "zn-1", "ASSIGNED_TO_ZONE")
    assert config_rows(database)[0][1] == "applied"

    # A bound node gets the next config on its own namespace, with the next version and the same secret.
    with Subscriber(broker.port, "hydro/+/+/+/config") as sub:
        status, body = daemon.http("POST", f"/api/nodes/{UID}/config", json={"channels": []})
        assert status == 202 and body["version"] == 2
        [second] = sub.wait_for(1)
    assert second.topic == f"hydro/gh-1/zn-1/{UID}/config"
    assert second.json()["node_secret"] == config["node_secret"]
    assert second.json()["gh_uid"] == "gh-1"


def test_an_unacknowledged_config_times_out(make_daemon, broker, database):
    daemon = make_daemon(nodes={"config_ack_timeout_s": 0.5})
    register(daemon, broker, database)
    status, _ = daemon.http("POST", f"/api/nodes/{UID}/config",
                            json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "version": 7})
    assert status == 202
    daemon.wait_for("config_timeout", node_uid=UID, version=7)
    assert config_rows(database)[0][:2] == (7, "timeout")
    assert query(database, "SELECT gh_uid FROM nodes")[0][0] is None


def test_a_push_while_the_broker_is_down_is_queued_and_published_when_it_returns(
        make_daemon, broker, database):
    daemon = make_daemon()
    push_with_the_broker_down(daemon, broker, database)
    broker.restart()
    daemon.wait_for("config_published", node_uid=UID, timeout=20)
    assert config_rows(database)[0][1] == "published"
    with Subscriber(broker.port, TEMP_TOPIC, **NODE_SESSION) as sub:
        [delivered] = sub.wait_for(1)
    assert delivered.json()["version"] == 1 and delivered.json()["gh_uid"] == "gh-1"


def test_a_push_whose_text_holds_an_escaped_backslash_before_u0000_is_accepted(make_daemon, broker, database):
    # In JSON, `\\u0000` is an escaped backslash and the text u0000, not a NUL character (issue 7.6).
    daemon = make_daemon()
    register(daemon, broker, database)
    body = b'{"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "path": "C:\\\\u0000"}'
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", body=body)
    assert status == 202, answer
    assert config_rows(database)[0][3]["path"] == "C:\\u0000"


def test_push_errors_name_what_is_wrong(make_daemon, broker, database):
    daemon = make_daemon()
    register(daemon, broker, database)
    cases = [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"gh_uid": "gh-1", "zone_uid": "zn-1"}', 400, "channels"),
        (b'{"channels": "all", "gh_uid": "gh-1", "zone_uid": "zn-1"}', 400, "$.channels"),
        (b'{"channels": [], "version": "two", "gh_uid": "gh-1", "zone_uid": "zn-1"}', 400, "$.version"),
        (b'{"channels": [], "node_id": "someone-else", "gh_uid": "gh-1", "zone_uid": "zn-1"}', 400, "node_id"),
        (b'{"channels": [], "gh_uid": "gh-1"}', 400, "go together"),
        (b'{"channels": []}', 409, "not bound"),
        (b'{"channels": [NaN], "gh_uid": "gh-1", "zone_uid": "zn-1"}', 400, "not JSON"),
        (b'{"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "x": "a\\u0000b"}', 400, "NUL"),
        (b'{"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "version": ' + b"9" * 30 + b"}", 400,
         "$.version"),
        (b'{"channels": ' + b"[" * 5000 + b"]" * 5000 + b', "gh_uid": "gh-1", "zone_uid": "zn-1"}', 400,
         "nested"),
        (b'{"channels": [], "gh_uid": "gh-1\\n", "zone_uid": "zn-1"}', 400, "$.gh_uid"),
        (b'{"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "node_secret": "' + b"a" * 65 + b'"}', 400,
         "$.node_secret"),
        (b'{"channels": [1e400], "gh_uid": "gh-1", "zone_uid": "zn-1"}', 400, "out of range"),
        (b'{"channels": ["\\ud800"], "gh_uid": "gh-1", "zone_uid": "zn-1"}', 400, "encoded"),
        (b'{"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "pad": "' + b"x" * 300_000 + b'"}', 413,
         "large"),
    ]
    for body, want_status, want_text in cases:
        status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", body=body)
        assert status == want_status, (body, answer)
        assert want_text in answer["error"], (body, answer)
    status, answer = daemon.http("POST", "/api/nodes/nd-ph-nobody/config", json={"channels": []})
    assert status == 404 and "nd-ph-nobody" in answer["error"]
    assert daemon.http("POST", "/api/nodes/nd%00x/config", json={"channels": []})[0] == 404
    assert daemon.http("GET", "/api/nodes/nd%00x")[0] == 404
    assert config_rows(database) == []


def test_push_config_on_the_command_line_goes_through_the_daemon(make_daemon, broker, database, tmp_path):
    daemon = make_daemon()
    register(daemon, broker, database)
    body = tmp_path / "config.json"
    body.write_text(json.dumps({"channels": [], "gh_uid": "gh-2", "zone_uid": "zn-9"}))
    result = subprocess.run([sys.executable, "-m", "hydrod", "push-config", UID, str(body),
                             "--config", str(daemon.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["topic"] == TEMP_TOPIC
    refused = subprocess.run([sys.executable, "-m", "hydrod", "push-config", "nd-nobody", str(body),
                              "--config", str(daemon.config_path)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "404" in refused.stderr


def test_a_report_from_the_temp_namespace_does_not_acknowledge_a_binding_config(make_daemon, broker, database):
    daemon = make_daemon()
    register(daemon, broker, database)
    status, body = daemon.http("POST", f"/api/nodes/{UID}/config",
                               json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert status == 202 and body["version"] == 1
    wait_until(lambda: config_rows(database)[0][1] == "published", what="published")
    # The node reconnects before applying it: its usual report, from the temp namespace, version 1.
    publish(broker.port, [(f"hydro/gh-temp/zn-temp/{HW}/config_report",
                           {"node_id": HW, "version": 1, "type": "ph", "channels": [], "mqtt": {"configured": True}})])
    wait_until(lambda: query(database, "SELECT config FROM nodes WHERE config IS NOT NULL"), what="report stored")
    assert config_rows(database)[0][1] == "published"
    assert daemon.events("config_applied") == []
    # Then it applies the config and reports from its zone: acknowledged, and bound.
    publish(broker.port, [(f"hydro/gh-1/zn-1/{UID}/config_report",
                           {"node_id": UID, "version": 1, "type": "ph", "channels": [], "gh_uid": "gh-1",
                            "zone_uid": "zn-1", "mqtt": {"configured": True}})])
    daemon.wait_for("node_bound", node_uid=UID)
    assert config_rows(database)[0][1] == "applied"


def test_a_node_secret_given_in_a_push_is_kept_for_the_next_ones(make_daemon, broker, database):
    daemon = make_daemon()
    register(daemon, broker, database)
    secret = "ab" * 32
    with Subscriber(broker.port, "hydro/+/+/+/config") as sub:
        assert daemon.http("POST", f"/api/nodes/{UID}/config", json={
            "channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "node_secret": secret})[0] == 202
        assert daemon.http("POST", f"/api/nodes/{UID}/config", json={
            "channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})[0] == 202
        first, second = sub.wait_for(2)
    assert first.json()["node_secret"] == second.json()["node_secret"] == secret
    _, node = daemon.http("GET", f"/api/nodes/{UID}")
    assert secret not in json.dumps(node)


def test_push_config_refuses_a_uid_that_is_no_uid_cleanly(make_daemon, broker, database, tmp_path):
    daemon = make_daemon()
    daemon.wait_ready()
    body = tmp_path / "config.json"
    body.write_text("{}")
    result = subprocess.run([sys.executable, "-m", "hydrod", "push-config", "nd ph/../x?y", str(body),
                             "--config", str(daemon.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "404" in result.stderr and "Traceback" not in result.stderr


def test_a_queued_push_survives_a_daemon_restart_and_goes_out_when_the_link_is_up(make_daemon, broker, database):
    daemon = make_daemon()
    push_with_the_broker_down(daemon, broker, database)
    assert daemon.terminate() == 0
    broker.restart()
    again = make_daemon(mqtt={"client_id": daemon.config["mqtt"]["client_id"]})
    again.wait_for("config_published", node_uid=UID, timeout=20)
    assert config_rows(database)[0][1] == "published"
    with Subscriber(broker.port, TEMP_TOPIC, **NODE_SESSION) as sub:
        [delivered] = sub.wait_for(1)
    assert delivered.json()["version"] == 1


def test_fields_given_as_null_are_filled_in_and_versions_only_go_up(make_daemon, broker, database):
    daemon = make_daemon()
    register(daemon, broker, database)
    nulls = {"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "node_id": None, "type": None,
             "mqtt": None, "node_secret": None, "version": None}
    with Subscriber(broker.port, TEMP_TOPIC) as sub:
        assert daemon.http("POST", f"/api/nodes/{UID}/config", json=nulls)[0] == 202
        assert daemon.http("POST", f"/api/nodes/{UID}/config", json=nulls)[0] == 202
        first, second = (m.json() for m in sub.wait_for(2))
    assert (first["node_id"], first["type"], first["mqtt"], first["version"]) == (UID, "ph", {"configured": True}, 1)
    assert len(first["node_secret"]) == 64 and second["node_secret"] == first["node_secret"]
    assert second["version"] == 2
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config",
                                 json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1", "version": 2})
    assert status == 409 and "$.version" in answer["error"]


def test_a_decommissioned_node_gets_no_config(make_daemon, broker, database):
    daemon = make_daemon()
    register(daemon, broker, database)
    query(database, "UPDATE nodes SET lifecycle_state = 'DECOMMISSIONED'")
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config",
                                 json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert status == 409 and "decommissioned" in answer["error"]


def test_a_push_that_cannot_be_made_in_time_is_refused_and_never_made_later(make_daemon, broker, database):
    import psycopg
    daemon = make_daemon(supervisor={"ask_timeout_s": 1.0})
    register(daemon, broker, database)
    with psycopg.connect(database) as blocker:
        blocker.execute("SELECT 1 FROM nodes WHERE uid = %s FOR UPDATE", (UID,))  # another writer, slow
        status, answer = daemon.http("POST", f"/api/nodes/{UID}/config",
                                     json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
        assert status == 503 and "safe to retry" in answer["error"], answer
    # The refused push left nothing behind: the retry is version 1.
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config",
                                 json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert status == 202 and answer["version"] == 1
    assert [row[0] for row in config_rows(database)] == [1]


def bind(daemon, broker, database):
    """Register the node, push it a binding config and let it apply it; return the config as published."""
    register(daemon, broker, database)
    status, _ = daemon.http("POST", f"/api/nodes/{UID}/config",
                            json={"channels": [{"name": "ph_sensor"}], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert status == 202
    wait_until(lambda: config_rows(database)[0][1] == "published", what="published")
    [(payload,)] = query(database, "SELECT payload FROM node_configs")
    publish(broker.port, [(f"hydro/gh-1/zn-1/{UID}/config_report", json.loads(payload))])
    daemon.wait_for("node_bound", node_uid=UID)
    return payload.encode()


def temp_report(channel):
    """What a reset node sends from the temp namespace; `channel` tells one report from another."""
    return (f"hydro/gh-temp/zn-temp/{HW}/config_report",
            {"node_id": HW, "version": 1, "type": "ph", "channels": [{"name": channel}], "mqtt": {"configured": True}})


def reported_channel(database):
    return query(database, "SELECT config->'channels'->0->>'name' FROM nodes")[0][0]


def reports_stored(daemon):
    return metric_value(daemon.http("GET", "/metrics")[1], "hydrod_messages_stored_total",
                        actor="node_registry") or 0


def test_a_bound_node_back_in_the_temp_namespace_gets_its_last_applied_config_again_once_per_interval(
        make_daemon, broker, database):
    first = make_daemon()  # config_resend_interval_s 60
    applied = bind(first, broker, database)
    with Subscriber(broker.port, TEMP_TOPIC) as sub:
        publish(broker.port, [temp_report("reset-1")])
        [resent] = sub.wait_for(1)
        assert resent.payload == applied and resent.qos == 1 and resent.retain is False  # exactly as published
        first.wait_for("config_resent", node_uid=UID, version=1, topic=TEMP_TOPIC)
        [(resent_at,)] = query(database, "SELECT config_resent_at FROM nodes")

        # A second instance (not sharing a group: both get every message), and a node
        # that resets again at once: both instances store the report, neither resends.
        second = make_daemon()
        second.wait_ready()
        counts = reports_stored(first), reports_stored(second)
        publish(broker.port, [temp_report("reset-2")])
        wait_until(lambda: (reports_stored(first), reports_stored(second)) == (counts[0] + 1, counts[1] + 1),
                   what="both instances stored the second report")
        assert query(database, "SELECT config_resent_at FROM nodes") == [(resent_at,)]
        assert reported_channel(database) == "reset-2"

        # After the interval (a minute passes), the next report gets it again, from one instance only.
        query(database, "UPDATE nodes SET config_resent_at = config_resent_at - interval '61 s'")
        publish(broker.port, [temp_report("reset-3")])
        again = sub.wait_for(2)[1]
        assert again.payload == applied
        wait_until(lambda: (reports_stored(first), reports_stored(second)) == (counts[0] + 2, counts[1] + 2),
                   what="both instances stored the third report")
        wait_until(lambda: len(first.events("config_resent")) + len(second.events("config_resent")) >= 2,
                   what="the second config_resent line")
    assert len(first.events("config_resent")) + len(second.events("config_resent")) == 2
    assert len(sub.messages) == 2
