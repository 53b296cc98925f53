"""MqttIo: its plain classes driven by hand (the ledger, the hand-over from paho's
thread, the router and its barrier, the link's bookkeeping), and the actor against a
real broker. More of the link is exercised in test_faults.py, test_node_registry.py
and test_supervisor.py (restarts)."""

import threading
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import structlog

from harness import metric_value, publish, query, wait_until
from hydrod import logs, settings
from hydrod.actors.address import Address
from hydrod.actors.messages import Deliver
from hydrod.actors.mqtt_io import Close, MqttIo, StopIntake
from hydrod.actors.supervised import Context
from hydrod.core.arrivals import Arrivals, Inbound
from hydrod.core.ledger import Ledger
from hydrod.core.link import Connect, Disconnected, Link
from hydrod.core.router import Router
from hydrod.metrics import Metrics
from test_supervisor import HELLO, UID, LogLines, in_process  # noqa: F401 (LogLines, in_process: fixtures)

log = structlog.get_logger("hydrod", actor="test")


# --- the ledger ----------------------------------------------------------------------


def test_acknowledgements_go_out_in_arrival_order_whatever_order_commits_come_in():
    ledger = Ledger(start=100)
    seqs = [ledger.admit(mid, 1, epoch=0) for mid in (11, 12, 13, 14)]
    assert seqs == [100, 101, 102, 103]
    assert ledger.settle([102, 103], epoch=0) == []  # 100 and 101 are not committed yet
    assert ledger.settle([101], epoch=0) == []
    assert ledger.settle([100], epoch=0) == [(11, 1), (12, 1), (13, 1), (14, 1)]
    assert len(ledger) == 0


def test_qos_0_messages_hold_their_place_but_are_never_acknowledged():
    ledger = Ledger(start=0)
    ledger.admit(1, 1, 0)
    ledger.admit(0, 0, 0)
    ledger.admit(3, 1, 0)
    assert ledger.settle([0, 1, 2], epoch=0) == [(1, 1), (3, 1)]


def test_messages_from_an_earlier_connection_are_not_acknowledged_on_the_new_one():
    ledger = Ledger(start=0)
    old = ledger.admit(7, 1, epoch=0)
    new = ledger.admit(7, 1, epoch=1)  # the broker redelivered it, same packet id
    assert ledger.settle([old, new], epoch=1) == [(7, 1)]


def test_settlements_meant_for_a_dead_incarnation_are_ignored():
    dead = Ledger(start=0)
    stale = [dead.admit(mid, 1, 0) for mid in range(5)]
    fresh = Ledger(start=1_000_000)
    first = fresh.admit(1, 1, 0)
    assert fresh.settle(stale, epoch=0) == []
    assert len(fresh) == 1
    assert fresh.settle([first], epoch=0) == [(1, 1)]


# --- the hand-over from paho's thread ----------------------------------------------------


def message(i):
    return SimpleNamespace(topic=f"t/{i}", payload=b"x", mid=i, qos=1, dup=False)


def test_arrivals_wake_the_actor_once_per_burst():
    wakes = []
    arrivals = Arrivals(wake=lambda: wakes.append(1))
    for i in range(3):
        arrivals.on_message(None, None, message(i))
    assert len(wakes) == 1
    assert [m.mid for m in arrivals.take()] == [0, 1, 2]
    arrivals.on_message(None, None, message(3))
    assert len(wakes) == 2


def test_no_arrival_is_ever_left_without_a_wake_up_under_a_racing_consumer():
    """paho's thread produces while the actor consumes; each wake-up makes the actor take
    everything. Every message must be taken, with no wake-up missing at the end."""
    wake = threading.Semaphore(0)
    arrivals = Arrivals(wake=wake.release)
    total, taken = 20_000, []

    def consumer():
        while len(taken) < total:
            if not wake.acquire(timeout=5):
                return  # a lost wake-up: the assertion below reports it
            taken.extend(m.mid for m in arrivals.take())

    thread = threading.Thread(target=consumer)
    thread.start()
    for i in range(total):
        arrivals.on_message(None, None, message(i))
    thread.join(30)
    assert taken == list(range(total))


# --- the router ---------------------------------------------------------------------------


