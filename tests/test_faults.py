"""Faults made to happen for real: kill -9 of hydrod, the database link cut,
the broker restarted, the broker link cut. After each, every sample published
is stored exactly once."""

from __future__ import annotations

import time

from harness import (BackgroundPublish, metric_value, publish, query, register_node, vmrss_kib,
                     wait_until)

PH_HW = "esp32-a1b2c3d4e5f6"
PH_UID = "nd-ph-a1b2c3d4e5f6"
TOPIC = f"hydro/gh-1/zn-1/{PH_UID}/ph/telemetry"


def samples(count: int, start: int = 0) -> list[tuple[str, dict]]:
    """`count` samples of one series, each with its own ts (seconds, in the past)."""
    base = int(time.time()) - 100_000
    return [(TOPIC, {"metric_type": "PH", "value": 6.0 + i / 100_000, "ts": base + i})
            for i in range(start, start + count)]


def stored(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM telemetry_samples")[0][0]


def all_stored(dsn: str, expected: int):
    return lambda: stored(dsn) >= expected


def assert_exactly_stored(dsn: str, expected: int) -> None:
    distinct = query(dsn, "SELECT count(*), count(DISTINCT ts) FROM telemetry_samples")[0]
    assert distinct == (expected, expected)
    assert query(dsn, "SELECT reason, count(*) FROM dead_letters GROUP BY reason") == []


def test_kill_9_in_the_middle_of_20000_samples_loses_none_and_duplicates_none(
        make_daemon, broker, database):
    first = make_daemon()
    first.wait_ready()
    register_node(broker.port, database, PH_HW)
    total = 20_000
    sender = BackgroundPublish(broker.port, samples(total))

    wait_until(lambda: stored(database) > 2000, 60, "some samples stored")
    first.kill9()
    at_kill = stored(database)
    assert at_kill < total, "hydrod stored everything before the kill: the test proved nothing"
    print(f"stored at kill: {at_kill}")

    sender.join()
    second = make_daemon(mqtt={"client_id": first.config["mqtt"]["client_id"]})
    second.wait_ready()
    wait_until(all_stored(database, total), 60, f"{total} samples stored after the restart")
    # Let anything redelivered after the last row settle: a sentinel, published last, is stored last.
    publish(broker.port, [(f"hydro/gh-1/zn-1/{PH_UID}/sentinel/telemetry",
                           {"metric_type": "PH", "value": 1, "ts": 1710000000})])
    wait_until(lambda: query(database, "SELECT 1 FROM telemetry_samples WHERE channel = 'sentinel'"),
               20, "the sentinel")
    assert query(database, "SELECT count(*), count(DISTINCT ts) FROM telemetry_samples"
                           " WHERE channel = 'ph'") == [(total, total)]
    assert query(database, "SELECT count(*) FROM dead_letters") == [(0,)]


def test_a_database_outage_is_reported_holds_messages_unacknowledged_in_bounded_memory_and_recovers(
        make_daemon, make_proxy, broker, database, pg_server):
    proxy = make_proxy(pg_server.port, pg_server.host)
    via_proxy = database.replace(f"{pg_server.host}:{pg_server.port}", f"127.0.0.1:{proxy.port}")
    assert via_proxy != database
    daemon = make_daemon(database={"dsn": via_proxy})
    daemon.wait_ready()
    register_node(broker.port, database, PH_HW)
    publish(broker.port, samples(1000))
    wait_until(all_stored(database, 1000), 20, "samples before the cut")

    def metrics() -> str:
        status, text = daemon.http("GET", "/metrics")
        assert status == 200
        return text

    acked_before = wait_until(lambda: metric_value(metrics(), "hydrod_messages_acked_total") or None,
                              10, "acknowledgements counted")
    mark = daemon.mark()
    proxy.cut()
    cut_at = time.monotonic()
    sender = BackgroundPublish(broker.port, samples(4000, start=1000))
    daemon.wait_for("db_unavailable", since=mark, timeout=10, actor="db_writer")
    status, body = wait_until(lambda: (r := daemon.http("GET", "/healthz"))[0] == 503 and r, 10,
                              "healthz failing")
    assert "database" in body["failing"], body
    sender.join()

    peak_kib = 0

    def watch_the_outage() -> bool:
        nonlocal peak_kib
        peak_kib = max(peak_kib, vmrss_kib(daemon.pid))
        assert stored(database) == 1000
        assert metric_value(metrics(), "hydrod_messages_acked_total") == acked_before, \
            "hydrod acknowledged messages it had not committed"
        return time.monotonic() - cut_at >= 10

    # The outage lasts ~10 s; memory, rows and acknowledgements are sampled throughout.
    wait_until(watch_the_outage, 20, "the end of a 10 s outage", interval=0.2)
    assert daemon.running
    assert peak_kib < 200 * 1024, f"VmRSS {peak_kib} KiB during the outage"

    proxy.restore()
    recovered_at = time.monotonic()
    daemon.wait_for("db_recovered", since=mark, timeout=20, actor="db_writer")
    print(f"db_recovered {time.monotonic() - recovered_at:.2f}s after restore")
    wait_until(all_stored(database, 5000), 30, "every sample stored after the outage")
    wait_until(lambda: daemon.http("GET", "/healthz")[0] == 200, 10, "healthz ok again")
    assert_exactly_stored(database, 5000)
