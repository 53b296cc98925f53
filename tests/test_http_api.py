"""The HTTP API (SPEC §6): nodes, health, metrics and the bearer token."""

from harness import publish, query, wait_until

HELLO = {"message_type": "node_hello", "hardware_id": "esp32-a1b2c3d4e5f6", "node_type": "ph",
         "fw_version": "1.0.0", "capabilities": ["ph"]}
UID = "nd-ph-a1b2c3d4e5f6"


def test_nodes_are_listed_and_shown_as_json(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    status, nodes = daemon.http("GET", "/api/nodes")
    assert status == 200 and [n["uid"] for n in nodes] == [UID]
    status, node = daemon.http("GET", f"/api/nodes/{UID}")
    assert status == 200
    assert (node["hardware_id"], node["type"], node["status"]) == ("esp32-a1b2c3d4e5f6", "ph", "online")
    assert node["capabilities"] == ["ph"] and node["last_seen_at"].startswith("20")
    assert "node_secret" not in node
    status, missing = daemon.http("GET", "/api/nodes/nd-nobody")
    assert status == 404 and "nd-nobody" in missing["error"]


def test_the_api_needs_the_bearer_token_when_one_is_set(make_daemon, broker, database):
    daemon = make_daemon(http={"token": "s3cret-token"})
    daemon.wait_ready()
    assert daemon.http("GET", "/api/nodes")[0] == 401
    assert daemon.http("GET", "/api/nodes", token="wrong")[0] == 401
    assert daemon.http("POST", f"/api/nodes/{UID}/config", json={"channels": []})[0] == 401
    assert daemon.http("GET", "/api/nodes", token="s3cret-token") == (200, [])
    request = __import__("urllib.request").request.Request(daemon.url + "/api/nodes",
                                                           headers={"Authorization": "bearer s3cret-token"})
    with __import__("urllib.request").request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200  # the scheme is case-insensitive (RFC 7235)
    # Probes stay open.
    assert daemon.http("GET", "/healthz")[0] == 200
    assert not any("s3cret-token" in str(line) for line in daemon.lines)


def test_the_token_can_come_from_the_environment(make_daemon):
    daemon = make_daemon(env={"HYDROD_HTTP_TOKEN": "from-env"})
    daemon.wait_ready()
    assert daemon.http("GET", "/api/nodes")[0] == 401
    assert daemon.http("GET", "/api/nodes", token="from-env")[0] == 200


def test_healthz_names_the_failing_part(make_daemon, broker):
    daemon = make_daemon()
    daemon.wait_ready()
    status, body = daemon.http("GET", "/healthz")
    assert status == 200 and body["failing"] == []
    assert set(body["checks"]) == {"db_writer", "node_registry", "config_publisher", "http_api", "mqtt_io"}
    broker.stop()
    daemon.wait_for("mqtt_disconnected")
    status, body = daemon.http("GET", "/healthz")
    assert status == 503 and body["failing"] == ["mqtt"]
    broker.restart()
    daemon.wait_for("mqtt_subscribed", since=0, timeout=20)
    wait_until(lambda: daemon.http("GET", "/healthz")[0] == 200, what="healthy again")


def test_metrics_are_prometheus_text(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", HELLO), ("hydro/gh-1/zn-1/x/heartbeat", b"not json")])
    wait_until(lambda: query(database, "SELECT 1 FROM dead_letters"), what="dead letter")
    status, text = daemon.http("GET", "/metrics")
    assert status == 200
    assert 'hydrod_messages_received_total{kind="node_hello"} 1.0' in text
    assert 'hydrod_messages_rejected_total{reason="bad_json"} 1.0' in text
    assert "# TYPE hydrod_batch_seconds histogram" in text
    # The same counters in the periodic `stats` log line, as jq-friendly fields.
    stats = daemon.wait_for("stats", messages_rejected_total=lambda v: v.get("bad_json") == 1.0)
    assert stats["messages_received_total"]["node_hello"] == 1.0


def test_healthz_names_the_database_when_it_is_away_even_with_no_traffic(
        make_daemon, make_proxy, pg_server, database):
    proxy = make_proxy(pg_server.port, pg_server.host)
    dsn = database.replace(f":{pg_server.port}/", f":{proxy.port}/")
    daemon = make_daemon(database={"dsn": dsn}, nodes={"offline_after_s": 0.4})
    daemon.wait_ready()
    assert daemon.http("GET", "/healthz")[0] == 200
    proxy.cut()
    daemon.wait_for("db_unavailable", actor="db_writer", timeout=15)
    status, body = daemon.http("GET", "/healthz")
    assert status == 503 and "database" in body["failing"]
    proxy.restore()
    daemon.wait_for("db_recovered", actor="db_writer", timeout=15)
    wait_until(lambda: daemon.http("GET", "/healthz")[0] == 200, what="healthy again")
