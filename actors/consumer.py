"""The shell shared by the actors that commit received messages to PostgreSQL.

A consumer gathers delivered messages into a batch and writes it in one
transaction when the batch holds `batch_size` messages or when its oldest
message has waited `flush_interval`, whichever comes first. Only after the
commit does it tell MqttIo which messages are settled, so the broker is
acknowledged only for what is stored. While the database is away it keeps the
batch, retries with backoff and jitter, and the broker holds back the rest.

Why not commit whenever the mailbox is empty (group commit)? At a steady
1,000 msg/s the mailbox is empty after almost every message: that made 1.5
messages a transaction and cost ten times the CPU per message of a drain.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from .. import store
from ..protocol import HANDLER_CRASH, STORE_REFUSED, Routed
from .base import Backoff, Context, Deliver, Flush, Health, SupervisedActor, Ticker, open_pool, tell_later
from .mqtt_io import Settled


@dataclass(frozen=True)
class Refusal:
    item: Routed
    reason: str
    detail: str


@dataclass(frozen=True)
class _FlushDue:
    """Ticker: flush a batch whose oldest message has waited long enough."""


@dataclass(frozen=True)
class _Retry:
    """Timer: try the database again."""


# Data the database refuses for one row, not for the whole service.
DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)
# serialization_failure, deadlock_detected: another writer got in the way; try again.
CONFLICTS = ("40001", "40P01")


class BatchConsumer(SupervisedActor):
    def __init__(self, context: Context, *, dsn: str, pool_size: tuple[int, int], mqtt,
                 metrics, batch_size: int, flush_interval: float, retry: Backoff):
        super().__init__(context)
        self._dsn = dsn
        self._pool_size = pool_size
        self.mqtt = mqtt
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry = retry
        self.pool: ConnectionPool | None = None
        self._pending: list[Routed] = []
        self._absorbed: Deliver | None = None  # the last Deliver whose items are in _pending
        self._settled_now: set[int] = set()  # seqs committed during the current flush
        self._oldest = 0.0
        self._db_ok = True
        self._waiting_retry = False
        self._ticker: Ticker | None = None

    # -- to be provided by each consumer --

    def write(self, cur: psycopg.Cursor, items: list[Routed]) -> list[Refusal]:
        """Store items inside the open transaction; return the ones refused."""
        raise NotImplementedError

    def committed(self) -> None:
        """Called after each successful commit: announce what it did (logs happen only once)."""

    def not_stored(self) -> int:
        """After a commit: how many of the items written were there already (not refused, not stored)."""
        return 0

    def handle_other(self, message: Any) -> Any:
        raise TypeError(f"{self.ctx.name} does not handle {type(message).__name__}")

    def configure_connection(self, conn: psycopg.Connection) -> None:
        """psycopg_pool `configure` hook."""

    # -- lifecycle --

    def on_start(self) -> None:
        self.pool = open_pool(self.ctx.name, self._dsn, self._pool_size, self.configure_connection)
        self._ticker = Ticker(self.ctx.name, self.ctx.address, _FlushDue(),
                              max(self.flush_interval / 2, 0.005)).start()

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        if self.pool is not None:
            self.pool.close(timeout=2)
            self.pool = None

    # -- messages --

    def handle(self, message: Any) -> Any:
        match message:
            case Deliver(items, alone=True):
                # A suspect from a crash: what came before goes first, then it, on its own.
                if self._pending and not self._waiting_retry:
                    self.flush()
                if not self._pending:
                    self._oldest = time.monotonic()
                self._pending.extend(items)
                self._absorbed = message
                if not self._waiting_retry and len(self._pending) == len(items):
                    self.flush()
            case Deliver(items):
                if not self._pending:
                    self._oldest = time.monotonic()
                self._pending.extend(items)
                self._absorbed = message
                if not self._waiting_retry and (
                        len(self._pending) >= self.batch_size
                        or time.monotonic() - self._oldest >= self.flush_interval):
                    self.flush()
            case _FlushDue():
                if (self._pending and not self._waiting_retry
                        and time.monotonic() - self._oldest >= self.flush_interval):
                    self.flush()
            case _Retry():
                self._waiting_retry = False
                self.flush()
                if not self._db_ok and not self._pending:
                    self._probe()
            case Flush():
                pending = len(self._pending)
                self._waiting_retry = False
                self.flush()
                return pending - len(self._pending)
            case Health():
                return self._db_ok, "database reachable" if self._db_ok else "database unreachable"
            case _:
                return self.handle_other(message)
        return None

    def salvage(self) -> tuple[Any, tuple[Any, ...]]:
        """The suspect, and everything else received and not committed.

        The suspect is the Deliver being handled when the actor died before taking
        it in; when it died later (while writing), the whole pending batch is."""
        current = self._current
        uncommitted = tuple(item for item in self._pending if item.seq not in self._settled_now)
        held = (Deliver(uncommitted),) if uncommitted else ()
        if isinstance(current, Deliver) and current is not self._absorbed:
            return current, held
        return (held[0] if held else None), ()

    # -- writing --

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor]:
        """A pooled connection in a transaction: `with self.transaction() as cur: ...`."""
        with self.pool.connection(timeout=5) as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    def flush(self) -> None:
        wrote = False
        while self._pending:
            chunk = self._pending[: self.batch_size]
            self._settled_now: set[int] = set()
            try:
                self._write_chunk_retrying_conflicts(chunk)
            except psycopg.OperationalError as exc:
                # Parts of a bisected chunk may be committed already: keep only the rest.
                if self._settled_now:
                    self._pending = [item for item in self._pending if item.seq not in self._settled_now]
                self._database_down(exc)
                return
            del self._pending[: len(chunk)]
            self._oldest = time.monotonic()
            wrote = True
        if wrote:
            self._database_up()

    def _write_chunk_retrying_conflicts(self, chunk: list[Routed], attempts: int = 3) -> None:
        """A deadlock or serialization failure with another writer is not an outage: go again."""
        for attempt in range(1, attempts + 1):
            try:
                self._write_chunk(chunk)
                return
            except psycopg.OperationalError as exc:
                if exc.sqlstate not in CONFLICTS or attempt == attempts:
                    raise
                self.log.info("db_conflict_retried", error=str(exc).strip().splitlines()[0], attempt=attempt)
                # Halves of a bisected chunk may be committed already.
                chunk = [item for item in chunk if item.seq not in self._settled_now]
                if not chunk:
                    return

    def _write_chunk(self, chunk: list[Routed]) -> None:
        started = time.perf_counter()
        try:
            with self.transaction() as cur:
                refused = self.write(cur, chunk)
                self._dead_letter(cur, refused)
        except psycopg.OperationalError:
            raise  # the database is away: keep everything, retry later
        except Exception as exc:
            # Something in this chunk is refused by the database (DataError,
            # IntegrityError) or breaks the code: corner it by halves, keep the
            # rest, and dead-letter the one message that fails alone.
            if len(chunk) > 1:
                middle = len(chunk) // 2
                self._write_chunk_retrying_conflicts(chunk[:middle])
                self._write_chunk_retrying_conflicts(chunk[middle:])
                return
            if isinstance(exc, DATA_ERRORS):
                reason, detail = STORE_REFUSED, store.refusal_detail(exc)
            else:
                self.log.exception("handler_crash", topic=chunk[0].topic)
                reason, detail = HANDLER_CRASH, repr(exc)
            with self.transaction() as cur:
                self._dead_letter(cur, [Refusal(chunk[0], reason, detail)])
            self._settle(chunk)
            return
        self.committed()
        self.metrics.batch_seconds.labels(self.ctx.name).observe(time.perf_counter() - started)
        self.metrics.stored.labels(self.ctx.name).inc(len(chunk) - len(refused) - self.not_stored())
        self._settle(chunk)

    def _settle(self, chunk: list[Routed]) -> None:
        seqs = tuple(item.seq for item in chunk)
        self._settled_now.update(seqs)
        self.mqtt.tell(Settled(seqs))

    def _dead_letter(self, cur: psycopg.Cursor, refused: list[Refusal]) -> None:
        if not refused:
            return
        store.write_dead_letters(cur, ((r.item.received_at, r.item.topic, r.item.payload, r.reason, r.detail)
                                       for r in refused))
        for r in refused:
            self.metrics.rejected.labels(r.reason).inc()
            self.log.warning("message_rejected", reason=r.reason, detail=r.detail, topic=r.item.topic)

    def _database_down(self, exc: Exception, retry: bool = True) -> None:
        """Log the outage once; with `retry`, try the pending batch again after a backoff."""
        if self._db_ok:
            self._db_ok = False
            self.metrics.db_up.labels(self.ctx.name).set(0)
            self.log.error("db_unavailable", error=str(exc).strip() or type(exc).__name__,
                           pending=len(self._pending))
        if retry and not self._waiting_retry:
            self._waiting_retry = True
            tell_later(self.ctx.address, _Retry(), self.retry.next_delay())

    def _probe(self) -> None:
        """Nothing to write, but the database was away: ask it directly."""
        try:
            with self.transaction() as cur:
                cur.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            self._database_down(exc)
        else:
            self._database_up()

    def _database_up(self) -> None:
        if not self._db_ok:
            self._db_ok = True
            self.metrics.db_up.labels(self.ctx.name).set(1)
            lasted = self.retry.reset()
            self.log.info("db_recovered", outage_s=round(lasted or 0.0, 3))
        else:
            self.retry.reset()
