"""Faults made to happen for real: kill -9 of hydrod, the database link cut,
the broker restarted, the broker link cut. After each, every sample published
is stored, and at a clean stop every message hydrod received is accounted for."""

from __future__ import annotations

import time


from harness import (BackgroundPublish, accounts_at_stop, metric_value, publish, query, register_node,
                     vmrss_kib, wait_until)

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


def assert_all_stored_and_accounted(dsn: str, expected: int, daemon) -> None:
    """`expected` samples stored, none refused; and at a clean stop, every message the
    daemon received (redeliveries included) was committed or rejected, none pending."""
    assert stored(dsn) == expected
    assert query(dsn, "SELECT reason, count(*) FROM dead_letters GROUP BY reason") == []
    assert daemon.terminate() == 0
    accounts = accounts_at_stop(daemon)
    assert accounts["received"] >= expected, accounts


def test_kill_9_in_the_middle_of_20000_samples_loses_none(
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
    assert query(database, "SELECT count(*) FROM telemetry_samples WHERE channel = 'ph'") == [(total,)]
    assert query(database, "SELECT count(*) FROM dead_letters") == [(0,)]
    # The redelivered samples the first daemon had committed are received again, and settled.
    assert second.terminate() == 0
    accounts = accounts_at_stop(second)
    assert accounts["received"] >= total - at_kill, accounts


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

    # Every committed message acknowledged (the hello and 1000 samples) before the cut:
    # from then on the count must not move until the database is back.
    acked_before = wait_until(lambda: metric_value(metrics(), "hydrod_messages_acked_total") == 1001 and 1001,
                              10, "acknowledgements of what was committed")
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
    assert_all_stored_and_accounted(database, 5000, daemon)


def test_a_broker_restart_while_samples_flow_loses_nothing(make_daemon, broker, database):
    # A small receive window keeps a backlog in the broker, so the restart
    # finds messages both in flight to hydrod and queued for its session.
    daemon = make_daemon(mqtt={"receive_maximum": 10}, telemetry={"batch_size": 10})
    daemon.wait_ready()
    register_node(broker.port, database, PH_HW)
    mark = daemon.mark()
    publish(broker.port, samples(5000))
    broker.stop()
    daemon.wait_for("mqtt_disconnected", since=mark, timeout=10)
    during = stored(database)
    print(f"stored while the broker was down: {during} of 5000")
    assert during < 5000, "everything was stored before the broker stopped: nothing was in flow"

    down = daemon.mark()
    broker.restart()
    connected = daemon.wait_for("mqtt_connected", since=down, timeout=15)
    assert connected["session_present"] is True, "the broker should have kept hydrod's session"
    daemon.wait_for("mqtt_subscribed", since=down, timeout=10)
    publish(broker.port, samples(1000, start=5000))

    wait_until(all_stored(database, 6000), 30, "every sample from before and after the restart")
    assert_all_stored_and_accounted(database, 6000, daemon)


def test_a_cut_broker_link_reconnects_resubscribes_and_stores_what_was_sent_during_the_cut(
        make_daemon, make_proxy, broker, database):
    proxy = make_proxy(broker.port)
    daemon = make_daemon(mqtt={"port": proxy.port})
    daemon.wait_ready()
    register_node(broker.port, database, PH_HW)
    publish(broker.port, samples(2000))
    wait_until(all_stored(database, 2000), 20, "samples before the cut")

    mark = daemon.mark()
    proxy.cut()
    daemon.wait_for("mqtt_disconnected", since=mark, timeout=10)
    # Straight to the broker, which queues them in hydrod's persistent session.
    publish(broker.port, samples(3000, start=2000))
    assert stored(database) == 2000

    cut_over = daemon.mark()
    restored_at = time.monotonic()
    proxy.restore()
    connected = daemon.wait_for("mqtt_connected", since=cut_over, timeout=10)
    reconnect_s = time.monotonic() - restored_at
    assert reconnect_s < 5, f"reconnected {reconnect_s:.1f} s after the link came back"
    assert connected["session_present"] is True
    daemon.wait_for("mqtt_subscribed", since=cut_over, timeout=10)
    assert len(daemon.events("mqtt_subscribed")) == 2

    wait_until(all_stored(database, 5000), 30, "the samples sent during the cut")
    assert_all_stored_and_accounted(database, 5000, daemon)


def test_the_pending_gauge_counts_messages_held_while_the_database_is_away(
        make_daemon, make_proxy, broker, database, pg_server):
    proxy = make_proxy(pg_server.port, pg_server.host)
    daemon = make_daemon(database={
        "dsn": database.replace(f"{pg_server.host}:{pg_server.port}", f"127.0.0.1:{proxy.port}")})
    daemon.wait_ready()
    register_node(broker.port, database, PH_HW)
    mark = daemon.mark()
    proxy.cut()
    publish(broker.port, samples(500))
    daemon.wait_for("db_unavailable", since=mark, timeout=10, actor="db_writer")

    def pending() -> float | None:
        return metric_value(daemon.http("GET", "/metrics")[1], "hydrod_messages_pending")

    try:
        wait_until(lambda: pending() == 500, 3, "500 messages pending")
    except AssertionError:
        raise AssertionError(f"hydrod_messages_pending is {pending()} with 500 messages held") from None
    finally:
        proxy.restore()
    wait_until(all_stored(database, 500), 20, "the held samples stored")
    wait_until(lambda: pending() == 0, 5, "nothing pending once stored")


def test_a_reconnect_does_not_replay_an_old_retained_last_will_over_a_live_node(
        make_daemon, make_proxy, broker, database):
    proxy = make_proxy(broker.port)
    daemon = make_daemon(mqtt={"port": proxy.port})
    daemon.wait_ready()
    uid = register_node(broker.port, database, PH_HW)
    status_of = lambda: query(database, "SELECT status FROM nodes WHERE uid = %s", (uid,))[0][0]  # noqa: E731
    publish(broker.port, [(f"hydro/gh-1/zn-1/{uid}/lwt", "offline", True)])  # retained, as a will is
    wait_until(lambda: status_of() == "offline", what="offline by the will")
    publish(broker.port, [(f"hydro/gh-1/zn-1/{uid}/heartbeat", {"uptime": 5, "free_heap": 1, "rssi": -50})])
    wait_until(lambda: status_of() == "online", what="online by the heartbeat")

    mark = daemon.mark()
    proxy.cut()
    daemon.wait_for("mqtt_disconnected", since=mark, timeout=10)
    proxy.restore()
    daemon.wait_for("mqtt_subscribed", since=mark, timeout=15)
    # A sentinel after the resubscription: once it is stored, anything replayed would be too.
    publish(broker.port, [(TOPIC, {"metric_type": "PH", "value": 6.1, "ts": int(time.time())})])
    wait_until(all_stored(database, 1), what="the sentinel sample")
    assert status_of() == "online"
    assert query(database, "SELECT count(*) FROM node_events WHERE kind = 'lwt'")[0][0] == 1


def test_a_broker_that_is_down_at_start_up_is_waited_for_and_then_used(make_daemon, broker, database):
    broker.stop()
    daemon = make_daemon()
    daemon.wait_for("mqtt_connect_failed", timeout=15)
    daemon.wait_for("daemon_started")  # the rest of hydrod is up meanwhile
    status, body = daemon.http("GET", "/healthz")
    assert status == 503 and body["failing"] == ["mqtt"]
    broker.restart()
    daemon.wait_ready(timeout=20)
    uid = register_node(broker.port, database, PH_HW)
    publish(broker.port, samples(100))
    wait_until(all_stored(database, 100), 15, "100 samples")
    assert uid == PH_UID
    assert_all_stored_and_accounted(database, 100, daemon)
