"""The broker link: the paho client, connecting again with backoff and jitter, the
subscriptions (and dropping those no longer wanted), publishing with PUBACK
tracking, and the acknowledgements that the ledger says are due.

paho's callbacks run on paho's network thread; each only turns what it got into
an event told to `me` (the actor that owns the link), which hands it back to
`Link.on_event` on its own thread. Every event but `Arrived` names the paho
client it is about: a crashed incarnation's client and timers may still speak
after its replacement took the address, and a closed link's answers may come
late; `Link.is_current` tells them apart, and they are ignored.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .. import protocol
from ..settings import MqttSettings
from .arrivals import Arrivals
from .timers import Backoff, Mailbox, tell_later

# --- events: from paho's thread and the reconnect timer, about one client ------------


@dataclass(frozen=True)
class Arrived:
    """PUBLISHes wait in the link's Arrivals queue."""


@dataclass(frozen=True)
class Connect:
    link: mqtt.Client


@dataclass(frozen=True)
class Connected:
    link: mqtt.Client
    reason: str
    failed: bool
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    link: mqtt.Client
    reason: str


@dataclass(frozen=True)
class Subscribed:
    link: mqtt.Client
    mid: int
    refused: tuple[str, ...]


@dataclass(frozen=True)
class Unsubscribed:
    link: mqtt.Client
    mid: int
    refused: tuple[str, ...]


@dataclass(frozen=True)
class PubAcked:
    link: mqtt.Client
    mid: int


LinkEvent = Connect | Connected | Disconnected | Subscribed | Unsubscribed | PubAcked
LINK_EVENTS = (Connect, Connected, Disconnected, Subscribed, Unsubscribed, PubAcked)


def wanted_filters(shared_group: str) -> tuple[str, ...]:
    """The topic filters hydrod subscribes to: SPEC's, in the shared group if one is set."""
    return tuple(f"$share/{shared_group}/{f}" if shared_group else f for f in protocol.SUBSCRIPTIONS)


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


