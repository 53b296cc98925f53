"""The HTTP API (SPEC §6): nodes, health, metrics and the bearer token."""

import json
import socket
import sys
import textwrap
import time

import psycopg

from harness import metric_value, open_fds, publish, query, register_node, thread_count, wait_until

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
    assert set(body["checks"]) == {"db_writer", "history_keeper", "node_registry", "config_publisher", "commands",
                                   "http_api", "mqtt_io"}
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


PUSH = {"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"}


def test_a_cross_site_push_is_refused_and_only_json_bodies_change_anything(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    port = daemon.config["http"]["port"]
    body = json.dumps(PUSH).encode()
    # What a web page can send without a preflight: text/plain, from its own origin.
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", body=body,
                                 headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in answer["error"]
    for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null", f"http://localhost:{port}"):
        status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", json=PUSH, headers={"Origin": origin})
        assert status == 403, (origin, answer)
    # Without an Origin (curl, the CLI), only the content type matters.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", body=body,
                                     headers={"Content-Type": content_type})
        assert status == 415 and "application/json" in answer["error"], (content_type, answer)
    assert query(database, "SELECT count(*) FROM node_configs") == [(0,)]
    # The API's own origin, and no origin at all, go through.
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", json=PUSH,
                                 headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 202, answer
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", json=PUSH,
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 202, answer
    assert query(database, "SELECT count(*) FROM node_configs") == [(2,)]


def test_a_cross_site_push_is_refused_even_with_the_token(make_daemon, broker, database):
    daemon = make_daemon(http={"token": "s3cret-token"})
    daemon.wait_ready()
    register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    status, answer = daemon.http("POST", f"/api/nodes/{UID}/config", json=PUSH, token="s3cret-token",
                                 headers={"Origin": "https://evil.example"})
    assert status == 403, answer
    assert daemon.http("POST", f"/api/nodes/{UID}/config", json=PUSH, token="s3cret-token")[0] == 202


