"""Batcher: received messages, gathered into batches and committed to PostgreSQL.

A batch is written in one transaction when it holds `batch_size` messages or
when its oldest message has waited `flush_interval`, whichever comes first.
Only after the commit is MqttIo told which messages are settled, so the broker
is acknowledged only for what is stored. While the database is away the
batch is kept and retried with backoff and jitter, and the broker holds back
the rest.

What a batch means is the writer's business (core/history.py, core/registry.py):
`write(cur, items)` stores items inside the open transaction and says what it
refused. The batcher owns the rest: a conflict with another writer is retried
at once; a row the database refuses, or one that breaks the code, is cornered
by halves and dead-lettered alone, and the rest of its batch is stored.

Why not commit whenever the mailbox is empty (group commit)? At a steady
1,000 msg/s the mailbox is empty after almost every message: that made 1.5
messages a transaction and cost ten times the CPU per message of a drain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from .. import store
from ..protocol import HANDLER_CRASH, STORE_REFUSED, Routed
from .database import Database

# Data the database refuses for one row, not for the whole service.
DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)
# serialization_failure, deadlock_detected: another writer got in the way; try again.
CONFLICTS = ("40001", "40P01")


@dataclass(frozen=True)
class Refusal:
    item: Routed
    reason: str
    detail: str


@dataclass(frozen=True)
class Written:
    """What a writer did with a batch, inside the transaction."""

    refused: list[Refusal] = field(default_factory=list)
    not_stored: int = 0  # accepted, and there already (not refused, not stored)
    # Run once the transaction is committed: log lines, counters, tells. Never
    # before, so that nothing is announced that a rollback undoes.
    announce: Callable[[], None] = lambda: None


class Writer(Protocol):
    def write(self, cur: psycopg.Cursor, items: list[Routed]) -> Written: ...


class Delays(Protocol):
    """Backoff (core/timers.py): the next delay; reset() says how long the failures lasted."""

    def next_delay(self) -> float: ...
    def reset(self) -> float | None: ...


class Batcher:
    def __init__(self, name: str, db: Database, writer: Writer, *, settle: Callable[[tuple[int, ...]], None],
                 retry_later: Callable[[float], None], retry: Delays, metrics, log, batch_size: int,
                 flush_interval: float):
        self.name = name
        self.db = db
        self.writer = writer
        self.settle = settle  # told the seqs of each committed (or dead-lettered) chunk
        self.retry_later = retry_later  # call retry() after this many seconds
        self.retry = retry
        self.metrics = metrics
        self.log = log
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.pending: list[Routed] = []
        self.absorbed: Any = None  # the token of the last add() whose items are in `pending`
        self._settled_now: set[int] = set()  # seqs committed during the current flush
        self._oldest = 0.0
        self.waiting_retry = False

    # -- what the shell feeds in --

    def add(self, items: Iterable[Routed], *, alone: bool = False, token: Any = None) -> None:
        """Take received items; flush when the batch is full or old enough.

        `alone`: a suspect (part of a batch that crashed its actor): what came
        before goes first, then it, on its own, so that a poison message is cornered."""
        items = list(items)
        if alone and self.pending and not self.waiting_retry:
            self.flush()
        if not self.pending:
            self._oldest = time.monotonic()
        self.pending.extend(items)
        self.absorbed = token
        if self.waiting_retry:
            return
        if alone:
            if len(self.pending) == len(items):
                self.flush()
        elif len(self.pending) >= self.batch_size or time.monotonic() - self._oldest >= self.flush_interval:
            self.flush()

    def due(self) -> None:
        """The flush timer: write a batch whose oldest message has waited long enough."""
        if self.pending and not self.waiting_retry and time.monotonic() - self._oldest >= self.flush_interval:
            self.flush()

    def retry_now(self) -> None:
        """The retry timer: try the database again."""
        self.waiting_retry = False
        self.flush()
        if not self.db.ok and not self.pending:
            if self.db.probe():
                self.retry.reset()
            else:
                self._retry_later()

    def drain(self) -> int:
        """Commit what is pending now (shutdown); how many were committed."""
        pending = len(self.pending)
        self.waiting_retry = False
        self.flush()
        return pending - len(self.pending)

    def uncommitted(self) -> tuple[Routed, ...]:
        """What was received and not committed (for a replacement after a crash)."""
        return tuple(item for item in self.pending if item.seq not in self._settled_now)

    def job(self, work: Callable[[psycopg.Cursor], Callable[[], None]]) -> None:
        """A periodic job on the database, in one transaction; `work` returns what to
        announce once it is committed. It is also the database's heartbeat: with no
        traffic, an outage is still noticed within one round."""
        try:
            with self.db.transaction() as cur:
                announce = work(cur)
        except psycopg.OperationalError as exc:
            self.db.down(exc, pending=len(self.pending))
            if self.pending:
                self._retry_later()
            return
        if not self.pending:
            self._database_up()
        announce()

    # -- writing --

    def flush(self) -> None:
        wrote = False
        while self.pending:
            chunk = self.pending[: self.batch_size]
            self._settled_now = set()
            try:
                self._write_retrying_conflicts(chunk)
            except psycopg.OperationalError as exc:
                # Parts of a bisected chunk may be committed already: keep only the rest.
                if self._settled_now:
                    self.pending = [item for item in self.pending if item.seq not in self._settled_now]
                self.db.down(exc, pending=len(self.pending))
                self._retry_later()
                return
            del self.pending[: len(chunk)]
            self._oldest = time.monotonic()
            wrote = True
        if wrote:
            self._database_up()

    def _retry_later(self) -> None:
        if not self.waiting_retry:
            self.waiting_retry = True
            self.retry_later(self.retry.next_delay())

    def _database_up(self) -> None:
        self.retry.reset()
        self.db.up()

    def _write_retrying_conflicts(self, chunk: list[Routed], attempts: int = 3) -> None:
        """A deadlock or serialization failure with another writer is not an outage: go again."""
        for attempt in range(1, attempts + 1):
            try:
                self._write(chunk)
                return
            except psycopg.OperationalError as exc:
                if exc.sqlstate not in CONFLICTS or attempt == attempts:
                    raise
                self.log.info("db_conflict_retried", error=store.error_line(exc), attempt=attempt)
                # Halves of a bisected chunk may be committed already.
                chunk = [item for item in chunk if item.seq not in self._settled_now]
                if not chunk:
                    return

    def _write(self, chunk: list[Routed]) -> None:
        started = time.perf_counter()
        try:
            with self.db.transaction() as cur:
                written = self.writer.write(cur, chunk)
                self._dead_letter(cur, written.refused)
        except psycopg.OperationalError:
            raise  # the database is away: keep everything, retry later
        except Exception as exc:
            # Something in this chunk is refused by the database (DataError,
            # IntegrityError) or breaks the code: corner it by halves, keep the
            # rest, and dead-letter the one message that fails alone.
            if len(chunk) > 1:
                middle = len(chunk) // 2
                self._write_retrying_conflicts(chunk[:middle])
                self._write_retrying_conflicts(chunk[middle:])
                return
            if isinstance(exc, DATA_ERRORS):
                reason, detail = STORE_REFUSED, store.refusal_detail(exc)
            else:
                self.log.exception("handler_crash", topic=chunk[0].topic)
                reason, detail = HANDLER_CRASH, repr(exc)
            with self.db.transaction() as cur:
                self._dead_letter(cur, [Refusal(chunk[0], reason, detail)])
            self._settle(chunk)
            return
        written.announce()
        self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - started)
        self.metrics.stored.labels(self.name).inc(len(chunk) - len(written.refused) - written.not_stored)
        self._settle(chunk)

    def _settle(self, chunk: list[Routed]) -> None:
        seqs = tuple(item.seq for item in chunk)
        self._settled_now.update(seqs)
        self.settle(seqs)

    def _dead_letter(self, cur: psycopg.Cursor, refused: list[Refusal]) -> None:
        if not refused:
            return
        store.write_dead_letters(cur, ((r.item.received_at, r.item.topic, r.item.payload, r.reason, r.detail)
                                       for r in refused))
        for r in refused:
            self.metrics.rejected.labels(r.reason).inc()
            self.log.warning("message_rejected", reason=r.reason, detail=r.detail, topic=r.item.topic)
