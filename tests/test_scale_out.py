"""Scale-out readiness (roadmap): two hydrods share the load over MQTT shared
subscriptions and one database, and every sample is stored exactly once."""

import time

from harness import BackgroundPublish, metric_value, publish, query, register_node, wait_until


def test_two_instances_in_one_shared_group_store_every_sample_once(make_daemon, broker, database):
    first = make_daemon(mqtt={"shared_group": "hydrod", "client_id": "hydrod-a"})
    second = make_daemon(mqtt={"shared_group": "hydrod", "client_id": "hydrod-b"})
    first.wait_ready()
    second.wait_ready()
    uids = [register_node(broker.port, database, f"esp32-{i:012x}") for i in range(4)]
    base = int(time.time()) - 10_000
    publish(broker.port, [(f"hydro/gh-1/zn-1/{uids[i % 4]}/ph/telemetry",
                           {"metric_type": "PH", "value": 6.0, "ts": base + i}) for i in range(2000)])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] >= 2000, 20,
               "2000 samples")
    assert query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 2000
    shares = [metric_value(d.http("GET", "/metrics")[1], "hydrod_messages_received_total", kind="telemetry")
              for d in (first, second)]
    assert all(share and share > 0 for share in shares), shares  # both took a share
    assert sum(shares) == 2000
    assert query(database, "SELECT count(*) FROM dead_letters")[0][0] == 0


def test_two_instances_registering_the_same_nodes_at_once_agree_on_every_uid(make_daemon, broker, database):
    first = make_daemon(mqtt={"shared_group": "hydrod", "client_id": "hydrod-a"})
    second = make_daemon(mqtt={"shared_group": "hydrod", "client_id": "hydrod-b"})
    first.wait_ready()
    second.wait_ready()

    def hello(hardware_id):
        return ("hydro/node_hello", {"message_type": "node_hello", "hardware_id": hardware_id,
                                     "node_type": "ph", "fw_version": "1.0.0", "capabilities": ["ph"]})

    # 40 nodes, each saying hello 4 times, plus 40 more whose ids collide on the same uids
    # (separators differ): both instances take a share of each.
    plain = [f"esp32-{i:012x}" for i in range(40)]
    colliding = [":".join(h[6:][j:j + 2] for j in range(0, 12, 2)) for h in plain]
    publish(broker.port, [hello(h) for _ in range(4) for h in plain] + [hello(h) for h in colliding])
    wait_until(lambda: query(database, "SELECT count(*) FROM nodes")[0][0] >= 80, 20, "80 nodes")
    def stored_by(daemon):
        text = daemon.http("GET", "/metrics")[1]
        return metric_value(text, "hydrod_messages_stored_total", actor="node_registry") or 0

    # Every one of the 200 hellos stored by one instance or the other.
    wait_until(lambda: stored_by(first) + stored_by(second) == 200, 20, "all 200 hellos processed")
    rows = query(database, "SELECT hardware_id, uid FROM nodes")
    assert len(rows) == 80 and len({uid for _, uid in rows}) == 80
    uids = dict(rows)
    for h, c in zip(plain, colliding):
        assert {uids[h], uids[c]} == {f"nd-ph-{h[6:]}", f"nd-ph-{h[6:]}-1"}
    assert query(database, "SELECT count(*) FROM dead_letters")[0][0] == 0


def test_an_instance_killed_mid_traffic_comes_back_and_every_sample_is_stored_once(make_daemon, broker, database):
    """kill -9 of one of two instances while nodes publish: what it had received and not
    acknowledged stays in its own persistent session on the broker (its client_id), and
    comes back to it when it restarts; nothing is lost, nothing is stored twice."""
    first = make_daemon(mqtt={"shared_group": "hydrod", "client_id": "hydrod-a"})
    second = make_daemon(mqtt={"shared_group": "hydrod", "client_id": "hydrod-b"})
    first.wait_ready()
    second.wait_ready()
    uids = [register_node(broker.port, database, f"esp32-{i:012x}") for i in range(4)]
    total = 4000
    base = int(time.time()) - 100_000
    sender = BackgroundPublish(broker.port, [
        (f"hydro/gh-1/zn-1/{uids[i % 4]}/ph/telemetry", {"metric_type": "PH", "value": 6.0, "ts": base + i})
        for i in range(total)])

    def stored() -> int:
        return query(database, "SELECT count(*) FROM telemetry_samples")[0][0]

    def received(daemon) -> float:
        return metric_value(daemon.http("GET", "/metrics")[1], "hydrod_messages_received_total",
                            kind="telemetry") or 0

    wait_until(lambda: received(first) > 300, 30, "the first instance taking its share")
    first.kill9()
    at_kill = stored()
    assert at_kill < total and not sender.done, "everything was in before the kill: the test proved nothing"
    sender.join()
    # Mosquitto keeps giving the dead instance its turn in the group: its share of what was
    # published meanwhile is queued in its session, not handed to the live one.
    wait_until(lambda: metric_value(second.http("GET", "/metrics")[1], "hydrod_messages_pending") == 0
               and received(second) > 0, 20, "the live instance done with its share")
    while_dead = stored()
    assert while_dead < total, "the live instance took everything: the restart proves nothing"

    mark = first.mark()
    first.start()  # the same client_id: it finds its session, and what the broker kept for it
    first.wait_for("mqtt_connected", since=mark, session_present=True)
    first.wait_for("mqtt_subscribed", since=mark)
    wait_until(lambda: stored() >= total, 60, f"{total} samples stored")
    # A sentinel per instance, published last, is stored last: anything redelivered is in by then.
    publish(broker.port, [(f"hydro/gh-1/zn-1/{uids[0]}/sentinel/telemetry",
                           {"metric_type": "PH", "value": 1.0, "ts": base - n}) for n in (1, 2)])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples WHERE channel = 'sentinel'")
               == [(2,)], 20, "the sentinels")
    assert query(database, "SELECT count(*), count(DISTINCT (node_id, ts)) FROM telemetry_samples"
                           " WHERE channel = 'ph'") == [(total, total)]
    assert query(database, "SELECT count(*) FROM dead_letters") == [(0,)]
    # Every message each live process received is stored or a skipped redelivery.
    for daemon in (first, second):
        text = daemon.http("GET", "/metrics")[1]
        assert received(daemon) == ((metric_value(text, "hydrod_messages_stored_total", actor="db_writer") or 0)
                                    + (metric_value(text, "hydrod_messages_duplicate_total", kind="telemetry") or 0))
    print(f"stored at kill: {at_kill}, before the restart: {while_dead}; "
          f"after it the first instance received {received(first)}")
