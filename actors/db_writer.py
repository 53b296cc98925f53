"""DbWriter: the shell of the node history service (core/history.py), batched by
core/batcher.py on the actor's own pool (core/database.py).

It stores telemetry, heartbeats, status, last wills and node events, dead-letters
whatever breaks the rules, and sweeps silent nodes offline on a timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import store
from ..core.batcher import Batcher
from ..core.database import Database
from ..core.history import History
from ..core.timers import Backoff, Ticker, tell_later
from .address import Address
from .messages import Deliver, Drained, Flush, Health, HealthReport
from .supervised import Context, SupervisedActor
from .consumer import FlushDue, RetryDatabase, salvage
from .mqtt_io import Settled


@dataclass(frozen=True)
class SweepOffline:
    """Ticker: mark nodes silent for `offline_after_s` offline; drop expired held reports."""


class DbWriter(SupervisedActor):
    def __init__(self, context: Context, *, dsn: str, pool_size: tuple[int, int], mqtt: Address, metrics,
                 batch_size: int, flush_interval: float, retry: Backoff, offline_after_s: float,
                 held_report_ttl_s: float):
        super().__init__(context)
        self._dsn, self._pool_size = dsn, pool_size
        self.mqtt = mqtt
        self.metrics = metrics
        self.retry = retry
        self.batch_size, self.flush_interval = batch_size, flush_interval
        self.history = History(metrics=metrics, log=self.log, offline_after_s=offline_after_s,
                               held_report_ttl_s=held_report_ttl_s)
        self.db: Database | None = None
        self.batcher: Batcher | None = None
        self._tickers: list[Ticker] = []

    def on_start(self) -> None:
        name, address = self.ctx.name, self.ctx.address
        self.db = Database(name, self._dsn, self._pool_size, metrics=self.metrics, log=self.log,
                           configure=store.prepare_connection)
        self.batcher = Batcher(name, self.db, self.history, settle=lambda seqs: self.mqtt.tell(Settled(seqs)),
                               retry_later=lambda delay: tell_later(address, RetryDatabase(), delay),
                               retry=self.retry, metrics=self.metrics, log=self.log, batch_size=self.batch_size,
                               flush_interval=self.flush_interval)
        self._tickers = [
            Ticker(name, address, FlushDue(), max(self.flush_interval / 2, 0.005)).start(),
            Ticker(f"{name}-offline", address, SweepOffline(), min(self.history.offline_after_s / 4, 5.0)).start(),
        ]

    def handle(self, message: Any) -> Any:
        match message:
            case Deliver(items, alone):
                self.batcher.add(items, alone=alone, token=message)
            case FlushDue():
                self.batcher.due()
            case RetryDatabase():
                self.batcher.retry_now()
            case SweepOffline():
                self.batcher.job(self.history.sweep)
            case Flush():
                return Drained(self.batcher.drain())
            case Health():
                return HealthReport(*self.db.health())
            case _:
                raise TypeError(f"DbWriter does not handle {type(message).__name__}")
        return None

    def salvage(self) -> tuple[Any, tuple[Any, ...]]:
        return salvage(self._current, self.batcher)

    def release(self) -> None:
        for ticker in self._tickers:
            ticker.stop()
        self._tickers = []
        if self.db is not None:
            self.db.close()
            self.db = None
