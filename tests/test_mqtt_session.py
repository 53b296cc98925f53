"""hydrod's persistent MQTT session, end to end: every heartbeat a node sends is
stored and a real redelivery is not; a change of shared group leaves no old
subscription behind in the session."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from harness import (fast_config, free_port, merge_sections, metric_value, publish, query, register_node, to_toml,
                     wait_until)

PH_HW = "esp32-a1b2c3d4e5f6"
PH_UID = "nd-ph-a1b2c3d4e5f6"
BEAT = {"uptime": 12, "free_heap": 102000, "rssi": -62, "fw_version": "1.0.0"}
BEAT_TOPIC = f"hydro/gh-temp/zn-temp/{PH_UID}/heartbeat"


def heartbeats(dsn):
    return query(dsn, "SELECT count(*) FROM node_events WHERE kind = 'heartbeat'")[0][0]


def metrics(daemon):
    status, text = daemon.http("GET", "/metrics")
    assert status == 200
    return text


# hydrod, killed (-9) right after its first commit: the broker holds the
# message unacknowledged and must send it again.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from hydrod import cli

    def kill_after_commit(actor, message):
        if actor == "mqtt_io" and type(message).__name__ == "Settled":
            os.kill(os.getpid(), signal.SIGKILL)

    sys.exit(cli.main(["--config", sys.argv[1], "run"], fault_hook=kill_after_commit))
""")


def test_a_heartbeat_the_broker_redelivers_after_it_was_stored_is_stored_once(
        make_daemon, broker, database, tmp_path):
    client_id = "hydrod-redelivery"
    first = make_daemon(mqtt={"client_id": client_id})  # makes the session, registers the node
    first.wait_ready()
    register_node(broker.port, database, PH_HW)
    assert first.terminate() == 0

    config = merge_sections(fast_config(broker.port, database, free_port()), {"mqtt": {"client_id": client_id}})
    (tmp_path / "config.toml").write_text(to_toml(config))
    killer = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path / "config.toml")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        publish(broker.port, [(BEAT_TOPIC, BEAT)])  # the session holds it until hydrod is there
        assert killer.wait(30) == -9
    finally:
        killer.kill()
        out = killer.communicate()[0]
    assert heartbeats(database) == 1, out[-3000:]  # committed, never acknowledged

    again = make_daemon(mqtt={"client_id": client_id})
    again.wait_ready()
    wait_until(lambda: metric_value(metrics(again), "hydrod_messages_duplicate_total", kind="heartbeat") == 1,
               what="the redelivery seen and skipped")
    assert heartbeats(database) == 1
    assert metric_value(metrics(again), "hydrod_messages_received_total", kind="heartbeat") == 1
    assert (metric_value(metrics(again), "hydrod_messages_stored_total", actor="db_writer") or 0) == 0
    # The same bytes sent anew are a new heartbeat.
    publish(broker.port, [(BEAT_TOPIC, BEAT)])
    wait_until(lambda: heartbeats(database) == 2, what="a new heartbeat alike")


def telemetry_received(daemon):
    return metric_value(metrics(daemon), "hydrod_messages_received_total", kind="telemetry") or 0


def send_and_count(daemon, broker, database, count, start):
    """Publish `count` samples and a sentinel last; once the sentinel is stored,
    everything before it was received, however many times."""
    topic = f"hydro/gh-temp/zn-temp/{PH_UID}/ph/telemetry"
    publish(broker.port, [(topic, {"metric_type": "PH", "value": 6.0, "ts": start + i}) for i in range(count)]
            + [(topic, {"metric_type": "PH", "value": 1.0, "ts": start + count})])
    wait_until(lambda: query(database, "SELECT 1 FROM telemetry_samples WHERE value = 1.0 AND"
                                       " ts = to_timestamp(%s)", (start + count,)), what="the sentinel")
    return telemetry_received(daemon)


def test_a_change_of_shared_group_leaves_the_session_subscribed_once(make_daemon, broker, database):
    client_id = "hydrod-regroup"
    ts = 1_764_000_000
    groups = ["", "g1", "g2", ""]  # plain -> shared -> another group -> plain
    for number, group in enumerate(groups):
        daemon = make_daemon(mqtt={"client_id": client_id, "shared_group": group})
        subscribed = daemon.wait_ready()
        # The session may hold the filters of every other group this client id ever used.
        assert subscribed["unsubscribed"] == [0, 12, 24, 24][number]
        if number == 0:
            register_node(broker.port, database, PH_HW)
        assert send_and_count(daemon, broker, database, 50, ts) == 51, f"shared_group {group!r}"
        ts += 1000
        assert daemon.terminate() == 0
