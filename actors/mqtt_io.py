"""MqttIo: owns the paho client, the broker link and the acknowledgement ledger.

paho's callbacks run on paho's network thread; each only turns what it got
into a message for this actor. This actor decides everything else: when to
connect again (backoff with jitter), what to subscribe, where each received
message goes, and when the broker may forget it: a QoS 1 message is
acknowledged only once whatever it produced is committed, and always in
arrival order, as MQTT requires.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .. import protocol
from ..protocol import COMMAND_RESPONSE, CONFIG_REPORT, HELLO, REJECT, TIME_REQUEST, Routed
from ..settings import MqttSettings
from .inbound import Arrivals, Inbound, Ledger
from ..core.timers import Backoff, tell_later
from .address import Address
from .messages import Ask, Deliver, Drained, Health, HealthReport, LinkChanged, Ready
from .supervised import Context, SupervisedActor

# --- messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Arrived:
    """From paho's thread: PUBLISHes wait in the Arrivals queue."""


@dataclass(frozen=True)
class Settled:
    """From a consumer: these messages are committed (or dead-lettered)."""

    seqs: tuple[int, ...]


@dataclass(frozen=True)
class Publish:
    """Publish at QoS 1, never retained; on PUBACK tell `on_acked` = (address, message).

    The payload stays out of repr: a config holds the node's secret, and a
    message's repr is what a crash report logs."""

    topic: str
    payload: bytes = field(repr=False)
    on_acked: tuple[Address, Any] | None = None
    # Told when the publish surely did not go out (the link was down): safe to send again.
    on_failed: tuple[Address, Any] | None = None


@dataclass(frozen=True)
class WatchLink:
    """From a link watcher that (re)started: tell it LinkChanged with the link's state now."""

    watcher: Address


@dataclass(frozen=True)
class StopIntake(Ask[Drained]):
    """Ask (shutdown): take no new messages; they stay unacknowledged in the broker."""


@dataclass(frozen=True)
class Close(Ask[Drained]):
    """Ask (shutdown): send the acknowledgements due, then disconnect keeping the session."""


# What paho's callbacks and the reconnect timers send carry `link`: the paho
# client they are about. A crashed MqttIo's client and timers may still speak
# after its replacement took the address; what they say is not about the
# replacement's link, and it ignores them.


@dataclass(frozen=True)
class _Connect:
    link: mqtt.Client


@dataclass(frozen=True)
class _Connected:
    link: mqtt.Client
    reason: str
    failed: bool
    session_present: bool


@dataclass(frozen=True)
class _Disconnected:
    link: mqtt.Client
    reason: str


@dataclass(frozen=True)
class _Subscribed:
    link: mqtt.Client
    mid: int
    refused: tuple[str, ...]


@dataclass(frozen=True)
class _Unsubscribed:
    link: mqtt.Client
    mid: int
    refused: tuple[str, ...]


@dataclass(frozen=True)
class _PubAcked:
    link: mqtt.Client
    mid: int


_LINK_MESSAGES = (_Connect, _Connected, _Disconnected, _Subscribed, _Unsubscribed, _PubAcked)


def wanted_filters(shared_group: str) -> tuple[str, ...]:
    """The topic filters hydrod subscribes to: SPEC's, in the shared group if one is set."""
    return tuple(f"$share/{shared_group}/{f}" if shared_group else f for f in protocol.SUBSCRIPTIONS)


# --- paho's log ---------------------------------------------------------------------------


class _PahoLog(logging.LoggerAdapter):
    """paho's records, as they are, but for one that is no fault.

    After a DISCONNECT that hydrod asked for, paho's network thread closes the
    socket and may run once more before loop_stop() reaches it: it then logs
    `Client is not connected ... MQTT_CS_DISCONNECTED` as an error, in about one
    clean stop in three. The state it names says the close was ours, so that
    one record is logged at debug; any other is passed on unchanged."""

    def log(self, level, msg, *args, **kwargs):
        if (level >= logging.ERROR and isinstance(msg, str) and msg.startswith("Client is not connected")
                and msg.endswith("MQTT_CS_DISCONNECTED")):
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


