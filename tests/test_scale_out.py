"""Scale-out readiness (roadmap): two hydrods share the load over MQTT shared
subscriptions and one database, and every sample is stored exactly once."""

import time

from harness import metric_value, publish, query, register_node, wait_until


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
    assert query(database, "SELECT count(*), count(DISTINCT (node_id, ts)) FROM telemetry_samples")[0] == (
        2000, 2000)
    shares = [metric_value(d.http("GET", "/metrics")[1], "hydrod_messages_received_total", kind="telemetry")
              for d in (first, second)]
    assert all(share and share > 0 for share in shares), shares  # both took a share
    assert sum(shares) == 2000
    assert query(database, "SELECT count(*) FROM dead_letters")[0][0] == 0
