"""CommandSender: the thin shell over core.commands.Commands (SPEC §7).

It turns messages into calls: new commands from the HTTP API (which reads them on
its own pool, core/reads.py), answers routed by MqttIo,
the link's state, PUBACKs, and its own sweep ticks. Whenever something may have
freed a command to go (a new one, a PUBACK, the link back, a tick that sees a node
back online), it asks the core for what is due and hands that to MqttIo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from ..core.commands import Answer, CommandRefused, Commands
from ..core.database import Database
from ..core.timers import Ticker
from .address import Address
from .messages import Ask, Deliver, Drained, Flush, Health, HealthReport, LinkChanged
from .supervised import Context, SupervisedActor
from .mqtt_io import Publish, WatchLink


BATCH = 500  # answers or PUBACKs in one transaction
FLUSH_EVERY_S = 0.25  # under a steady stream the mailbox is never empty: flush this often anyway


@dataclass(frozen=True)
class CreateCommand(Ask[tuple[Any, bool]]):
    """Ask (HTTP API): returns (summary, created) or raises CommandRefused. Not made
    after `deadline` (time.monotonic()): a caller told "busy" may retry safely."""

    uid: str
    body: Any
    deadline: float


@dataclass(frozen=True)
class _Published:
    command_id: int


@dataclass(frozen=True)
class _NotPublished:
    command_id: int


@dataclass(frozen=True)
class _Sweep:
    """Ticker: expiries, timeouts, and nodes back online."""


class CommandSender(SupervisedActor):
    def __init__(self, context: Context, *, dsn: str, mqtt: Address, metrics, default_ttl_s: float,
                 response_timeout_s: float, sweep_interval_s: float):
        super().__init__(context)
        self._dsn = dsn
        self.mqtt = mqtt
        self.metrics = metrics
        self._settings = dict(default_ttl_s=default_ttl_s, response_timeout_s=response_timeout_s)
        self.sweep_interval_s = sweep_interval_s
        self.link_up = False
        self.db: Database | None = None
        self.core: Commands | None = None
        self._answers: list[Answer] = []  # not applied yet
        self._acked: list[int] = []  # PUBACKed, not recorded yet
        self._claim_due = False
        self._flushed = 0.0
        self._recovered = False
        self._ticker: Ticker | None = None

    def on_start(self) -> None:
        self.db = Database(self.ctx.name, self._dsn, (1, 2), metrics=self.metrics, log=self.log)
        self.core = Commands(self.db.pool, metrics=self.metrics, log=self.log, **self._settings)
        self._ticker = Ticker(self.ctx.name, self.ctx.address, _Sweep(), self.sweep_interval_s).start()
        self.mqtt.tell(WatchLink(self.ctx.address))  # answered with LinkChanged

    def salvage(self) -> tuple[Any, tuple[Any, ...]]:
        """The PUBACKs not recorded yet go to the replacement. Answers not applied yet do
        not: the replacement applies them from the history (Commands.recover), where a
        poison one cannot crash it again and again."""
        return self._current, tuple(_Published(command_id) for command_id in self._acked)

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self.db is not None:
            self.db.close()
            self.db = None
            self.core = None

    def handle(self, message: Any) -> Any:
        # Answers, PUBACKs and claims are batched: done once the mailbox is empty (or a
        # batch is full), so a burst costs a few transactions, not a few per command.
        match message:
            case CreateCommand(uid, body, deadline):
                if time.monotonic() > deadline - 0.05:
                    raise CommandRefused(503, "hydrod is busy: the command was not made; it is safe to retry")
                result = self.core.create(uid, body, deadline)
                self._claim_due = True
                self._after()
                return result
            case Deliver(items):
                self._answers.extend(Answer(i.node, i.payload, i.received_at) for i in items)
            case LinkChanged(up):
                self.link_up = up
                self._claim_due = up
            case _Published(command_id):
                self._acked.append(command_id)
                self._claim_due = True  # its node's next command may go now
            case _NotPublished(command_id):
                self._guarded(self.core.not_published, command_id)
            case _Sweep():
                if not self._recovered:
                    self._recovered = self._guarded(self.core.recover) is not None
                self._guarded(self.core.sweep)
                self._claim_due = True  # a node may be back online
            case Health():
                return HealthReport(*self.db.health())
            case Flush():
                self._after(force=True)
                return Drained(len(self._answers) + len(self._acked))
            case _:
                raise TypeError(f"CommandSender does not handle {type(message).__name__}")
        self._after()
        return None

    def _after(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (force or self.mailbox_empty() or len(self._answers) + len(self._acked) >= BATCH
                or now - self._flushed >= FLUSH_EVERY_S):
            return
        self._flushed = now
        if self._acked and self._guarded(self.core.published, self._acked[:BATCH]) is not None:
            del self._acked[:BATCH]
        if self._answers and self._guarded(self.core.answers, self._answers[:BATCH]) is not None:
            del self._answers[:BATCH]
        if self._claim_due and self.link_up:
            due = self._guarded(self.core.claim)
            if due is not None:
                self._claim_due = False
            for out in due or ():
                self.mqtt.tell(Publish(out.topic, out.payload, on_acked=(self.ctx.address, _Published(out.id)),
                                       on_failed=(self.ctx.address, _NotPublished(out.id))))
        # What is left (the database was away, or more than a batch) waits for the next message or tick.

    def _guarded(self, call, *args) -> Any:
        """The call's result, or None when the database is away (logged once; the
        next tick tries again, and nothing was changed)."""
        try:
            result = call(*args)
        except psycopg.OperationalError as exc:
            self.db.down(exc, doing=call.__name__)  # said once per outage (core/database.py)
            return None
        self.db.up()
        return result if result is not None else True
