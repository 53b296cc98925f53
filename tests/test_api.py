"""core/api.py, the WSGI application, driven synchronously through Werkzeug's test
client: the edge rules (token, Origin, Content-Type, bodies), secrets kept out of
answers, errors in JSON, and /healthz. Nodes are read on a real PostgreSQL; the
actors are stand-ins (a push recorder, addresses with a state). The same rules
end to end, through waitress and the daemon: test_http_api.py."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import psycopg
import pytest
from werkzeug.test import Client

from harness import RecordingLog
from hydrod import store
from hydrod.actors.messages import HealthReport
from hydrod.core.api import Api, Backend, Unavailable, without_secrets
from hydrod.core.commands import CommandRefused
from hydrod.core.configs import PushRefused, PushResult
from hydrod.core.database import open_pool
from hydrod.core.reads import Reads
from hydrod.metrics import Metrics

HW, UID = "esp32-a1b2c3d4e5f6", "nd-ph-a1b2c3d4e5f6"
PUSH = {"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"}


@dataclass
class Watched:
    """An actor's address as /healthz reads it."""

    name: str
    health: HealthReport | None = None
    busy_since: float | None = None
    handling: str | None = None
    stuck: str | None = None

    def not_progressing(self, stall_after_s: float, now: float) -> str | None:
        return self.stuck


class Peers:
    """The actors, as the API reaches them: pushes are recorded, or answered as told."""

    def __init__(self):
        self.pushed: list[tuple[str, object]] = []
        self.commanded: list[tuple[str, object]] = []
        self.refuse: Exception | None = None
        self.actors = [Watched("db_writer"), Watched("mqtt_io")]

    def push_config(self, uid, body):
        if self.refuse is not None:
            raise self.refuse
        self.pushed.append((uid, body))
        return PushResult(uid, len(self.pushed), f"hydro/gh-1/zn-1/{HW}/config", "published")

    def create_command(self, uid, body):
        if self.refuse is not None:
            raise self.refuse
        created = body not in [b for _, b in self.commanded]
        self.commanded.append((uid, body))
        return {"cmd_id": body["cmd_id"], "status": "queued"}, created

    def backend(self) -> Backend:
        return Backend(push_config=self.push_config, create_command=self.create_command, actors=tuple(self.actors),
                       resources={"db_writer": "database", "mqtt_io": "mqtt"})


@pytest.fixture
def make_api(migrated):
    with psycopg.connect(migrated) as conn, conn.cursor() as cur:
        store.register_node(cur, hardware_id=HW, node_type="ph", fw_version="1.0.0", capabilities=["ph"],
                            hardware_revision=None, name=None, wanted_uid=None, base=UID, seen_at=time.time())
    opened = []

    def make(token="", dsn=migrated, peers=None, read_timeout=5.0):
        peers = peers or Peers()
        reads = Reads(open_pool("reads", dsn, (1, 1)), timeout=read_timeout)
        opened.append(reads)
        log = RecordingLog()
        api = Api(peers.backend(), reads, metrics=Metrics(), log=log, token=token, stall_after_s=30.0)
        return Client(api), peers, log

    yield make
    for reads in opened:
        reads.close()


def test_nodes_are_read_on_the_read_pool_and_an_unknown_or_malformed_uid_is_404(make_api):
    client, _, _ = make_api()
    answer = client.get("/api/nodes")
    assert answer.status_code == 200 and [n["uid"] for n in answer.json] == [UID]
    answer = client.get(f"/api/nodes/{UID}")
    assert answer.status_code == 200 and answer.json["hardware_id"] == HW
    assert answer.json["last_seen_at"].startswith("20")  # datetimes as ISO 8601
    for missing in ("nd-nobody", "nd nobody", "x" * 129):
        answer = client.get(f"/api/nodes/{missing}")
        assert answer.status_code == 404 and "no node with uid" in answer.json["error"], missing
    assert client.get("/api/nowhere").status_code == 404
    assert client.delete("/api/nodes").status_code == 405