def test_no_answer_holds_a_secret_at_any_depth(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    secrets = ["a" * 64, "b" * 64, "broker-pw", "wifi-pw", "wifi-psk", "chan-token", "deep-secret"]
    report = {"node_id": UID, "version": 1, "type": "ph", "node_secret": secrets[0],
              "mqtt": {"host": "10.0.0.2", "username": "node", "password": secrets[2], "node_secret": secrets[1]},
              "wifi": {"ssid": "greenhouse", "pass": secrets[3], "PSK": secrets[4]},
              "channels": [{"name": "ph_sensor", "auth_token": secrets[5]},
                           {"name": "x", "extra": [{"deeper": {"Secret": secrets[6]}}]}]}
    publish(broker.port, [(f"hydro/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config_report", report)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes WHERE config ? 'wifi'"), what="the report stored")
    status, node = daemon.http("GET", f"/api/nodes/{UID}")
    assert status == 200
    assert node["config"]["wifi"] == {"ssid": "greenhouse"}
    assert node["config"]["mqtt"] == {"host": "10.0.0.2", "username": "node"}
    assert node["config"]["channels"] == [{"name": "ph_sensor"}, {"name": "x", "extra": [{"deeper": {}}]}]
    for path in (f"/api/nodes/{UID}", "/api/nodes"):
        text = json.dumps(daemon.http("GET", path)[1])
        assert not [s for s in secrets if s in text], path


def exchange(port: int, request: bytes, wait_s: float = 3.0) -> tuple[bytes, bool]:
    """Send raw bytes; return what hydrod answered, and whether it then closed the
    connection (False: still open after `wait_s` without a byte more)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # it answered and closed before taking everything: read the answer
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return answer, False
            except ConnectionResetError:
                return answer, True
            if not chunk:
                return answer, True
            answer += chunk


def test_a_chunked_body_over_the_limit_is_413_and_the_connection_is_closed(make_daemon):
    daemon = make_daemon()
    daemon.wait_ready()
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(70)) + b"0\r\n\r\n"  # 280 KiB
    answer, closed = exchange(daemon.config["http"]["port"],
                              f"POST /api/nodes/{UID}/config HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                              + body)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"body too large" in answer and closed


def test_an_error_answer_closes_the_connection_and_an_unread_body_is_never_a_request(make_daemon):
    daemon = make_daemon()
    daemon.wait_ready()
    smuggled = b"GET /api/nodes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    cases = [  # each answered before its body is read
        ("POST /api/nodes", smuggled, 405),
        ("POST /api/nodes/nd%00x/config", smuggled, 404),
        ("POST /api/nodes/nd-nobody/config", smuggled + b" " * (300 * 1024), 413),
    ]
    for target, body, status in cases:
        answer, closed = exchange(daemon.config["http"]["port"],
                                  f"{target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert answer.startswith(b"HTTP/1.1 %d " % status), (target, answer[:200])
        assert answer.count(b"HTTP/1.1 ") == 1, (target, answer)
        assert closed, target


def test_idle_connections_past_the_open_file_limit_leave_the_database_its_connections(
        make_daemon, make_proxy, broker, database, pg_server):
    # hydrod under a 256 open-file limit, with more idle connections to its HTTP
    # port than that, and a database blip meanwhile.
    proxy = make_proxy(pg_server.port, pg_server.host)
    dsn = database.replace(f":{pg_server.port}/", f":{proxy.port}/")
    daemon = make_daemon(start=False, database={"dsn": dsn}, http={"connection_limit": 1000})
    daemon.nofile = 256
    daemon.start()
    daemon.wait_ready()
    register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    topic = f"hydro/gh-1/zn-1/{UID}/ph/telemetry"
    base = int(time.time()) - 1000
    idle, refused = [], 0
    try:
        for _ in range(300):
            try:
                idle.append(socket.create_connection(("127.0.0.1", daemon.config["http"]["port"]), timeout=1))
            except OSError:
                refused += 1
        # Whatever hydrod does with them, it has done it once its descriptors settle.
        counts = []

        def settled() -> bool:
            counts.append(open_fds(daemon.pid))
            return len(counts) >= 5 and len(set(counts[-5:])) == 1

        wait_until(settled, what="hydrod's descriptors to settle", interval=0.1)
        fds, threads = open_fds(daemon.pid), thread_count(daemon.pid)

        mark = daemon.mark()
        proxy.cut()
        publish(broker.port, [(topic, {"metric_type": "PH", "value": 6.0, "ts": base})])
        daemon.wait_for("db_unavailable", actor="db_writer", since=mark, timeout=15)
        proxy.restore()
        restored = time.monotonic()
        publish(broker.port, [(topic, {"metric_type": "PH", "value": 6.0, "ts": base + i}) for i in range(1, 101)])
        stored = lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 101  # noqa: E731
        try:
            wait_until(stored, 40, "the samples sent after the blip")
        finally:
            store_s = time.monotonic() - restored
            print(f"{len(idle)} idle connections ({refused} refused): hydrod at {fds} fds, {threads} threads; "
                  f"stored {store_s:.1f} s after the database came back")
        assert store_s < 10
        assert fds < 256 - 50, "HTTP connections took the descriptors kept for the database and the broker"
        # Answered while the idle connections are all still open: idle ones made room.
        status, body = daemon.http("GET", "/healthz", timeout=10)
        assert status == 200, body
        assert metric_value(daemon.http("GET", "/metrics")[1], "hydrod_http_connections_shed_total") > 0
    finally:
        for sock in idle:
            sock.close()
    listening = daemon.events("http_listening")[0]
    assert listening["connection_limit"] == 256 - 100

REGISTRY_ALWAYS_FAILS = textwrap.dedent("""
    import sys
    from hydrod import cli

    def always(actor, message):
        if actor == "node_registry" and type(message).__name__ == "Deliver":
            raise RuntimeError("registry always fails")

    sys.exit(cli.main(["--config", "config.toml", "run"], fault_hook=always))
""")


def test_healthz_names_an_actor_that_died_and_waits_for_its_restart(make_daemon, broker):
    # A restart backoff of 3 s leaves time to ask while the registry is down.
    daemon = make_daemon(command=[sys.executable, "-c", REGISTRY_ALWAYS_FAILS],
                         supervisor={"backoff_min_s": 3.0, "backoff_max_s": 3.0, "max_restarts": 100,
                                     "max_message_failures": 100})
    daemon.wait_ready()
    assert daemon.http("GET", "/healthz")[0] == 200
    mark = daemon.mark()
    publish(broker.port, [("hydro/node_hello", {"message_type": "node_hello", "hardware_id": "esp32-0000000000aa",
                                                "node_type": "ph"})])
    daemon.wait_for("actor_failed", since=mark, failed_actor="node_registry")
    status, body = daemon.http("GET", "/healthz")
    assert status == 503, body
    assert "node_registry" in body["failing"], body
    assert daemon.terminate() == 0


def test_nodes_are_listed_while_the_registry_is_stuck_on_a_locked_row(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    with psycopg.connect(database) as holder:
        # Another writer holds the node's row: the registry's next hello waits for it.
        holder.execute("SELECT 1 FROM nodes WHERE uid = %s FOR UPDATE", (UID,))
        publish(broker.port, [("hydro/node_hello", {**HELLO, "fw_version": "1.0.1"})])
        wait_until(lambda: query(database, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0,
                   what="the registry waiting for the row")
        status, nodes = daemon.http("GET", "/api/nodes")
        assert status == 200 and [(n["uid"], n["fw_version"]) for n in nodes] == [(UID, "1.0.0")]
        status, node = daemon.http("GET", f"/api/nodes/{UID}")
        assert status == 200 and node["uid"] == UID
        assert query(database, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0, \
            "the registry stopped waiting: the listing did not run while it was stuck"
    # Released, the registry goes on with the hello it held.
    wait_until(lambda: daemon.http("GET", f"/api/nodes/{UID}")[1]["fw_version"] == "1.0.1", what="the new hello")
