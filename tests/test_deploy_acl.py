"""deploy/mosquitto.acl, the file shipped, in a real Mosquitto with per-node logins made
by mosquitto_passwd: a node publishes only under its own topics and reads only its own
config and commands; hydrod's user has what it needs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from harness import Mosquitto, Subscriber, publish, query, wait_until

ACL = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto.acl"
NODE_A, NODE_B = "esp32-0000000000aa", "esp32-0000000000bb"
PASSWORDS = {"hydrod": "hydrod-pw", NODE_A: "node-a-pw", NODE_B: "node-b-pw"}


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto with deploy/mosquitto.acl and logins (mosquitto_passwd) for
    hydrod and two nodes."""
    server = Mosquitto(tmp_path / "acl-mosquitto", passwords=PASSWORDS, acl_file=ACL).start()
    try:
        yield server
    finally:
        server.stop()
        server.kill()


def login(user: str) -> dict[str, str]:
    return {"username": user, "password": PASSWORDS[user]}


def test_a_node_publishes_only_under_its_own_topics(acl_broker):
    port = acl_broker.port
    with Subscriber(port, "$share/hydrod/hydro/+/+/+/+/telemetry", **login("hydrod")) as hydrod:
        publish(port, [(f"hydro/gh-1/zn-1/{NODE_B}/ph/telemetry", {"metric_type": "PH", "value": 1.0, "ts": 1}),
                       (f"hydro/gh-temp/zn-temp/{NODE_B}/ph/telemetry", {"metric_type": "PH", "value": 2.0, "ts": 2}),
                       (f"hydro/gh-1/zn-1/{NODE_A}/ph/telemetry", {"metric_type": "PH", "value": 3.0, "ts": 3})],
                **login(NODE_A))
        # MQTT 3.1.1: the forged ones are PUBACKed and dropped. Node B's own sample, sent
        # after, is the positive control: once it is in, the forged ones had their chance.
        publish(port, [(f"hydro/gh-1/zn-1/{NODE_B}/ph/telemetry", {"metric_type": "PH", "value": 4.0, "ts": 4})],
                **login(NODE_B))
        hydrod.wait_for(lambda m: m.json()["value"] == 4.0)
        assert [(m.topic, m.json()["value"]) for m in hydrod.messages] == [
            (f"hydro/gh-1/zn-1/{NODE_A}/ph/telemetry", 3.0), (f"hydro/gh-1/zn-1/{NODE_B}/ph/telemetry", 4.0)]


def test_a_node_reads_only_its_own_config_and_commands(acl_broker):
    port = acl_broker.port
    with Subscriber(port, "hydro/#", **login(NODE_A)) as node_a, \
            Subscriber(port, "hydro/#", **login(NODE_B)) as node_b:
        publish(port, [(f"hydro/gh-1/zn-1/{NODE_B}/pump/command", {"cmd": "run", "for": "b"}),
                       (f"hydro/gh-temp/zn-temp/{NODE_B}/config", {"node_id": "b"}),
                       (f"hydro/gh-1/zn-1/{NODE_A}/pump/command", {"cmd": "run", "for": "a"}),
                       (f"hydro/gh-temp/zn-temp/{NODE_A}/config", {"node_id": "a"}),
                       ("hydro/time/response", {"message_type": "time_response", "unix_ts": 1})],
                **login("hydrod"))
        # Node A's own telemetry is not delivered back to it either: it may write it, not read it.
        publish(port, [(f"hydro/gh-1/zn-1/{NODE_A}/ph/telemetry", {"metric_type": "PH", "value": 1.0})],
                **login(NODE_A))
        # The time response is the last message hydrod sent: the positive control.
        node_b.wait_for(lambda m: m.topic == "hydro/time/response")
        node_a.wait_for(lambda m: m.topic == "hydro/time/response")
        topics_a = [m.topic for m in node_a.messages]
        topics_b = [m.topic for m in node_b.messages]
    assert topics_a == [f"hydro/gh-1/zn-1/{NODE_A}/pump/command", f"hydro/gh-temp/zn-temp/{NODE_A}/config",
                        "hydro/time/response"]
    assert topics_b == [f"hydro/gh-1/zn-1/{NODE_B}/pump/command", f"hydro/gh-temp/zn-temp/{NODE_B}/config",
                        "hydro/time/response"]


def test_a_node_cannot_send_what_only_hydrod_sends(acl_broker):
    port = acl_broker.port
    with Subscriber(port, "hydro/#", **login(NODE_B)) as node_b:
        publish(port, [(f"hydro/gh-1/zn-1/{NODE_B}/pump/command", {"cmd": "run", "from": "a"}),
                       (f"hydro/gh-temp/zn-temp/{NODE_B}/config", {"node_id": "from-a"}),
                       ("hydro/time/response", {"message_type": "time_response", "unix_ts": 0})],
                **login(NODE_A))
        publish(port, [("hydro/time/response", {"message_type": "time_response", "unix_ts": 1})], **login("hydrod"))
        node_b.wait_for(1)
        assert [m.json()["unix_ts"] for m in node_b.messages] == [1]