def test_the_token_guards_the_api_but_not_the_probes(make_api):
    client, peers, _ = make_api(token="s3cret-token")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
        answer = client.get("/api/nodes", headers=headers)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer", headers
    assert client.post(f"/api/nodes/{UID}/config", json=PUSH).status_code == 401
    assert peers.pushed == []
    assert client.get("/api/nodes", headers={"Authorization": "bearer s3cret-token"}).status_code == 200
    # Probes, and the page and its files (no data: the page's own requests carry the token).
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/").status_code == 200
    assert client.get(f"/api/nodes/{UID}/telemetry/last").status_code == 401


def test_a_change_from_another_origin_or_not_in_json_is_refused_before_it_is_made(make_api):
    client, peers, _ = make_api()
    for origin in ("http://evil.example", "http://localhost:8081", "null", "http://localhost:x", "ftp://localhost"):
        answer = client.post(f"/api/nodes/{UID}/config", json=PUSH, headers={"Origin": origin})
        assert answer.status_code == 403 and origin in answer.json["error"], origin
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        answer = client.post(f"/api/nodes/{UID}/config", data=json.dumps(PUSH), content_type=content_type)
        assert answer.status_code == 415 and "application/json" in answer.json["error"], content_type
    assert peers.pushed == []
    # Reads from anywhere; changes from none, or from its own host and port (the
    # scheme's default port when none is named; any scheme: a TLS proxy in front).
    assert client.get("/api/nodes", headers={"Origin": "http://evil.example"}).status_code == 200
    for host, origin in (("localhost", None), ("localhost", "http://localhost:80"),
                         ("localhost:8080", "https://localhost:8080")):
        answer = client.post(f"/api/nodes/{UID}/config", json=PUSH, base_url=f"http://{host}",
                             headers={"Origin": origin} if origin else {})
        assert answer.status_code == 202, (host, origin, answer.json)
    assert client.post(f"/api/nodes/{UID}/config", json=PUSH, base_url="http://localhost:8080",
                       headers={"Origin": "https://localhost"}).status_code == 403  # port 443
    assert peers.pushed == [(UID, PUSH)] * 3
    assert answer.json == {"node_uid": UID, "version": 3, "topic": f"hydro/gh-1/zn-1/{HW}/config",
                           "status": "published"}


@pytest.mark.parametrize("body, error", [
    (b"{", "body is not JSON"),
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"a": 1e999}', "1e999 is out of range"),
    (b"\xff\xfe", "body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"name": "a\\u0000b"}', "NUL character"),
])
def test_a_body_that_is_not_a_config_in_json_is_400_and_nothing_is_pushed(make_api, body, error):
    client, peers, _ = make_api()
    answer = client.post(f"/api/nodes/{UID}/config", data=body, content_type="application/json")
    assert answer.status_code == 400 and error in answer.json["error"]
    assert peers.pushed == []


def test_a_body_over_the_limit_is_413(make_api):
    client, peers, _ = make_api()
    answer = client.post(f"/api/nodes/{UID}/config", data=b" " * (256 * 1024 + 1), content_type="application/json")
    assert answer.status_code == 413 and "body too large" in answer.json["error"]
    assert peers.pushed == []


def test_a_refused_push_a_busy_actor_and_a_bug_each_get_their_own_json_answer(make_api):
    client, peers, log = make_api()
    peers.refuse = PushRefused(409, "node nd-x is not bound to a zone")
    answer = client.post(f"/api/nodes/{UID}/config", json=PUSH)
    assert (answer.status_code, answer.json) == (409, {"error": "node nd-x is not bound to a zone"})
    peers.refuse = Unavailable("config_publisher is restarting or stopped")
    answer = client.post(f"/api/nodes/{UID}/config", json=PUSH)
    assert answer.status_code == 503
    assert answer.json["error"] == "hydrod is busy or restarting: config_publisher is restarting or stopped"
    peers.refuse = KeyError("a bug")
    answer = client.post(f"/api/nodes/{UID}/config", json=PUSH)
    assert answer.status_code == 500 and "http_request_failed" in answer.json["error"]
    assert "a bug" not in answer.text  # the traceback goes to the log, not to the client
    [failed] = log.events("http_request_failed")
    assert (failed["path"], failed["method"], failed["exception"]) == (f"/api/nodes/{UID}/config", "POST", True)


def test_reads_while_the_database_is_away_are_503_naming_it(make_api, migrated):
    client, _, _ = make_api(dsn="postgresql://nobody@127.0.0.1:1/none", read_timeout=0.5)
    answer = client.get("/api/nodes")
    assert answer.status_code == 503 and answer.json["error"].startswith("database unavailable: ")


