"""The router: every message received, from its arrival to its acknowledgement.

It takes each PUBLISH in (or refuses it, while stopping or overloaded), admits
it to the ledger, classifies it by its topic, and then answers it (a time
request) or batches it for the registry or the history writer; the barrier holds
a node's history back while its registry work is open. When a consumer says
which messages are settled, it releases what the barrier held and acknowledges,
through the link, what the ledger says is due.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .. import protocol
from ..protocol import COMMAND_RESPONSE, CONFIG_REPORT, HELLO, REJECT, TIME_REQUEST, Routed
from .arrivals import Arrivals, Inbound
from .barrier import Barrier
from .ledger import Ledger

Send = Callable[[tuple[Routed, ...]], None]


class Acks(Protocol):
    """What the router needs of the link."""

    epoch: int

    def ack(self, due: list[tuple[int, int]]) -> None: ...

    def publish(self, topic: str, payload: bytes) -> None: ...


class Router:
    def __init__(self, *, registry: Send, history: Send, link: Acks, metrics, log, batch_size: int,
                 max_pending: int, start: int, commands: Send | None = None):
        self.registry = registry
        self.history = history
        self.commands = commands  # also sent each command_response: it moves its command (SPEC §7)
        self.link = link
        self.metrics = metrics
        self.log = log
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.ledger = Ledger(start=start)
        self.barrier = Barrier()
        self.intake = True
        self._to_registry: list[Routed] = []
        self._to_history: list[Routed] = []
        self._received = {}

    # -- receiving --

    def take(self, arrivals: Arrivals, everything: bool = False) -> bool:
        """Take what waits in `arrivals` (a bounded share, unless `everything`);
        True when more waits, which the caller must come back for."""
        receive = self.receive
        for msg in arrivals.take(None if everything else self.batch_size * 4):
            receive(msg)
        # Registry work goes on at once: history waits behind it, and under a
        # steady backlog the mailbox may not be empty for a long while.
        self._flush_registry()
        return len(arrivals) > 0

    def receive(self, msg: Inbound) -> None:
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
        seq = self.ledger.admit(msg.mid, msg.qos, self.link.epoch)
        try:
            self._route(seq, msg)
        except Exception as exc:
            # Admitted, so it must be settled: keep it as a dead letter, never crash-loop on it.
            self.log.exception("handler_crash", topic=msg.topic)
            self.history((Routed(seq, REJECT, "", "", "", None, msg.topic, msg.payload, msg.received_at,
                                 protocol.HANDLER_CRASH, repr(exc), msg.mid, msg.dup),))

    def _route(self, seq: int, msg: Inbound) -> None:
        routed = protocol.classify(seq, msg.topic, msg.payload, msg.received_at, msg.mid, msg.dup)
        kind = routed.kind
        counter = self._received.get(kind)
        if counter is None:
            counter = self._received[kind] = self.metrics.received.labels(kind)
        counter.inc()
        if kind == HELLO or kind == CONFIG_REPORT:
            self.barrier.open(routed)
            batch = self._to_registry
            batch.append(routed)
            if len(batch) >= self.batch_size:
                self._flush_registry()
            return
        if kind == TIME_REQUEST:
            self._answer_time(routed)
            return
        if kind == COMMAND_RESPONSE and self.commands is not None:
            self.commands((routed,))  # and kept as a node event by the history, below
        if not self.barrier.holds(routed):
            batch = self._to_history
            batch.append(routed)
            if len(batch) >= self.batch_size:
                self._flush_history()

    def _answer_time(self, routed: Routed) -> None:
        try:
            protocol.decode_object(routed.payload)
        except protocol.Rejected as exc:
            # Unreadable, but a node is waiting on the clock: answer, and keep the evidence.
            self.history((routed._replace(kind=REJECT, reason=exc.reason, detail=exc.detail),))
        else:
            self.metrics.answered.inc()
            self.settle((routed.seq,))
        self.link.publish(protocol.TIME_RESPONSE_TOPIC, protocol.time_response(time.time()))

    # -- batches --

    @property
    def batched(self) -> bool:
        return bool(self._to_registry or self._to_history)

    def flush(self) -> None:
        """Send every batch now."""
        self._flush_registry()
        self._flush_history()
        self.metrics.pending.set(len(self.ledger))

    def _flush_registry(self) -> None:
        if self._to_registry:
            batch, self._to_registry = self._to_registry, []
            self.registry(tuple(batch))

    def _flush_history(self) -> None:
        if self._to_history:
            batch, self._to_history = self._to_history, []
            self.history(tuple(batch))

    # -- settling --

    def settle(self, seqs) -> None:
        """`seqs` are committed (or dead-lettered, or answered): release the history
        that waited for them, and acknowledge what is now due, in arrival order."""
        if len(self.barrier):
            self._to_history.extend(self.barrier.settle(seqs))
        due = self.ledger.settle(seqs, self.link.epoch)
        self.metrics.pending.set(len(self.ledger))
        self.link.ack(due)

    def stop_intake(self) -> int:
        """Take nothing more (it stays unacknowledged in the broker); returns how many are pending."""
        self.intake = False
        self.flush()
        return len(self.ledger)

    def __len__(self) -> int:
        """Messages received and not acknowledged yet."""
        return len(self.ledger)