class FakeLink:
    """What the router needs of the link: acknowledgements and publishes, recorded."""

    def __init__(self):
        self.epoch, self.acked, self.published = 0, [], []

    def ack(self, due):
        self.acked.extend(mid for mid, _qos in due)

    def publish(self, topic, payload):
        self.published.append(topic)


def make_router(batch_size=100, max_pending=100):
    sent = {"registry": [], "history": []}
    link = FakeLink()
    router = Router(registry=sent["registry"].extend, history=sent["history"].extend, link=link,
                    metrics=Metrics(), log=log, batch_size=batch_size, max_pending=max_pending, start=1)
    return router, link, sent


def inbound(topic, mid, payload=b"{}", qos=1):
    return Inbound(topic, payload, mid, qos, 1_764_000_000.0, False)


def telemetry(node, mid):
    return inbound(f"hydro/gh-1/zn-1/{node}/ph_sensor/telemetry", mid)


def test_a_time_request_is_answered_and_acknowledged_at_once():
    router, link, sent = make_router()
    router.receive(inbound("hydro/time/request", 5, b'{"message_type":"time_request"}'))
    assert link.published == ["hydro/time/response"]
    assert link.acked == [5] and len(router) == 0
    assert sent == {"registry": [], "history": []}


def test_history_waits_behind_registry_work_and_goes_once_it_is_settled():
    router, link, sent = make_router()
    router.receive(inbound("hydro/node_hello", 1, b'{"hardware_id":"esp32-a"}'))
    router.receive(telemetry("esp32-a", 2))
    router.flush()
    [hello] = sent["registry"]
    assert sent["history"] == []  # held: the node may not exist yet
    router.settle((hello.seq,))
    router.flush()
    assert [r.mid for r in sent["history"]] == [2]
    assert link.acked == [1]  # the sample is not committed yet
    router.settle((sent["history"][0].seq,))
    assert link.acked == [1, 2]


def test_a_nodes_history_waits_only_for_its_own_registry_work():
    router, link, sent = make_router()
    router.receive(inbound("hydro/node_hello", 1, b'{"hardware_id":"esp32-a"}'))  # names A in its payload
    router.receive(inbound("hydro/gh-temp/zn-temp/esp32-a/ph_sensor/telemetry", 2))
    router.receive(inbound("hydro/gh-temp/zn-temp/esp32-b/ph_sensor/telemetry", 3))
    router.receive(telemetry("nd-ph-b", 4))
    router.flush()
    [hello] = sent["registry"]
    assert [r.mid for r in sent["history"]] == [3, 4]  # B's, at once; A's waits for A's hello
    router.settle([r.seq for r in sent["history"]])
    assert link.acked == []  # acknowledged in arrival order: behind A's hello and sample
    router.settle((hello.seq,))
    router.flush()
    assert [r.mid for r in sent["history"]] == [3, 4, 2]
    assert link.acked == [1]
    router.settle((sent["history"][-1].seq,))
    assert link.acked == [1, 2, 3, 4]


def test_a_config_report_holds_back_history_under_the_uid_it_names():
    router, _, sent = make_router()
    router.receive(inbound("hydro/gh-1/zn-1/esp32-a/config_report", 1, b'{"node_id":"nd-ph-a","version":1}'))
    router.receive(telemetry("nd-ph-a", 2))
    router.receive(telemetry("esp32-a", 3))
    router.receive(telemetry("nd-ph-b", 4))
    router.flush()
    assert [r.mid for r in sent["history"]] == [4]
    router.settle((sent["registry"][0].seq,))
    router.flush()
    assert [r.mid for r in sent["history"]] == [4, 2, 3]


def test_history_waits_for_its_nodes_earlier_registry_work_only_not_later():
    router, _, sent = make_router()
    hello = b'{"hardware_id":"esp32-a"}'
    router.receive(inbound("hydro/node_hello", 1, hello))
    router.receive(telemetry("esp32-a", 2))
    router.receive(inbound("hydro/node_hello", 3, hello))
    router.receive(telemetry("esp32-a", 4))
    router.flush()
    first, second = sent["registry"]
    router.settle((first.seq,))
    router.flush()
    assert [r.mid for r in sent["history"]] == [2]
    router.settle((second.seq,))
    router.flush()
    assert [r.mid for r in sent["history"]] == [2, 4]


