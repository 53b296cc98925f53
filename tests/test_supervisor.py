"""The supervisor: restarts that lose nothing, poison messages, the restart budget, SIGTERM."""

import io
import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pykka
import pytest

from harness import (accounts_at_stop, fast_config, free_port, merge_sections, publish, query, to_toml,
                     wait_until)
from hydrod import logs, settings
from hydrod.actors.address import Asked
from hydrod.actors.messages import Deliver, Drained, Flush, Health
from hydrod.supervisor import Daemon

HELLO = {"message_type": "node_hello", "hardware_id": "esp32-a1b2c3d4e5f6", "node_type": "ph",
         "fw_version": "1.0.0", "capabilities": ["ph"]}
UID = "nd-ph-a1b2c3d4e5f6"


class LogLines(io.TextIOBase):
    """A stream for logs.configure that keeps each JSON line, parsed."""

    def __init__(self):
        self.records, self._cond = [], threading.Condition()

    def write(self, text):
        for line in text.splitlines():
            if line.strip():
                with self._cond:
                    self.records.append(json.loads(line))
                    self._cond.notify_all()
        return len(text)

    def events(self, name, **fields):
        with self._cond:
            return [r for r in self.records if r.get("event") == name
                    and all(r.get(k) == v for k, v in fields.items())]

    def wait_for(self, name, timeout=15, **fields):
        return wait_until(lambda: (self.events(name, **fields) or [None])[0], timeout=timeout,
                          what=f"log event {name} {fields}")


@pytest.fixture
def in_process(broker, database):
    """run(fault_hook, notifier, **sections) -> (Daemon, LogLines): hydrod inside the test process."""
    started = []

    def run(fault_hook=None, notifier=None, **sections):
        lines = LogLines()
        logs.configure("info", "json", stream=lines)
        config = merge_sections(fast_config(broker.port, database, free_port()), sections)
        daemon = Daemon(settings.from_dict(config, environ={}), fault_hook=fault_hook, notifier=notifier)
        started.append(daemon)
        daemon.start()
        lines.wait_for("mqtt_subscribed")
        return daemon, lines

    yield run
    for daemon in started:
        daemon.shutdown()


def samples(n, uid=UID, channel="ph_sensor", start=1_764_000_000):
    return [(f"hydro/gh-1/zn-1/{uid}/{channel}/telemetry",
             {"metric_type": "PH", "value": 5.5 + i / 1000, "ts": start + i}) for i in range(n)]


def register_then_send_while_armed(broker, database, armed, published, count):
    """Register the node, arm the fault, send `count` samples, then let the fault fire:
    the failing actor holds its first batch until all were sent, so more queue behind it."""
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    armed.set()
    publish(broker.port, samples(count))
    published.set()


def test_a_failed_actor_is_restarted_and_everything_queued_for_it_is_processed(in_process, broker, database):
    published, armed = threading.Event(), threading.Event()

    def fail_once(actor, message):
        # The writer dies on a batch while more batches queue up behind it.
        if actor == "db_writer" and isinstance(message, Deliver) and armed.is_set():
            armed.clear()
            published.wait(20)
            raise RuntimeError("injected fault")

    daemon, lines = in_process(fault_hook=fail_once)
    register_then_send_while_armed(broker, database, armed, published, 500)
    failed = lines.wait_for("actor_failed", failed_actor="db_writer")
    restarted = lines.wait_for("actor_restarted", restarted_actor="db_writer")
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 500,
               what="500 samples")
    assert "injected fault" in failed["error"]
    # The failed batch, and whatever waited in the dead actor's mailbox, went to the replacement.
    assert restarted["replayed"] >= failed["queued"] + 1
    assert daemon.metrics.restarts.labels("db_writer")._value.get() == 1
    # Every message was acknowledged once committed: nothing is left pending in the ledger.
    wait_until(lambda: daemon.metrics.acked._value.get() >= 501, what="all acknowledged")


