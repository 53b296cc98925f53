"""MqttIo: the actor that owns hydrod's MQTT side, a shell over three plain classes.

- `core.link.Link`: the paho client, connecting again with backoff and jitter,
  subscriptions, publishing with PUBACK tracking, acknowledgements;
- `core.router.Router`: every received message, from its arrival to its
  acknowledgement: classified by topic, answered (time) or batched for the
  registry or the history writer, behind the barrier, acknowledged in arrival
  order once settled (`core.ledger.Ledger`).

paho's callbacks only tell this actor events; this actor hands each message to
the class it is for, on its own thread, and does nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..core.link import LINK_EVENTS, Arrived, Disconnected, Link
from ..core.router import Router
from ..settings import MqttSettings
from .address import Address
from .messages import Ask, Deliver, Drained, Health, HealthReport, LinkChanged, Ready
from .supervised import Context, SupervisedActor

# --- messages ----------------------------------------------------------------------


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


# --- the actor ---------------------------------------------------------------------------


class MqttIo(SupervisedActor):
    def __init__(self, context: Context, *, settings: MqttSettings, registry: Address,
                 history: Address, link_watchers: tuple[Address, ...], metrics,
                 batch_size: int, max_pending: int, stale_filters: tuple[str, ...] = (),
                 commands: Address | None = None):
        super().__init__(context)
        me = context.address

        def link_changed(up: bool) -> None:
            for watcher in link_watchers:
                watcher.tell(LinkChanged(up))

        self.link = Link(settings, me=me, on_change=link_changed,
                         on_subscribed=lambda: context.supervisor.tell(Ready(context.name)),
                         pending=lambda: len(self.router), metrics=metrics, log=self.log,
                         stale_filters=stale_filters)
        self.router = Router(registry=lambda items: registry.tell(Deliver(items)),
                             history=lambda items: history.tell(Deliver(items)),
                             commands=None if commands is None else lambda items: commands.tell(Deliver(items)),
                             link=self.link, metrics=metrics, log=self.log, batch_size=batch_size,
                             max_pending=max_pending, start=time.monotonic_ns())

    def on_start(self) -> None:
        self.link.start()

    def release(self) -> None:
        self.link.release()

    def handle(self, message: Any) -> Any:
        link, router = self.link, self.router
        if type(message) is Arrived:
            if link.arrivals is not None and router.take(link.arrivals):
                self.ctx.address.tell(Arrived())  # acknowledgements and publishes go in between
        elif isinstance(message, LINK_EVENTS):
            if link.is_current(message):
                if type(message) is Disconnected and link.arrivals is not None:
                    router.take(link.arrivals, everything=True)  # all of it came on the link now gone
                link.on_event(message)
        else:
            match message:
                case Settled(seqs):
                    router.settle(seqs)
                case Publish(topic, payload, on_acked, on_failed):
                    link.publish(topic, payload, on_acked, on_failed)
                case WatchLink(watcher):
                    watcher.tell(LinkChanged(link.connected))
                case Health():
                    up = link.connected
                    return HealthReport(up, "broker connected" if up else "broker unreachable")
                case StopIntake():
                    return Drained(router.stop_intake())
                case Close():
                    link.close()
                    return Drained(len(router))
                case _:
                    raise TypeError(f"MqttIo does not handle {type(message).__name__}")
        if router.batched and self.mailbox_empty():
            router.flush()
        return None