def test_registry_work_that_names_no_node_holds_nothing_back():
    router, _, sent = make_router()
    router.receive(inbound("hydro/node_hello", 1, b"not json"))  # the registry dead-letters it
    router.receive(inbound("hydro/gh-1/zn-1/x/y/z/telemetry", 2))  # a rejected topic names no node
    router.receive(telemetry("esp32-a", 3))
    router.flush()
    assert [r.mid for r in sent["history"]] == [2, 3]


def test_a_qos_0_message_is_refused_when_too_many_are_pending():
    router, link, sent = make_router(max_pending=2)
    for mid in (1, 2):
        router.receive(telemetry("nd-1", mid))
    router.receive(telemetry("nd-1", 0)._replace(qos=0))
    router.flush()
    assert [r.mid for r in sent["history"]] == [1, 2]
    assert router.metrics.rejected.labels("overload")._value.get() == 1


# --- the link's bookkeeping --------------------------------------------------------------------


def make_link(metrics=None):
    """A Link that is not started: its logic, driven by hand."""
    told = []
    link = Link(settings.MqttSettings(), me=SimpleNamespace(tell=told.append), on_change=lambda up: None,
                on_subscribed=lambda: None, pending=lambda: 0, metrics=metrics or Metrics(), log=log)
    return link, told


class _FailingAcks:
    """A paho client whose link drops after `ok` acknowledgements."""

    def __init__(self, ok):
        self.ok, self.acked = ok, []

    def ack(self, mid, qos):
        if len(self.acked) >= self.ok:
            return mqtt.MQTT_ERR_NO_CONN
        self.acked.append(mid)
        return mqtt.MQTT_ERR_SUCCESS


def test_the_acked_counter_counts_only_acknowledgements_that_went_out():
    metrics = Metrics()
    link, _ = make_link(metrics)
    link.client, link.connected = _FailingAcks(ok=2), True
    link.ack([(mid, 1) for mid in (1, 2, 3, 4)])
    assert link.client.acked == [1, 2]
    assert metrics.acked._value.get() == 2


class _UnansweredLink:
    """A paho client whose CONNECT is out and not answered yet (a slow TLS handshake)."""

    def __init__(self):
        self.connects = 0

    def connect(self, *_args, **_kwargs):
        self.connects += 1
        return mqtt.MQTT_ERR_SUCCESS

    def loop_start(self):
        return mqtt.MQTT_ERR_SUCCESS


def test_a_second_connect_never_starts_while_one_is_in_progress():
    link, _ = make_link()
    link.client = client = _UnansweredLink()
    link.on_event(Connect(client))
    link.on_event(Connect(client))  # a retry timer firing meanwhile
    assert client.connects == 1


def test_a_publish_asked_while_the_link_is_down_is_told_back_as_never_sent():
    link, _ = make_link()
    told = []
    watcher = SimpleNamespace(tell=told.append)
    link.publish("hydro/gh-1/zn-1/n/p/command", b"{}", on_acked=(watcher, "acked"), on_failed=(watcher, "not sent"))
    assert told == ["not sent"] and link._publish_waiters == {}


def test_a_command_response_goes_to_the_commands_actor_and_to_the_history():
    commands = []
    router, _, sent = make_router()
    router.commands = commands.extend
    router.receive(inbound("hydro/gh-1/zn-1/nd-1/pump/command_response", 7, b'{"cmd_id":"c"}'))
    router.flush()
    assert [item.mid for item in commands] == [7]
    assert [item.mid for item in sent["history"]] == [7]


def make_io(metrics=None):
    """An MqttIo that is not started: the shell's dispatch, driven by hand."""
    return MqttIo(Context("mqtt_io", Address("mqtt_io"), Address("supervisor")), settings=settings.MqttSettings(),
                  registry=Address("node_registry"), history=Address("db_writer"), link_watchers=(),
                  metrics=metrics or Metrics(), batch_size=10, max_pending=100)


def test_what_an_earlier_link_says_is_ignored():
    io = make_io()
    io.link.client = client = _UnansweredLink()
    io.handle(Connect(client))
    gone = _UnansweredLink()  # a crashed incarnation's client, still talking
    io.handle(Disconnected(gone, "Normal disconnection"))
    io.handle(Connect(gone))
    assert io.link.connecting and client.connects == 1 and gone.connects == 0


