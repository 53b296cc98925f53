"""Logs (SPEC §5): one JSON object per line with ts, level, event and actor, or text when
asked; never a secret."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime

import psycopg

from harness import (fast_config, free_port, merge_sections, publish, query, register_node, to_toml,
                     wait_until)

PH_HW = "esp32-a1b2c3d4e5f6"
PH_UID = "nd-ph-a1b2c3d4e5f6"


def some_of_everything(daemon, broker, database) -> None:
    """Registration, telemetry, a rejection, a clock request, a config push, stats."""
    uid = register_node(broker.port, database, PH_HW)
    publish(broker.port, [
        (f"hydro/gh-temp/zn-temp/{PH_HW}/ph_sensor/telemetry", {"metric_type": "PH", "value": 5.9}),
        (f"hydro/gh-temp/zn-temp/{PH_HW}/heartbeat", b"{not json"),
        ("hydro/time/request", {"message_type": "time_request", "uptime": 12}),
    ])
    wait_until(lambda: query(database, "SELECT 1 FROM dead_letters"), what="the rejection")
    status, _ = daemon.http("POST", f"/api/nodes/{uid}/config", json={"gh_uid": "gh-1", "zone_uid": "zn-1",
                                                                      "channels": []},
                            token=daemon.config["http"].get("token"))
    assert status == 202
    daemon.wait_for("stats")


def test_every_log_line_is_json_with_ts_level_event_and_actor(make_daemon, broker, database):
    # At debug level the libraries (paho, pykka, psycopg, werkzeug) log too.
    daemon = make_daemon(logging={"level": "debug"})
    daemon.wait_ready()
    some_of_everything(daemon, broker, database)
    assert daemon.terminate() == 0
    assert daemon.lines, "no log lines"
    not_json = [line for line in daemon.lines if not isinstance(line, dict)]
    assert not_json == []
    incomplete = [r for r in daemon.lines if not all(isinstance(r.get(k), str) and r[k]
                                                     for k in ("ts", "level", "event", "actor"))]
    assert incomplete == []
    for record in daemon.lines:
        datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    assert {r["actor"] for r in daemon.lines} >= {"supervisor", "mqtt_io", "db_writer", "node_registry"}
    assert len({r["event"] for r in daemon.lines}) > 10


def test_format_text_writes_readable_lines_not_json(make_daemon, broker, database):
    daemon = make_daemon(logging={"format": "text", "level": "info"})
    wait_until(lambda: any("mqtt_subscribed" in str(line) for line in daemon.lines), 30, "mqtt_subscribed")
    assert daemon.terminate() == 0
    lines = [line for line in daemon.lines if line]
    assert lines and all(isinstance(line, str) for line in lines), lines[:5]
    started = next(line for line in lines if "daemon_started" in line)
    assert "[info" in started and "actor=supervisor" in started


SECRETS = {"mqtt": "mqtt-Pa55-5f3c1e", "db": "db-Pa55-9a7b2d", "token": "tok-5ecret-77c0aa"}


def no_secret_in(*outputs: str) -> list[str]:
    return [name for name, secret in SECRETS.items() for out in outputs if secret in out]


def test_the_mqtt_password_the_dsn_password_and_the_token_are_never_logged(
        make_daemon, broker, database, tmp_path):
    with_password = database.replace("://", f"://:{SECRETS['db']}@", 1) if "@" not in database else \
        database.replace("@", f":{SECRETS['db']}@", 1)
    try:  # a server that trusts 127.0.0.1 ignores the password; one that checks it would refuse it
        psycopg.connect(with_password, connect_timeout=5).close()
    except psycopg.OperationalError:
        with_password = database  # the DSN's password is still covered by the unreachable case below
    env = {"HYDROD_MQTT_PASSWORD": SECRETS["mqtt"], "HYDROD_DATABASE_DSN": with_password,
           "HYDROD_HTTP_TOKEN": SECRETS["token"]}
    daemon = make_daemon(env=env, mqtt={"username": "hydrod"}, logging={"level": "debug"})
    daemon.wait_ready()
    daemon.config["http"]["token"] = SECRETS["token"]
    some_of_everything(daemon, broker, database)
    assert daemon.http("GET", "/api/nodes", token="wrong")[0] == 401
    assert daemon.terminate() == 0
    assert no_secret_in("\n".join(map(str, daemon.lines)), "\n".join(daemon.stderr)) == []

    # The DSN password when PostgreSQL cannot be reached: the error paths.
    unreachable = f"postgresql://hydrod:{SECRETS['db']}@127.0.0.1:{free_port()}/hydro"
    config = tmp_path / "unreachable.toml"
    config.write_text(to_toml(merge_sections(fast_config(broker.port, unreachable, free_port()),
                                             {"database": {"startup_timeout_s": 1.0}, "logging": {"level": "debug"}})))
    for command in (["run"], ["migrate"], ["nodes"], ["check-config"]):
        result = subprocess.run([sys.executable, "-m", "hydrod", "--config", str(config), *command],
                                capture_output=True, text=True, timeout=60)
        assert no_secret_in(result.stdout, result.stderr) == [], command
        if command != ["check-config"]:
            assert result.returncode != 0 and "127.0.0.1" in result.stderr + result.stdout, command