def test_an_ask_queued_for_an_actor_that_fails_is_answered_by_its_replacement(in_process, broker, database):
    reply = pykka.ThreadingFuture()

    def fail_once(actor, message):
        # An ask lands behind the batch the writer then dies on.
        if actor == "db_writer" and isinstance(message, Deliver) and not armed.is_set():
            armed.set()
            daemon.specs["db_writer"].address.tell(Asked(Flush(), reply))
            raise RuntimeError("injected fault")

    armed = threading.Event()
    daemon, lines = in_process(fault_hook=fail_once)
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    publish(broker.port, samples(3))
    failed = lines.wait_for("actor_failed", failed_actor="db_writer")
    assert failed["queued"] >= 1 and "injected fault" in failed["exception"]
    assert isinstance(reply.get(timeout=20), Drained)  # answered by the replacement, not dropped
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 3, what="3 samples")
    assert daemon.metrics.restarts.labels("db_writer")._value.get() == 1


def test_a_message_that_keeps_crashing_its_actor_is_dead_lettered(in_process, broker, database):
    def poison(actor, message):
        if actor == "node_registry" and isinstance(message, Deliver) and any(
                b"poison" in item.payload for item in message.items):
            raise ValueError("cannot digest this")

    daemon, lines = in_process(fault_hook=poison)
    poisoned = dict(HELLO, hardware_id="esp32-poison")
    good = [dict(HELLO, hardware_id=f"esp32-00000000000{i}") for i in range(1, 4)]
    publish(broker.port, [("hydro/node_hello", good[0]), ("hydro/node_hello", poisoned),
                          ("hydro/node_hello", good[1]), ("hydro/node_hello", good[2])])
    lines.wait_for("message_rejected", reason="handler_crash")
    wait_until(lambda: query(database, "SELECT reason, payload FROM dead_letters"), what="dead letter")
    [(reason, payload)] = query(database, "SELECT reason, payload FROM dead_letters")
    assert reason == "handler_crash" and b"esp32-poison" in payload
    wait_until(lambda: len(query(database, "SELECT 1 FROM nodes")) == 3, what="the good nodes")
    assert sorted(r[0] for r in query(database, "SELECT hardware_id FROM nodes")) == [
        g["hardware_id"] for g in good]
    assert not lines.events("supervisor_gave_up")
    # The daemon goes on: a later hello registers.
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: len(query(database, "SELECT 1 FROM nodes")) == 4, what="a later node")