def test_no_answer_holds_a_secret_at_any_depth(make_api, migrated):
    secrets = ["a" * 64, "broker-pw", "wifi-pw", "wifi-psk", "chan-token", "deep-secret", "api-k"]
    config = {"node_secret": secrets[0], "mqtt": {"host": "10.0.0.2", "password": secrets[1]},
              "wifi": {"ssid": "greenhouse", "pass": secrets[2], "PSK": secrets[3]},
              "channels": [{"name": "ph", "auth_token": secrets[4]},
                           {"name": "x", "extra": [{"deeper": {"Secret": secrets[5], "ApiKey": secrets[6]}}]}]}
    with psycopg.connect(migrated) as conn:
        conn.execute("UPDATE nodes SET config = %s", (json.dumps(config),))
    client, _, _ = make_api()
    node = client.get(f"/api/nodes/{UID}").json
    assert node["config"] == {"mqtt": {"host": "10.0.0.2"}, "wifi": {"ssid": "greenhouse"},
                              "channels": [{"name": "ph"}, {"name": "x", "extra": [{"deeper": {}}]}]}
    for path in (f"/api/nodes/{UID}", "/api/nodes"):
        assert not [s for s in secrets if s in client.get(path).text], path


def test_secrets_are_taken_out_of_data_nested_past_the_recursion_limit():
    deep: object = {"password": "x", "keep": 1}
    for _ in range(50_000):
        deep = [{"inner": deep, "token": "y"}]
    stripped = without_secrets(deep)
    for _ in range(50_000):
        assert set(stripped[0]) == {"inner"}
        stripped = stripped[0]["inner"]
    assert stripped == {"keep": 1}


def test_healthz_names_the_part_each_failing_actor_is_about(make_api):
    peers = Peers()
    client, _, _ = make_api(peers=peers)
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json == {"status": "ok", "failing": [], "checks": {"db_writer": {"ok": True, "detail": "running"},
                                                                    "mqtt_io": {"ok": True, "detail": "running"}}}
    db_writer, mqtt_io = peers.actors
    db_writer.health = HealthReport(False, "database unavailable")
    db_writer.busy_since, db_writer.handling = time.monotonic() - 2, "Flush"
    mqtt_io.stuck = "stalled: on one Batch for 31.0 s"
    answer = client.get("/healthz")
    assert answer.status_code == 503 and answer.json["failing"] == ["database", "mqtt_io"]
    checks = answer.json["checks"]
    assert checks["db_writer"]["ok"] is False
    assert checks["db_writer"]["detail"].startswith("database unavailable; busy with Flush for 2.")
    assert checks["mqtt_io"] == {"ok": False, "detail": "stalled: on one Batch for 31.0 s"}


def test_a_command_is_created_once_and_a_refused_or_malformed_one_is_answered_in_json(make_api):
    client, peers, _ = make_api()
    command = {"cmd_id": "c-1", "cmd": "pump_on", "channel": "pump_1"}
    answer = client.post(f"/api/nodes/{UID}/commands", json=command)
    assert (answer.status_code, answer.json) == (202, {"cmd_id": "c-1", "status": "queued"})
    assert client.post(f"/api/nodes/{UID}/commands", json=command).status_code == 200  # the same again
    answer = client.post(f"/api/nodes/{UID}/commands", data=b'{"cmd": "a\\u0000"}', content_type="application/json")
    assert answer.status_code == 400 and "which a command cannot carry" in answer.json["error"]
    assert client.post(f"/api/nodes/{UID}/commands", json=command, headers={"Origin": "http://evil.example"}
                       ).status_code == 403
    peers.refuse = CommandRefused(422, "`cmd` is missing")
    assert client.post(f"/api/nodes/{UID}/commands", json={}).json == {"error": "`cmd` is missing"}
    peers.refuse = Unavailable("commands is restarting or stopped")
    assert client.post(f"/api/nodes/{UID}/commands", json=command).status_code == 503
    assert peers.commanded == [(UID, command)] * 2
    answer = client.get(f"/api/nodes/{UID}/commands?limit=0")
    assert answer.status_code == 400 and "`limit`" in answer.json["error"]
    assert client.get("/api/commands/nope").status_code == 404
