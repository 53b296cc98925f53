"""NodeRegistry: the shell of the registry (core/registry.py: node_hello and
config_report), batched by core/batcher.py on the actor's own pool."""

from __future__ import annotations

from typing import Any

from ..core.batcher import Batcher
from ..core.database import Database
from ..core.registry import Registry
from ..core.timers import Backoff, Ticker, tell_later
from .address import Address
from .messages import Deliver, Drained, Flush, Health, HealthReport
from .supervised import Context, SupervisedActor
from .consumer import FlushDue, RetryDatabase, salvage
from .mqtt_io import Settled


class NodeRegistry(SupervisedActor):
    def __init__(self, context: Context, *, dsn: str, pool_size: tuple[int, int], mqtt: Address, metrics,
                 batch_size: int, flush_interval: float, retry: Backoff, config_publisher: Address,
                 resend_interval_s: float):
        super().__init__(context)
        self._dsn, self._pool_size = dsn, pool_size
        self.mqtt = mqtt
        self.metrics = metrics
        self.retry = retry
        self.batch_size, self.flush_interval = batch_size, flush_interval
        # Resends are told once their batch is committed.
        self.registry = Registry(resend=config_publisher.tell, resend_interval_s=resend_interval_s,
                                 metrics=metrics, log=self.log)
        self.db: Database | None = None
        self.batcher: Batcher | None = None
        self._ticker: Ticker | None = None

    def on_start(self) -> None:
        name, address = self.ctx.name, self.ctx.address
        self.db = Database(name, self._dsn, self._pool_size, metrics=self.metrics, log=self.log)
        self.batcher = Batcher(name, self.db, self.registry, settle=lambda seqs: self.mqtt.tell(Settled(seqs)),
                               retry_later=lambda delay: tell_later(address, RetryDatabase(), delay),
                               retry=self.retry, metrics=self.metrics, log=self.log, batch_size=self.batch_size,
                               flush_interval=self.flush_interval)
        self._ticker = Ticker(name, address, FlushDue(), max(self.flush_interval / 2, 0.005)).start()

    def handle(self, message: Any) -> Any:
        match message:
            case Deliver(items, alone):
                self.batcher.add(items, alone=alone, token=message)
            case FlushDue():
                self.batcher.due()
            case RetryDatabase():
                self.batcher.retry_now()
            case Flush():
                return Drained(self.batcher.drain())
            case Health():
                return HealthReport(*self.db.health())
            case _:
                raise TypeError(f"NodeRegistry does not handle {type(message).__name__}")
        return None

    def salvage(self) -> tuple[Any, tuple[Any, ...]]:
        return salvage(self._current, self.batcher)

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        if self.db is not None:
            self.db.close()
            self.db = None