def say_hello_until_it_exits(broker, script_and_args, timeout, what):
    """Run `python -c SCRIPT ARGS...`, giving its registry new hellos to work on
    until it exits (the first ones may come before it subscribes, and are then
    not for it). Returns (returncode, stdout, stderr, the JSON log records)."""
    daemon = subprocess.Popen([sys.executable, "-c", *script_and_args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent = iter(range(10_000))

        def another_hello_or_exited():
            publish(broker.port, [("hydro/node_hello", dict(HELLO, hardware_id=f"esp32-{next(sent):012x}"))])
            return daemon.poll() is not None

        wait_until(another_hello_or_exited, timeout=timeout, what=what)
        out, err = daemon.communicate(timeout=30)
    finally:
        daemon.kill()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return daemon.returncode, out, err, records


FAULTY = textwrap.dedent("""
    import sys
    from hydrod import cli

    def always(actor, message):
        if actor == "node_registry" and type(message).__name__ == "Deliver":
            raise RuntimeError("registry always fails")

    sys.exit(cli.main(["--config", sys.argv[1], "run"], fault_hook=always))
""")


def test_an_exhausted_restart_budget_stops_everything_with_a_non_zero_exit(broker, database, tmp_path):
    config = merge_sections(fast_config(broker.port, database, free_port()),
                            {"supervisor": {"max_restarts": 2, "max_message_failures": 100}})
    (tmp_path / "config.toml").write_text(to_toml(config))
    returncode, out, err, records = say_hello_until_it_exits(
        broker, [FAULTY, str(tmp_path / "config.toml")], timeout=30, what="hydrod giving up")
    assert returncode == 5
    events = [r["event"] for r in records]
    assert "supervisor_gave_up" in events
    assert events.count("actor_restarted") == 2
    assert events[-2:] == ["daemon_stopped", "daemon_failed"]
    assert "node_registry failed 3 times" in err


def test_sigterm_drains_what_was_received_and_exits_0(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    publish(broker.port, samples(3000))
    assert daemon.terminate(timeout=20) == 0
    stopped = daemon.events("daemon_stopped")
    assert stopped and stopped[0]["failure"] is None
    stored = query(database, "SELECT count(*) FROM telemetry_samples")[0][0]
    # Everything it took in was committed before it exited: the hello and `stored` samples.
    accounts = accounts_at_stop(daemon)
    assert (accounts["committed"], accounts["duplicate"], accounts["rejected"]) == (1 + stored, 0, 0), accounts
    # What was not received yet stays in the broker for the next start: nothing lost.
    again = make_daemon(mqtt={"client_id": daemon.config["mqtt"]["client_id"]})
    again.wait_ready()
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 3000,
               what="3000 samples")
    publish(broker.port, samples(500, start=1_764_100_000))  # traffic up to the second stop, too
    assert again.terminate() == 0
    accounts_at_stop(again)
    # Log-based monitoring alerts on errors: a clean stop has none.
    assert [r for d in (daemon, again) for r in d.records() if r["level"] in ("error", "critical")] == []


def test_sigint_drains_what_was_received_and_exits_0_as_sigterm_does(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    publish(broker.port, samples(1000))
    assert daemon.interrupt(timeout=20) == 0
    assert daemon.events("daemon_stopping")[0]["reason"] == "SIGINT"
    assert daemon.events("daemon_stopped")[-1]["failure"] is None
    stored = query(database, "SELECT count(*) FROM telemetry_samples")[0][0]
    accounts = accounts_at_stop(daemon)
    assert (accounts["committed"], accounts["duplicate"], accounts["rejected"]) == (1 + stored, 0, 0), accounts


def test_a_replacement_that_fails_to_start_is_tried_again_with_everything_it_was_owed(
        in_process, broker, database):
    published, armed, start_fails = threading.Event(), threading.Event(), threading.Event()

    def fault(actor, message):
        if actor != "db_writer":
            return
        if isinstance(message, Deliver) and armed.is_set():
            armed.clear()
            start_fails.set()
            published.wait(20)
            raise RuntimeError("injected fault")
        if isinstance(message, Health) and start_fails.is_set():
            start_fails.clear()  # the first replacement does not answer its start-up ping
            raise RuntimeError("replacement broken")

    daemon, lines = in_process(fault_hook=fault)
    register_then_send_while_armed(broker, database, armed, published, 300)
    lines.wait_for("actor_restarted", restarted_actor="db_writer")
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 300,
               what="300 samples")
    failures = lines.events("actor_failed", failed_actor="db_writer")
    assert len(failures) == 2 and "did not start" in failures[1]["error"]
    assert "replacement broken" in failures[1]["exception"]  # its traceback, as it had none logged
    wait_until(lambda: daemon.metrics.acked._value.get() >= 301, what="all acknowledged")


def test_a_restarted_config_publisher_still_publishes_with_the_broker_up(in_process, broker, database):
    crashed = threading.Event()

    def crash_once(actor, message):
        if actor == "config_publisher" and type(message).__name__ == "_Expire" and not crashed.is_set():
            crashed.set()
            raise RuntimeError("injected fault")

    daemon, lines = in_process(fault_hook=crash_once, nodes={"config_ack_timeout_s": 2.0})
    lines.wait_for("actor_restarted", restarted_actor="config_publisher")
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    # The new incarnation has not seen the link come up: it asks, and answers `published`, not `queued`.
    status, body = _post(daemon, f"/api/nodes/{UID}/config", {"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert (status, body["status"]) == (202, "published")
    lines.wait_for("config_published", node_uid=UID, timeout=10)
    assert query(database, "SELECT status FROM node_configs") == [("published",)]


def test_a_crashed_http_api_is_restarted_and_serves_again_on_the_same_port(in_process):
    armed = threading.Event()

    def crash_once(actor, message):
        if actor == "http_api" and armed.is_set():
            armed.clear()
            raise RuntimeError("injected fault")

    daemon, lines = in_process(fault_hook=crash_once)
    http = daemon.settings.http
    url = f"http://{http.host}:{http.port}/api/nodes"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
    armed.set()
    daemon.specs["http_api"].address.tell(Health())
    failed = lines.wait_for("actor_failed", failed_actor="http_api")
    assert "injected fault" in failed["error"]
    lines.wait_for("actor_restarted", restarted_actor="http_api")
    assert len(lines.events("http_listening", port=http.port)) == 2
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200 and json.loads(answer.read()) == []
    assert daemon.metrics.restarts.labels("http_api")._value.get() == 1


class _FailingLoopEntry:
    """A socket map entry that fails waitress's event loop itself (not a connection's handler)."""

    def readable(self):
        raise RuntimeError("injected loop fault")


def test_an_http_server_whose_event_loop_fails_is_restarted_and_serves_again(in_process):
    daemon, lines = in_process()
    http = daemon.settings.http
    url = f"http://{http.host}:{http.port}/api/nodes"
    server = daemon.specs["http_api"].address.ref.proxy().server.get(timeout=5)
    server.sockets[-1] = _FailingLoopEntry()
    failed = lines.wait_for("actor_failed", failed_actor="http_api")
    assert "HTTP server stopped" in failed["error"] and "injected loop fault" in failed["error"]
    lines.wait_for("actor_restarted", restarted_actor="http_api")
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
    assert len(lines.events("actor_failed", failed_actor="http_api")) == 1


def test_healthz_stays_200_while_a_slow_writer_works_and_names_a_stuck_one(in_process, broker, database):
    slow, stuck, entered, release = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    def hook(actor, message):
        if actor == "db_writer" and isinstance(message, Deliver) and (slow.is_set() or stuck.is_set()):
            entered.set()
            # A batch that takes 3 s (a slow disk, a big batch), or one that never ends.
            release.wait(3.0 if slow.is_set() else 60)

    daemon, lines = in_process(fault_hook=hook, supervisor={"stall_after_s": 5.0})
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    try:
        slow.set()
        publish(broker.port, samples(1))
        wait_until(entered.is_set, what="the slow batch under way")
        started = time.monotonic()
        status, body = _get(daemon, "/healthz")
        assert status == 200, body
        assert "busy with Deliver" in body["checks"]["db_writer"]["detail"]
        assert time.monotonic() - started < 2.0, "healthz waited for the busy writer"
        wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 1, what="stored")
        slow.clear()
        entered.clear()
        stuck.set()
        publish(broker.port, samples(1, start=1_764_000_100))
        wait_until(entered.is_set, what="the stuck batch under way")
        assert _get(daemon, "/healthz")[0] == 200  # not yet: it may be a long batch
        status, body = wait_until(lambda: (r := _get(daemon, "/healthz"))[0] == 503 and r, 10,
                                  "healthz naming the stuck writer")
        assert body["failing"] == ["db_writer"] and "stalled" in body["checks"]["db_writer"]["detail"]
    finally:
        release.set()


def _get(daemon, path):
    http = daemon.settings.http
    try:
        with urllib.request.urlopen(f"http://{http.host}:{http.port}{path}", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post(daemon, path, body):
    http = daemon.settings.http
    request = urllib.request.Request(f"http://{http.host}:{http.port}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status, json.loads(answer.read())


def test_a_config_publish_that_keeps_crashing_mqtt_io_never_puts_the_node_secret_in_a_log_line(
        in_process, broker, database):
    secret = "5ec7e7" * 10 + "abcd"
    crashes = []

    def crash_on_config(actor, message):
        # Twice: the supervisor then drops the message and logs it (message_dropped).
        if actor == "mqtt_io" and type(message).__name__ == "Publish" and len(crashes) < 2:
            crashes.append(message)
            raise RuntimeError("injected fault")

    daemon, lines = in_process(fault_hook=crash_on_config)
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    # The secret first in the body, so a truncated repr of the payload would still hold it.
    status, _ = _post(daemon, f"/api/nodes/{UID}/config",
                      {"node_secret": secret, "channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert status == 202
    lines.wait_for("message_dropped", failed_actor="mqtt_io")
    lines.wait_for("actor_restarted", restarted_actor="mqtt_io")
    assert secret.encode() in crashes[0].payload  # the crashing message did hold it
    assert [r for r in list(lines.records) if secret in json.dumps(r)] == []


SUPERVISOR_BREAKS = textwrap.dedent("""
    import sys
    from hydrod import cli

    FAILURE = {"error": RuntimeError, "exit": SystemExit}[sys.argv[2]]

    def fault(actor, message):
        if actor == "node_registry" and type(message).__name__ == "Deliver":
            raise RuntimeError("registry fails")
        if actor == "supervisor" and type(message).__name__ == "ActorFailed":
            raise FAILURE("supervisor broken")  # in the middle of its restart logic

    sys.exit(cli.main(["--config", sys.argv[1], "run"], fault_hook=fault))
""")


@pytest.mark.parametrize("failure", ["error", "exit"])
def test_a_supervisor_that_fails_itself_is_logged_and_ends_hydrod_with_exit_5(broker, database, tmp_path, failure):
    # "exit": a BaseException, on which pykka stops every actor without asking anyone.
    (tmp_path / "config.toml").write_text(to_toml(fast_config(broker.port, database, free_port())))
    returncode, out, err, records = say_hello_until_it_exits(
        broker, [SUPERVISOR_BREAKS, str(tmp_path / "config.toml"), failure], timeout=20,
        what="hydrod exiting after its supervisor failed")
    assert returncode == 5, out[-3000:] + err
    [failed] = [r for r in records if r["event"] == "supervisor_failed"]
    assert failed["level"] == "critical"
    assert ("supervisor broken" if failure == "error" else "the supervisor actor stopped") in failed["error"]
    assert not [r for r in records if r["event"] == "actor_restarted"]
    assert [r["event"] for r in records][-2:] == ["daemon_stopped", "daemon_failed"]
    assert err.strip().count("\n") == 0 and "supervisor" in err


def test_a_failing_stats_line_is_logged_and_the_schedule_and_supervision_go_on(in_process, broker, database):
    crash_once = threading.Event()

    def fault(actor, message):
        if actor == "db_writer" and isinstance(message, Deliver) and crash_once.is_set():
            crash_once.clear()
            raise RuntimeError("injected fault")

    daemon, lines = in_process(fault_hook=fault)
    summary = daemon.metrics.summary
    broken = threading.Event()

    def summary_that_breaks_once():
        if not broken.is_set():
            broken.set()
            raise ValueError("stats broken")
        return summary()

    daemon.metrics.summary = summary_that_breaks_once
    failed = lines.wait_for("stats_failed")
    assert "stats broken" in failed["error"]
    after = len(lines.events("stats"))
    wait_until(lambda: len(lines.events("stats")) > after, what="a stats line after the failed one")
    # Still supervising: an actor that fails now is restarted.
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    crash_once.set()
    publish(broker.port, samples(10))
    lines.wait_for("actor_restarted", restarted_actor="db_writer")
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 10, what="10 samples")
    assert not daemon.stopping.is_set()


def test_a_crashed_mqtt_io_is_restarted_relinks_once_and_everything_is_stored_once(in_process, broker, database):
    published, armed = threading.Event(), threading.Event()

    def fail_once(actor, message):
        # MqttIo dies with messages in its hands, more in flight in paho, and more queued in the broker.
        if actor == "mqtt_io" and type(message).__name__ == "Arrived" and armed.is_set():
            armed.clear()
            published.wait(20)
            raise RuntimeError("injected fault")

    daemon, lines = in_process(fault_hook=fail_once)
    register_then_send_while_armed(broker, database, armed, published, 500)
    lines.wait_for("actor_restarted", restarted_actor="mqtt_io")
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 500,
               what="500 samples")
    wait_until(lambda: daemon.metrics.pending._value.get() == 0 and daemon.metrics.mqtt_connected._value.get() == 1,
               what="everything acknowledged, the link up")
    # Every message the link took in, before and after the restart, was committed, none refused.
    accounts = daemon.metrics.accounts()
    assert accounts["received"] == accounts["committed"] + accounts["duplicate"], accounts
    assert accounts["rejected"] == 0, accounts
    assert query(database, "SELECT count(*) FROM dead_letters") == [(0,)]
    # The link came back once, cleanly: the dead incarnation's late callbacks made no noise.
    assert len(lines.events("mqtt_connected")) == 2
    assert len(lines.events("mqtt_subscribed")) == 2
    assert lines.events("mqtt_connect_failed") == []
    assert lines.events("mqtt_connected")[1]["session_present"] is True
