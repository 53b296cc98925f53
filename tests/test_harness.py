"""The harness itself works against the real services."""

from __future__ import annotations

import psycopg
import pytest

from harness import Subscriber, fixtures, publish, query, wait_until


def test_private_broker_delivers_a_qos1_message_to_a_subscriber(broker):
    with Subscriber(broker.port, "hydro/test/#") as sub:
        publish(broker.port, [("hydro/test/a", {"value": 1}, False)])
        [message] = sub.wait_for(1)
    assert (message.topic, message.json(), message.qos) == ("hydro/test/a", {"value": 1}, 1)


def test_a_message_queued_for_a_persistent_session_survives_a_broker_restart(broker):
    session = dict(client_id="test-persistent", clean_start=False, session_expiry=300)
    with Subscriber(broker.port, "hydro/queued", **session):
        pass  # the session and its subscription now live in the broker
    publish(broker.port, [("hydro/queued", "kept across restart")])
    broker.restart()
    with Subscriber(broker.port, "hydro/queued", **session) as sub:
        message = sub.wait_for(lambda m: m.payload == b"kept across restart")
    assert message.qos == 1


def test_database_fixture_gives_an_empty_database(database):
    tables = query(database, "select count(*) from information_schema.tables "
                             "where table_schema = 'public'")
    assert tables == [(0,)]
    query(database, "create table only_here (x int)")
    test_database_fixture_gives_an_empty_database.seen = database


def test_another_test_does_not_see_the_previous_database(database, pg_server):
    previous = getattr(test_database_fixture_gives_an_empty_database, "seen", None)
    assert previous != database
    assert query(database, "select to_regclass('public.only_here')") == [(None,)]
    if previous:  # the earlier test's database was dropped at its teardown
        name = previous.rsplit("/", 1)[1]
        assert query(pg_server.admin_dsn, "select 1 from pg_database where datname = %s",
                     (name,)) == []


def test_tcp_proxy_forwards_then_cut_breaks_the_link_until_restore(database, pg_server, make_proxy):
    proxy = make_proxy(pg_server.port, pg_server.host)
    via_proxy = database.replace(f"{pg_server.host}:{pg_server.port}", f"127.0.0.1:{proxy.port}")
    assert via_proxy != database
    with psycopg.connect(via_proxy, autocommit=True) as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)
        wait_until(lambda: proxy.connections == 1, 5, "the proxied connection")
        proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(via_proxy, connect_timeout=2)
    proxy.restore()
    assert query(via_proxy, "select 'back'") == [("back",)]


def test_fixtures_are_found_beside_the_checkout():
    data = fixtures()
    assert any(m["topic"] == "hydro/node_hello" for m in data.messages)
    assert all(isinstance(m["payload"], (dict, list, str, int, float)) for m in data.messages)
    assert ("hydro/gh-1/zn-1/nd-ph-a1b2c3d4e5f6/lwt", "offline") in data.raw


def test_tcp_proxy_cut_disconnects_an_mqtt_client_and_refuses_until_restore(broker, make_proxy):
    proxy = make_proxy(broker.port)
    with Subscriber(proxy.port, "hydro/via-proxy") as sub:
        disconnected = []
        sub.client.on_disconnect = lambda *args: disconnected.append(args)
        publish(proxy.port, [("hydro/via-proxy", "1")])
        sub.wait_for(1)
        proxy.cut()
        wait_until(lambda: disconnected, 5, "paho to notice the cut")
        with pytest.raises((OSError, AssertionError, RuntimeError)):
            publish(proxy.port, [("hydro/via-proxy", "2")], timeout=2)
    proxy.restore()
    publish(proxy.port, [("hydro/via-proxy", "3")])


FAKE_HYDROD = r'''
import json, signal, sys, threading, time, tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer

with open(sys.argv[sys.argv.index("--config") + 1], "rb") as file:
    config = tomllib.load(file)
def log(event, **fields):
    print(json.dumps({"ts": time.time(), "level": "info", "event": event, "actor": "fake", **fields}))
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "auth": self.headers.get("Authorization")}).encode()
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = HTTPServer((config["http"]["host"], config["http"]["port"]), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("not json", flush=True)
print("to stderr", file=sys.stderr, flush=True)
log("mqtt_subscribed", port=config["mqtt"]["port"], client_id=config["mqtt"]["client_id"],
    batch_size=config["telemetry"]["batch_size"])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait(60)
log("daemon_stopped")
'''


def test_daemon_writes_a_valid_config_and_follows_the_log(make_daemon, broker, tmp_path, monkeypatch):
    import harness
    import sys

    script = tmp_path / "fake_hydrod.py"
    script.write_text(FAKE_HYDROD)
    monkeypatch.setattr(harness, "_hydrod_argv", lambda: [sys.executable, str(script)])
    daemon = make_daemon(telemetry={"batch_size": 7})
    ready = daemon.wait_ready()
    assert ready["port"] == broker.port and ready["batch_size"] == 7
    assert ready["client_id"].startswith("hydrod-test-")
    assert "not json" in daemon.lines
    wait_until(lambda: "to stderr" in daemon.stderr, 5, "stderr line")
    assert daemon.http("GET", "/healthz", token="s3cret") == (
        200, {"path": "/healthz", "auth": "Bearer s3cret"})
    assert daemon.http("GET", "/nope")[0] == 404
    with pytest.raises(AssertionError, match="timed out"):
        daemon.wait_for("never_logged", timeout=0.2)
    assert daemon.terminate(10) == 0
    assert daemon.events("daemon_stopped")
    with pytest.raises(AssertionError, match="exited"):
        daemon.wait_for("never_logged", timeout=30)


def test_the_daemon_config_is_one_hydrod_accepts(make_daemon, database):
    settings = pytest.importorskip("hydrod.settings")
    daemon = make_daemon(start=False, telemetry={"batch_size": 7}, http={"token": "t"})
    loaded = settings.load(daemon.config_path, environ={})
    assert loaded.database.dsn.get_secret_value() == database
    assert (loaded.telemetry.batch_size, loaded.http.port) == (7, daemon.config["http"]["port"])
    assert loaded.supervisor.backoff_max_s == 0.2


def test_free_ports_lie_below_the_ephemeral_range_that_outgoing_connections_use():
    import socket

    from harness import _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(10_000 <= port < _ephemeral_low() for port in ports), ports
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))
