"""TLS to the broker and broker passwords, against a private Mosquitto with a
certificate made here (tests/harness.py make_certificates) and a password file."""

from __future__ import annotations

import json

import pytest

from harness import make_certificates, publish, register_node, running_broker, wait_until
from test_faults import PH_HW, all_stored, samples

USER, PASSWORD = "hydrod", "pw-Zq7:not in any log"


@pytest.fixture
def certificates(tmp_path):
    return make_certificates(tmp_path / "certs")


@pytest.fixture
def broker(tmp_path, certificates):
    """conftest's broker, plus a TLS listener (broker.tls_port) and a password for USER."""
    with running_broker(tmp_path / "mosquitto", tls=certificates, passwords={USER: PASSWORD}) as server:
        yield server


def tls(broker, ca_file) -> dict:
    return {"host": "127.0.0.1", "port": broker.tls_port, "tls": True, "ca_file": str(ca_file)}


def no_password_anywhere(daemon) -> None:
    text = "\n".join(json.dumps(line) if isinstance(line, dict) else line for line in daemon.lines)
    assert daemon.lines and PASSWORD not in text and PASSWORD not in "\n".join(daemon.stderr)


def retrying(daemon, event, attempts=3, **fields):
    """hydrod is still running and has logged `event` for `attempts` attempts (debug after the first)."""
    daemon.wait_for(event, **fields)
    daemon.wait_for("mqtt_connect_failed", attempt=lambda n: n >= attempts)
    assert daemon.running


def test_hydrod_connects_over_tls_with_a_password_and_stores_a_sample(make_daemon, broker, certificates, database):
    daemon = make_daemon(mqtt={**tls(broker, certificates.ca), "username": USER},
                         env={"HYDROD_MQTT_PASSWORD": PASSWORD}, logging={"level": "debug"})
    daemon.wait_ready()
    assert daemon.events("mqtt_connected")[0]["port"] == broker.tls_port
    register_node(broker.port, database, PH_HW)  # the test's client: plain and anonymous
    publish(broker.port, samples(3))
    wait_until(all_stored(database, 3), 10, "samples received over TLS, stored")
    assert daemon.terminate() == 0
    no_password_anywhere(daemon)


def test_a_wrong_ca_is_logged_naming_the_certificate_problem_and_hydrod_keeps_retrying(
        make_daemon, broker, certificates):
    daemon = make_daemon(mqtt=tls(broker, certificates.other_ca), logging={"level": "debug"})
    failed = daemon.wait_for("mqtt_connect_failed")
    assert failed["level"] == "warning" and failed["port"] == broker.tls_port
    assert "certificate verify failed" in failed["error"] and "self-signed certificate" in failed["error"], failed
    retrying(daemon, "mqtt_connect_failed")
    status, body = daemon.http("GET", "/healthz")
    assert status == 503 and body["failing"] == ["mqtt"], body
    assert not daemon.events("mqtt_connected")


def test_a_wrong_password_is_refused_and_retried_and_never_logged(make_daemon, broker):
    daemon = make_daemon(mqtt={"username": USER}, env={"HYDROD_MQTT_PASSWORD": PASSWORD[::-1]},
                         logging={"level": "debug"})
    refused = daemon.wait_for("mqtt_connect_refused")
    assert refused["reason"] == "Not authorized", refused
    # The warning that follows says so too, not what paho makes of the link's end ("Protocol error").
    assert daemon.wait_for("mqtt_connect_failed", attempt=1)["error"] == "refused: Not authorized"
    retrying(daemon, "mqtt_connect_refused")
    assert len(daemon.events("mqtt_connect_refused")) >= 3
    assert daemon.terminate() == 0
    no_password_anywhere(daemon)
    text = "\n".join(json.dumps(line) if isinstance(line, dict) else line for line in daemon.lines)
    assert PASSWORD[::-1] not in text



@pytest.mark.parametrize("content", ["not a certificate\n", "-----BEGIN CERTIFICATE-----\n"])
def test_a_ca_file_that_holds_no_certificate_stops_hydrod_with_exit_2_naming_key_and_path(
        make_daemon, broker, tmp_path, content):
    # Waiting will not fix it: a config error, before anything starts (not exit 4 from MqttIo's start).
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text(content)
    daemon = make_daemon(mqtt=tls(broker, bad))
    assert daemon.proc.wait(30) == 2
    daemon._join_readers()
    [line] = daemon.stderr
    assert line.startswith(f"hydrod: {daemon.config_path}: `mqtt.ca_file` {bad}: not a PEM CA certificate"), line
    assert not daemon.events("actor_started")