# --- against a real broker ---------------------------------------------------------------------


def test_a_qos_0_message_that_arrives_while_hydrod_stops_is_counted_and_logged(in_process, broker, database):
    daemon, lines = in_process()
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    daemon.specs["mqtt_io"].address.ask(StopIntake(), timeout=5)
    topic = f"hydro/gh-1/zn-1/{UID}/ph_sensor/telemetry"
    publish(broker.port, [(topic, {"metric_type": "PH", "value": 6.0, "ts": 1_764_000_000 + i})
                          for i in range(3)], qos=0)
    publish(broker.port, [(topic, {"metric_type": "PH", "value": 6.0, "ts": 1_764_000_100})], qos=1)
    wait_until(lambda: len(lines.events("message_rejected", reason="stopping")) == 3, what="3 rejections")
    wait_until(lambda: daemon.metrics.deferred._value.get() == 1, what="the QoS 1 message deferred")
    assert lines.events("message_rejected", reason="stopping")[0]["topic"] == topic
    assert metric_value(daemon.metrics.exposition().decode(), "hydrod_messages_rejected_total",
                        reason="stopping") == 3


def test_a_nodes_telemetry_is_written_while_another_nodes_registry_work_is_held_open(
        in_process, broker, database):
    a, b = "esp32-00000000000a", "esp32-00000000000b"
    entered, release = threading.Event(), threading.Event()

    def slow_registry(actor, message):
        # A's repeat hello keeps the registry busy until the test lets it go.
        if actor == "node_registry" and isinstance(message, Deliver) and any(
                item.node == a for item in message.items):
            entered.set()
            release.wait(30)

    daemon, _ = in_process(fault_hook=slow_registry)
    try:
        publish(broker.port, [("hydro/node_hello", dict(HELLO, hardware_id=b))])
        wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node B")
        temp = "hydro/gh-temp/zn-temp/{}/ph_sensor/telemetry"
        sample = {"metric_type": "PH", "value": 6.0, "ts": 1_764_000_000}
        publish(broker.port, [(f"hydro/gh-temp/zn-temp/{a}/node_hello", dict(HELLO, hardware_id=a)),
                              (temp.format(a), sample), (temp.format(b), sample)])
        entered.wait(15)
        rows = lambda: query(database, "SELECT n.hardware_id FROM telemetry_samples s"  # noqa: E731
                                       " JOIN nodes n ON n.id = s.node_id")
        wait_until(lambda: rows() == [(b,)], what="B's sample, while A's hello is still open")
        assert entered.is_set() and not release.is_set()
        assert rows() == [(b,)]  # A's sample still waits for A's hello
    finally:
        release.set()
    wait_until(lambda: sorted(rows()) == [(a,), (b,)], what="A's sample, once its hello is committed")
    assert not query(database, "SELECT reason FROM dead_letters")  # A's sample never met an unknown node


def start_mqtt_io(port, client_id, metrics=None):
    """MqttIo on its own, linked to the real broker; its peers are bare addresses."""
    address = Address("mqtt_io")
    ref = MqttIo.start(Context("mqtt_io", address, Address("supervisor")),
                       settings=settings.MqttSettings(host="127.0.0.1", port=port, client_id=client_id),
                       registry=Address("node_registry"), history=Address("db_writer"), link_watchers=(),
                       metrics=metrics or Metrics(), batch_size=10, max_pending=100)
    address.attach(ref)
    return address, ref


def test_closing_the_link_never_logs_at_error_level(broker):
    # paho's network thread could run once more on the socket it had just closed for
    # hydrod's DISCONNECT and log `Client is not connected` as an error (~1 close in 10).
    lines = LogLines()
    logs.configure("info", "json", stream=lines)
    for i in range(40):
        address, ref = start_mqtt_io(broker.port, f"hydrod-close-{i}")
        wait_until(lambda: len(lines.events("mqtt_subscribed")) == i + 1, what=f"link {i} up")
        address.ask(Close(), timeout=5)
        ref.stop(timeout=5)
    assert len(lines.events("mqtt_connected")) == 40
    assert [r for r in list(lines.records) if r["level"] in ("error", "critical")] == []