# --- the actor ---------------------------------------------------------------------------


class MqttIo(SupervisedActor):
    def __init__(self, context: Context, *, settings: MqttSettings, registry: Address,
                 history: Address, link_watchers: tuple[Address, ...], metrics,
                 batch_size: int, max_pending: int, stale_filters: tuple[str, ...] = (),
                 commands: Address | None = None):
        super().__init__(context)
        self.commands = commands  # also told each command_response: it moves its command (SPEC §7)
        self.settings = settings
        self.filters = wanted_filters(settings.shared_group)
        # Filters subscribed once under this client id and no longer wanted (the
        # supervisor reads them from mqtt_subscriptions): the persistent session may
        # still hold them, and would deliver every message once more for each.
        self.stale_filters = tuple(f for f in stale_filters if f not in self.filters)
        self.metrics = metrics
        self.link_watchers = link_watchers
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.routes = {HELLO: registry, CONFIG_REPORT: registry}
        self.history = history
        self.ledger = Ledger(start=time.monotonic_ns())
        self.epoch = 0
        self.connected = False
        self.connecting = False  # a CONNECT is out, its answer not in: no second one starts
        self.refused: str | None = None  # the broker's reason, when its CONNACK refused us
        self.intake = True
        self.closing = False
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._batches: dict[Address, list[Routed]] = {}
        self._registry_open: dict[int, None] = {}  # seqs sent to the registry, not settled, in order
        self._blocked: list[Routed] = []  # history that arrived after them
        self._publish_waiters: dict[int, tuple[Address, Any]] = {}
        self._awaiting: set[int] = set()  # SUBSCRIBE / UNSUBSCRIBE mids not answered yet
        self._unsubscribed = 0
        self._received = {}
        self.client: mqtt.Client | None = None
        self.arrivals: Arrivals | None = None

    # -- paho: callbacks only make messages --

    def _build_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True, reconnect_on_failure=False)
        client.enable_logger(_PahoLog(logging.getLogger("paho")))
        client.connect_timeout = s.connect_timeout_s
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        if s.username:
            client.username_pw_set(s.username, s.password.get_secret_value() or None)
        if s.tls:
            client.tls_set(ca_certs=s.ca_file or None, cert_reqs=ssl.CERT_REQUIRED)
        me = self.ctx.address
        self.arrivals = Arrivals(wake=lambda: me.tell(_Arrived()))
        client.on_message = self.arrivals.on_message
        client.on_connect = lambda _c, _u, flags, rc, _p: me.tell(
            _Connected(client, str(rc), rc.is_failure, bool(flags.session_present)))
        client.on_disconnect = lambda _c, _u, _f, rc, _p: me.tell(_Disconnected(client, str(rc)))
        client.on_subscribe = lambda _c, _u, mid, codes, _p: me.tell(
            _Subscribed(client, mid, tuple(str(c) for c in codes if c.is_failure)))
        client.on_unsubscribe = lambda _c, _u, mid, codes, _p: me.tell(
            _Unsubscribed(client, mid, tuple(str(c) for c in codes if c.is_failure)))
        client.on_publish = lambda _c, _u, mid, _rc, _p: me.tell(_PubAcked(client, mid))
        return client

    def on_start(self) -> None:
        self.client = self._build_client()
        self.ctx.address.tell(_Connect(self.client))

    def release(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # -- messages --

    def handle(self, message: Any) -> Any:
        if type(message) is _Arrived:
            self._take_arrivals()
        elif isinstance(message, _LINK_MESSAGES) and message.link is not self.client:
            pass  # about a link that is gone: an earlier incarnation's, or one closed
        else:
            match message:
                case Settled(seqs):
                    self._acknowledge(seqs)
                case Publish():
                    self._publish(message)
                case _PubAcked(_, mid):
                    waiter = self._publish_waiters.pop(mid, None)
                    if waiter is not None:
                        waiter[0].tell(waiter[1])
                case _Connect():
                    self._connect()
                case _Connected():
                    self._on_connected(message)
                case _Subscribed(_, mid, refused):
                    self._on_subscribed(mid, refused)
                case _Unsubscribed(_, mid, refused):
                    self._on_unsubscribed(mid, refused)
                case _Disconnected(_, reason):
                    self._take_arrivals(everything=True)  # all of it came on the link now gone
                    self._on_disconnected(reason)
                case WatchLink(watcher):
                    watcher.tell(LinkChanged(self.connected))
                case Health():
                    return HealthReport(self.connected, "broker connected" if self.connected else "broker unreachable")
                case StopIntake():
                    self.intake = False
                    self._flush_batches()
                    return Drained(len(self.ledger))
                case Close():
                    self.closing = True
                    self.connected = False  # what paho says of this link from now on is ignored
                    self.metrics.mqtt_connected.set(0)
                    if self.client is not None:
                        self.client.disconnect()
                        self.client.loop_stop()
                        self.client = None
                    return Drained(len(self.ledger))
                case _:
                    raise TypeError(f"MqttIo does not handle {type(message).__name__}")
        if self._batches and self.mailbox_empty():
            self._flush_batches()
        return None

    # -- receiving --

    def _take_arrivals(self, everything: bool = False) -> None:
        if self.arrivals is None:
            return
        receive = self._receive
        for msg in self.arrivals.take(None if everything else self.batch_size * 4):
            receive(msg)
        # Registry work goes on at once: history waits behind it, and under a
        # steady backlog the mailbox may not be empty for a long while.
        registry = self.routes[HELLO]
        if registry in self._batches:
            self._flush_batch(registry)
        if len(self.arrivals):
            # Let acknowledgements and publishes in between; the producer will not wake us.
            self.ctx.address.tell(_Arrived())

    def _receive(self, msg: Inbound) -> None:
        if not self.intake:
            if msg.qos:
                self.metrics.deferred.inc()  # left unacknowledged: the broker redelivers it
                return
            # QoS 0: the broker will not send it again, and nothing will store it now.
            self.metrics.rejected.labels("stopping").inc()
            self.log.warning("message_rejected", reason="stopping", topic=msg.topic,
                             detail="QoS 0 message received while hydrod stops; not stored")
            return
        if msg.qos == 0 and len(self.ledger) >= self.max_pending:
            self.metrics.rejected.labels("overload").inc()
            self.log.warning("message_rejected", reason="overload", topic=msg.topic,
                             detail=f"{len(self.ledger)} messages pending; QoS 0 message refused")
            return
        seq = self.ledger.admit(msg.mid, msg.qos, self.epoch)
        try:
            self._route(seq, msg)
        except Exception as exc:
            # Admitted, so it must be settled: keep it as a dead letter, never crash-loop on it.
            self.log.exception("handler_crash", topic=msg.topic)
            self.history.tell(Deliver((Routed(seq, REJECT, "", "", "", None, msg.topic, msg.payload,
                                              msg.received_at, protocol.HANDLER_CRASH, repr(exc),
                                              msg.mid, msg.dup),)))

    def _route(self, seq: int, msg: Inbound) -> None:
        routed = protocol.classify(seq, msg.topic, msg.payload, msg.received_at, msg.mid, msg.dup)
        counter = self._received.get(routed.kind)
        if counter is None:
            counter = self._received[routed.kind] = self.metrics.received.labels(routed.kind)
        counter.inc()
        if routed.kind == TIME_REQUEST:
            self._answer_time(routed)
            return
        if routed.kind == COMMAND_RESPONSE and self.commands is not None:
            self.commands.tell(Deliver((routed,)))  # and kept as a node event by the history, below
        destination = self.routes.get(routed.kind, self.history)
        if destination is not self.history:
            self._registry_open[seq] = None
        elif self._registry_open:
            # A node's history waits until what it said before (its node_hello,
            # its config_report) is committed: then its node exists, and bound.
            self._blocked.append(routed)
            return
        batch = self._batches.setdefault(destination, [])
        batch.append(routed)
        if len(batch) >= self.batch_size:
            self._flush_batch(destination)

    def _flush_batches(self) -> None:
        for destination in list(self._batches):
            self._flush_batch(destination)
        self.metrics.pending.set(len(self.ledger))

    def _flush_batch(self, destination: Address) -> None:
        batch = self._batches.pop(destination, None)
        if batch:
            destination.tell(Deliver(tuple(batch)))

    def _answer_time(self, routed: Routed) -> None:
        try:
            protocol.decode_object(routed.payload)
        except protocol.Rejected as exc:
            # Unreadable, but a node is waiting on the clock: answer, and keep the evidence.
            self.history.tell(Deliver((routed._replace(kind=REJECT, reason=exc.reason, detail=exc.detail),)))
        else:
            self.metrics.answered.inc()
            self._acknowledge((routed.seq,))
        self._publish(Publish(protocol.TIME_RESPONSE_TOPIC, protocol.time_response(time.time())))

    def _release_blocked(self, seqs) -> None:
        for seq in seqs:
            self._registry_open.pop(seq, None)
        blocked = self._blocked
        if not blocked:
            return
        first_open = next(iter(self._registry_open), None)
        released = 0
        while released < len(blocked) and (first_open is None or blocked[released].seq < first_open):
            released += 1
        if released:
            batch = self._batches.setdefault(self.history, [])
            batch.extend(blocked[:released])
            del blocked[:released]

    def _acknowledge(self, seqs) -> None:
        if self._registry_open:
            self._release_blocked(seqs)
        due = self.ledger.settle(seqs, self.epoch)
        self.metrics.pending.set(len(self.ledger))
        if not due or self.client is None or not self.connected:
            return
        acked = 0
        for mid, qos in due:
            rc = self.client.ack(mid, qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                # The link dropped under us: the broker will redeliver it, and the rest.
                self.log.warning("mqtt_ack_failed", mid=mid, error=mqtt.error_string(rc),
                                 not_acked=len(due) - acked)
                break
            acked += 1
        self.metrics.acked.inc(acked)

    # -- publishing --

    def _publish(self, request: Publish) -> None:
        if self.client is None or not self.connected:
            self.metrics.publish_deferred.inc()
            if request.on_failed is not None:
                request.on_failed[0].tell(request.on_failed[1])
            return
        info = self.client.publish(request.topic, request.payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.metrics.publish_deferred.inc()
            self.log.warning("mqtt_publish_failed", topic=request.topic, error=mqtt.error_string(info.rc))
            return  # not on_failed: paho keeps a NO_CONN publish and sends it on reconnect
        if request.on_acked is not None:
            self._publish_waiters[info.mid] = request.on_acked

    # -- the link --

    def _connect(self) -> None:
        if self.client is None or self.closing or self.connected or self.connecting:
            return
        s = self.settings
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = s.session_expiry_s
        properties.ReceiveMaximum = s.receive_maximum
        try:
            rc = self.client.connect(s.host, s.port, keepalive=s.keepalive, clean_start=False,
                                     properties=properties)
        except (OSError, ssl.SSLError) as exc:
            rc, error = None, f"{type(exc).__name__}: {exc}"
        else:
            error = None if rc == mqtt.MQTT_ERR_SUCCESS else mqtt.error_string(rc)
        if error is not None:
            self._retry_connect(error)
            return
        rc = self.client.loop_start()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._retry_connect(f"cannot start network thread: {mqtt.error_string(rc)}")
            return
        self.connecting = True  # until the broker's answer, or the link's end

    def _retry_connect(self, error: str | None) -> None:
        """Try again after a backoff; `error` None: the disconnect was logged already."""
        delay = self.backoff.next_delay()
        if error is not None:
            log = self.log.warning if self.backoff.attempts <= 1 else self.log.debug
            log("mqtt_connect_failed", host=self.settings.host, port=self.settings.port, error=error,
                retry_in_s=round(delay, 3), attempt=self.backoff.attempts)
        tell_later(self.ctx.address, _Connect(self.client), delay)

    def _on_connected(self, message: _Connected) -> None:
        self.connecting = False
        if self.client is None or self.closing:
            return  # a late answer to a link we are closing
        if message.failed:
            # The broker refused us (credentials, client id): paho closes the link next.
            self.log.error("mqtt_connect_refused", reason=message.reason, host=self.settings.host)
            self.refused = message.reason  # paho's disconnect then says "Protocol error"
            return
        self.connected = True
        outage = self.backoff.reset()
        self.metrics.mqtt_connected.set(1)
        self.log.info("mqtt_connected", host=self.settings.host, port=self.settings.port,
                      session_present=message.session_present, client_id=self.settings.client_id,
                      outage_s=None if outage is None else round(outage, 3))
        # Retained status/lwt come once, with a new subscription; a re-subscribe
        # on reconnect must not replay an old `offline` over a live node.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        rc, mid = self.client.subscribe([(f, options) for f in self.filters])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self.log.error("mqtt_subscribe_failed", error=mqtt.error_string(rc))
            self.client.disconnect()
            return
        self._awaiting = {mid}
        self._unsubscribed = 0
        if message.session_present and self.stale_filters:
            # Subscribed first, then the old ones dropped: no message falls in between
            # (one published in that instant may come twice, as at-least-once allows).
            rc, mid = self.client.unsubscribe(list(self.stale_filters))
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.log.error("mqtt_subscribe_failed", error=mqtt.error_string(rc), unsubscribe=True)
                self.client.disconnect()
                return
            self._awaiting.add(mid)
            self._unsubscribed = len(self.stale_filters)
        for watcher in self.link_watchers:
            watcher.tell(LinkChanged(True))

    def _on_subscribed(self, mid: int, refused: tuple[str, ...]) -> None:
        if mid not in self._awaiting or self.client is None or self.closing:
            return
        if refused:
            # Connected but deaf is the worst state: drop the link and try again with backoff.
            self.log.error("mqtt_subscribe_refused", reasons=list(refused))
            self._awaiting.clear()
            self.client.disconnect()
            return
        self._answered(mid)

    def _on_unsubscribed(self, mid: int, refused: tuple[str, ...]) -> None:
        if mid not in self._awaiting or self.client is None or self.closing:
            return
        if refused:
            # Still subscribed twice: every message comes twice until a later connect drops them.
            self.log.warning("mqtt_unsubscribe_refused", reasons=list(refused), filters=list(self.stale_filters))
        self._answered(mid)

    def _answered(self, mid: int) -> None:
        self._awaiting.discard(mid)
        if not self._awaiting:
            self.log.info("mqtt_subscribed", filters=len(self.filters), unsubscribed=self._unsubscribed,
                          shared_group=self.settings.shared_group or None)
            self.ctx.supervisor.tell(Ready(self.ctx.name))

    def _on_disconnected(self, reason: str) -> None:
        was_connected = self.connected
        self.connected = False
        self.connecting = False
        self.epoch += 1  # acks for what came before this point are void
        self._publish_waiters.clear()
        self.metrics.mqtt_connected.set(0)
        if self.client is not None:
            self.client.loop_stop()
        if self.closing or self.client is None:
            return
        if was_connected:
            self.log.warning("mqtt_disconnected", reason=reason, pending=len(self.ledger))
            for watcher in self.link_watchers:
                watcher.tell(LinkChanged(False))
            self._retry_connect(None)
        else:
            self._retry_connect(f"refused: {self.refused or reason}")
        self.refused = None