def test_hydrod_with_its_login_stores_a_nodes_sample_and_never_sees_a_forged_one(acl_broker, make_daemon, database):
    daemon = make_daemon(mqtt={"port": acl_broker.port, "username": "hydrod", "shared_group": "hydrod"},
                         env={"HYDROD_MQTT_PASSWORD": PASSWORDS["hydrod"]})
    daemon.wait_ready()
    port = acl_broker.port
    for node in (NODE_A, NODE_B):
        publish(port, [("hydro/node_hello", {"message_type": "node_hello", "hardware_id": node, "node_type": "ph",
                                             "fw_version": "1.0.0", "capabilities": ["ph"]})], **login(node))
    wait_until(lambda: query(database, "SELECT count(*) FROM nodes")[0][0] == 2, 10, "both nodes registered")
    uid_a, uid_b = (query(database, "SELECT uid FROM nodes WHERE hardware_id = %s", (h,))[0][0]
                    for h in (NODE_A, NODE_B))

    # Time: node A asks, hydrod answers on hydro/time/response.
    with Subscriber(port, "hydro/time/response", **login(NODE_A)) as clock:
        publish(port, [("hydro/time/request", {"message_type": "time_request", "uptime": 5})], **login(NODE_A))
        assert clock.wait_for(1)[0].json()["message_type"] == "time_response"

    # Telemetry: A's own sample, then one forged as B, then B's own (the positive control).
    publish(port, [(f"hydro/gh-temp/zn-temp/{NODE_A}/ph/telemetry", {"metric_type": "PH", "value": 6.1, "ts": 1000}),
                   (f"hydro/gh-temp/zn-temp/{NODE_B}/ph/telemetry", {"metric_type": "PH", "value": 9.9, "ts": 1001})],
            **login(NODE_A))
    publish(port, [(f"hydro/gh-temp/zn-temp/{NODE_B}/ph/telemetry", {"metric_type": "PH", "value": 6.2, "ts": 1002})],
            **login(NODE_B))
    samples = "SELECT n.hardware_id, s.value FROM telemetry_samples s JOIN nodes n ON n.id = s.node_id ORDER BY s.ts"
    wait_until(lambda: len(query(database, samples)) >= 2, 10, "both nodes' own samples stored")
    assert query(database, samples) == [(NODE_A, 6.1), (NODE_B, 6.2)]
    assert query(database, "SELECT count(*) FROM dead_letters")[0][0] == 0

    # Config: hydrod pushes one to each to bind it (so on the temp topic); each gets only its own.
    with Subscriber(port, "hydro/#", **login(NODE_A)) as node_a:
        for uid in (uid_b, uid_a):
            status, body = daemon.http("POST", f"/api/nodes/{uid}/config", json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
            assert status == 202, (status, body)
        wait_until(lambda: len(daemon.events("config_published")) == 2, 10, "both configs published")
        # hydrod's time response goes out after both configs: once it is in, B's had its chance.
        publish(port, [("hydro/time/request", {"message_type": "time_request", "uptime": 6})], **login(NODE_A))
        node_a.wait_for(lambda m: m.topic == "hydro/time/response")
        assert [m.topic for m in node_a.messages] == [f"hydro/gh-temp/zn-temp/{NODE_A}/config", "hydro/time/response"]
        assert node_a.messages[0].json()["node_id"] == uid_a


def test_a_node_on_mqtt_5_is_told_its_forged_publish_is_not_authorized(acl_broker):
    """MQTT 3.1.1 gives no sign (above); an MQTT 5 QoS 1 PUBACK carries the reason."""
    acks: dict[int, str] = {}
    done = threading.Event()

    def on_publish(_client, _userdata, mid, reason_code, _properties):
        acks[mid] = str(reason_code)
        if len(acks) == 2:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(NODE_A, PASSWORDS[NODE_A])
    client.on_publish = on_publish
    client.connect("127.0.0.1", acl_broker.port)
    client.loop_start()
    try:
        forged = client.publish(f"hydro/gh-1/zn-1/{NODE_B}/ph/telemetry", b"{}", qos=1).mid
        own = client.publish(f"hydro/gh-1/zn-1/{NODE_A}/ph/telemetry", b"{}", qos=1).mid
        assert done.wait(10), acks
    finally:
        client.disconnect()
        client.loop_stop()
    assert acks == {forged: "Not authorized", own: "No matching subscribers"}