class Link:
    """One MQTT 5 persistent session, kept up for as long as hydrod runs.

    `on_change(up)` is called when the link goes up or down, `on_subscribed()`
    when every SUBSCRIBE (and UNSUBSCRIBE of stale filters) has been answered;
    `pending()` says how many received messages are not acknowledged yet.
    """

    def __init__(self, settings: MqttSettings, *, me: Mailbox, on_change: Callable[[bool], None],
                 on_subscribed: Callable[[], None], pending: Callable[[], int], metrics, log,
                 stale_filters: tuple[str, ...] = ()):
        self.settings = settings
        self.me = me
        self.on_change = on_change
        self.on_subscribed = on_subscribed
        self.pending = pending  # how many received messages wait for their acknowledgement
        self.metrics = metrics
        self.log = log
        self.filters = wanted_filters(settings.shared_group)
        # Filters subscribed once under this client id and no longer wanted (the
        # supervisor reads them from mqtt_subscriptions): the persistent session may
        # still hold them, and would deliver every message once more for each.
        self.stale_filters = tuple(f for f in stale_filters if f not in self.filters)
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.client: mqtt.Client | None = None
        self.arrivals: Arrivals | None = None
        self.connected = False
        self.connecting = False  # a CONNECT is out, its answer not in: no second one starts
        self.refused: str | None = None  # the broker's reason, when its CONNACK refused us
        self.closing = False
        self.epoch = 0  # one more each time the link goes down: acks for what came before are void
        self._publish_waiters: dict[int, tuple[Mailbox, Any]] = {}
        self._awaiting: set[int] = set()  # SUBSCRIBE / UNSUBSCRIBE mids not answered yet
        self._unsubscribed = 0

    # -- the client --

    def start(self) -> None:
        """Build the paho client and connect (on the owner's thread, as an event)."""
        self.client = self._build_client()
        self.me.tell(Connect(self.client))

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
        me = self.me
        self.arrivals = Arrivals(wake=lambda: me.tell(Arrived()))
        client.on_message = self.arrivals.on_message
        client.on_connect = lambda _c, _u, flags, rc, _p: me.tell(
            Connected(client, str(rc), rc.is_failure, bool(flags.session_present)))
        client.on_disconnect = lambda _c, _u, _f, rc, _p: me.tell(Disconnected(client, str(rc)))
        client.on_subscribe = lambda _c, _u, mid, codes, _p: me.tell(
            Subscribed(client, mid, tuple(str(c) for c in codes if c.is_failure)))
        client.on_unsubscribe = lambda _c, _u, mid, codes, _p: me.tell(
            Unsubscribed(client, mid, tuple(str(c) for c in codes if c.is_failure)))
        client.on_publish = lambda _c, _u, mid, _rc, _p: me.tell(PubAcked(client, mid))
        return client

    def is_current(self, event: LinkEvent) -> bool:
        """Whether `event` is about this link's client, not a gone or closed one."""
        return event.link is self.client

    def close(self) -> None:
        """Disconnect keeping the session; what paho says of this link from now on is ignored."""
        self.closing = True
        self.connected = False
        self.metrics.mqtt_connected.set(0)
        self.release()

    def release(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # -- events --

    def on_event(self, event: LinkEvent) -> None:
        """Handle an event about this link (see `is_current`)."""
        match event:
            case PubAcked(_, mid):
                waiter = self._publish_waiters.pop(mid, None)
                if waiter is not None:
                    waiter[0].tell(waiter[1])
            case Connect():
                self._connect()
            case Connected():
                self._on_connected(event)
            case Subscribed(_, mid, refused):
                self._on_subscribed(mid, refused)
            case Unsubscribed(_, mid, refused):
                self._on_unsubscribed(mid, refused)
            case Disconnected(_, reason):
                self._on_disconnected(reason)

    # -- acknowledging and publishing --

    def ack(self, due: list[tuple[int, int]]) -> None:
        """Acknowledge (mid, qos) in order, as far as the link lets us."""
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

    def publish(self, topic: str, payload: bytes, on_acked: tuple[Mailbox, Any] | None = None,
                on_failed: tuple[Mailbox, Any] | None = None) -> None:
        """At QoS 1, never retained; on the PUBACK tell on_acked = (to, message).
        With the link down it is not published (counted): the publisher keeps it, and
        on_failed = (to, message) is told, as it is then safe to send again."""
        if self.client is None or not self.connected:
            self.metrics.publish_deferred.inc()
            if on_failed is not None:
                on_failed[0].tell(on_failed[1])
            return
        info = self.client.publish(topic, payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.metrics.publish_deferred.inc()
            self.log.warning("mqtt_publish_failed", topic=topic, error=mqtt.error_string(info.rc))
            return  # not on_failed: paho keeps a NO_CONN publish and sends it on reconnect
        if on_acked is not None:
            self._publish_waiters[info.mid] = on_acked

    # -- connecting --

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
        tell_later(self.me, Connect(self.client), delay)

    def _on_connected(self, event: Connected) -> None:
        self.connecting = False
        if self.client is None or self.closing:
            return  # a late answer to a link we are closing
        if event.failed:
            # The broker refused us (credentials, client id): paho closes the link next.
            self.log.error("mqtt_connect_refused", reason=event.reason, host=self.settings.host)
            self.refused = event.reason  # paho's disconnect then says "Protocol error"
            return
        self.connected = True
        outage = self.backoff.reset()
        self.metrics.mqtt_connected.set(1)
        self.log.info("mqtt_connected", host=self.settings.host, port=self.settings.port,
                      session_present=event.session_present, client_id=self.settings.client_id,
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
        if event.session_present and self.stale_filters:
            # Subscribed first, then the old ones dropped: no message falls in between
            # (one published in that instant may come twice, as at-least-once allows).
            rc, mid = self.client.unsubscribe(list(self.stale_filters))
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.log.error("mqtt_subscribe_failed", error=mqtt.error_string(rc), unsubscribe=True)
                self.client.disconnect()
                return
            self._awaiting.add(mid)
            self._unsubscribed = len(self.stale_filters)
        self.on_change(True)

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
            self.on_subscribed()

    def _on_disconnected(self, reason: str) -> None:
        was_connected = self.connected
        self.connected = False
        self.connecting = False
        self.epoch += 1
        self._publish_waiters.clear()
        self.metrics.mqtt_connected.set(0)
        if self.client is not None:
            self.client.loop_stop()
        if self.closing or self.client is None:
            return
        if was_connected:
            self.log.warning("mqtt_disconnected", reason=reason, pending=self.pending())
            self.on_change(False)
            self._retry_connect(None)
        else:
            self._retry_connect(f"refused: {self.refused or reason}")
        self.refused = None
