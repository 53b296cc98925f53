"""core/batcher.py, driven synchronously (no actor, no timer thread), on a real
PostgreSQL: when a batch is committed, when its messages are settled, and what a
conflict, an outage, a refused row and a crashing write do. The writer is a
stand-in that stores each message's seq in a table of its own."""

from __future__ import annotations

from types import SimpleNamespace

import psycopg
import pytest
from psycopg import errors

from harness import Later, RecordingLog, query, routed, wait_until
from hydrod.core.batcher import Batcher, Written
from hydrod.core.database import Database
from hydrod.metrics import Metrics


class SeqWriter:
    """Stores each item's seq; raises `failures` first; makes PostgreSQL refuse the seqs in
    `refused_by_db` (a real division by zero) and breaks on the ones in `crashes`."""

    def __init__(self, failures=(), refused_by_db=(), crashes=()):
        self.failures = list(failures)
        self.refused_by_db, self.crashes = set(refused_by_db), set(crashes)
        self.writes = 0

    def write(self, cur, items):
        self.writes += 1
        if self.failures:
            raise self.failures.pop(0)
        for item in items:
            if item.seq in self.crashes:
                raise ValueError(f"a bug on seq {item.seq}")
            if item.seq in self.refused_by_db:
                cur.execute("SELECT 1 / 0")
            cur.execute("INSERT INTO written (seq) VALUES (%s)", (item.seq,))
        return Written()


class Delays:
    def __init__(self):
        self.resets = 0

    def next_delay(self):
        return 0.5

    def reset(self):
        self.resets += 1
        return None


@pytest.fixture
def make_batcher(migrated):
    query(migrated, "CREATE TABLE written (seq int PRIMARY KEY)")
    opened = []

    def make(writer, dsn=migrated, batch_size=100, flush_interval=60.0):
        metrics, log, later = Metrics(), RecordingLog(), Later()
        db = Database("writer", dsn, (1, 1), metrics=metrics, log=log, timeout=2)
        opened.append(db)
        settled = []

        def settle(seqs):
            # What the broker is told: it must be committed already, as another connection sees it.
            settled.append((seqs, query(migrated, "SELECT count(*) FROM written WHERE seq = ANY(%s)",
                                        (list(seqs),))[0][0]))

        batcher = Batcher("writer", db, writer, settle=settle, retry_later=later, retry=Delays(), metrics=metrics,
                          log=log, batch_size=batch_size, flush_interval=flush_interval)
        return SimpleNamespace(batcher=batcher, settled=settled, later=later, log=log, metrics=metrics, db=db)

    yield make
    for db in opened:
        db.close()


def items(seqs):
    return [routed(seq, "hydro/gh-1/zn-1/nd-ph-a1b2c3d4e5f6/ph/telemetry", {"metric_type": "PH", "value": 6.0})
            for seq in seqs]


def written(dsn):
    return [row[0] for row in query(dsn, "SELECT seq FROM written ORDER BY seq")]


def test_a_full_batch_is_committed_at_once_and_settled_only_once_committed(make_batcher, migrated):
    t = make_batcher(SeqWriter(), batch_size=3)
    t.batcher.add(items([0, 1]))
    assert written(migrated) == [] and t.settled == []
    t.batcher.add(items([2]))
    assert written(migrated) == [0, 1, 2]
    assert t.settled == [((0, 1, 2), 3)]
    assert t.metrics.stored.labels("writer")._value.get() == 3


def test_a_batch_that_is_not_full_is_committed_once_its_oldest_message_waited_the_flush_interval(
        make_batcher, migrated):
    t = make_batcher(SeqWriter(), flush_interval=0.2)
    t.batcher.add(items([0]))
    t.batcher.due()
    assert written(migrated) == []
    wait_until(lambda: (t.batcher.due(), written(migrated))[1] == [0], what="the flush interval")
    assert t.settled == [((0,), 1)]


def test_a_deadlock_or_serialization_failure_is_retried_at_once_not_taken_for_an_outage(make_batcher, migrated):
    writer = SeqWriter([errors.DeadlockDetected("deadlock"), errors.SerializationFailure("serialize")])
    t = make_batcher(writer)
    t.batcher.add(items([0, 1, 2]))
    assert t.batcher.drain() == 3
    assert writer.writes == 3 and written(migrated) == [0, 1, 2]
    assert [seqs for seqs, _ in t.settled] == [(0, 1, 2)]
    assert t.db.ok and t.later.delays == [] and len(t.log.events("db_conflict_retried")) == 2


def test_a_conflict_that_persists_is_treated_as_an_outage_and_nothing_is_settled(make_batcher):
    t = make_batcher(SeqWriter([errors.DeadlockDetected("deadlock")] * 3))
    t.batcher.add(items([0, 1, 2]))
    assert t.batcher.drain() == 0
    assert t.settled == [] and len(t.batcher.pending) == 3
    assert not t.db.ok and t.later.delays == [0.5] and t.batcher.waiting_retry


def test_a_database_outage_keeps_the_batch_says_so_once_and_the_retry_stores_it(make_batcher, make_proxy,
                                                                                migrated, pg_server):
    proxy = make_proxy(pg_server.port, pg_server.host)
    t = make_batcher(SeqWriter(), dsn=migrated.replace(f":{pg_server.port}/", f":{proxy.port}/"), batch_size=2)
    t.batcher.add(items([0, 1]))
    assert written(migrated) == [0, 1]
    proxy.cut()
    t.batcher.add(items([2, 3]))
    t.batcher.add(items([4, 5]))  # waits for the retry: no second attempt, no second line
    assert [s for s, _ in t.settled] == [(0, 1)] and [i.seq for i in t.batcher.uncommitted()] == [2, 3, 4, 5]
    assert len(t.log.events("db_unavailable", level="error")) == 1 and t.later.delays == [0.5]
    assert t.metrics.db_up.labels("writer")._value.get() == 0
    proxy.restore()
    wait_until(lambda: (t.batcher.retry_now(), t.db.ok)[1], what="the retry to find the database back")
    assert written(migrated) == [0, 1, 2, 3, 4, 5] and [s for s, _ in t.settled] == [(0, 1), (2, 3), (4, 5)]
    assert t.metrics.db_up.labels("writer")._value.get() == 1
    assert len(t.log.events("db_recovered")) == 1 and t.batcher.pending == []


def test_a_row_postgresql_refuses_is_cornered_and_dead_lettered_and_the_rest_is_stored(make_batcher, migrated):
    t = make_batcher(SeqWriter(refused_by_db={5}))
    t.batcher.add(items(range(8)))
    assert t.batcher.drain() == 8
    assert written(migrated) == [0, 1, 2, 3, 4, 6, 7]
    assert sorted(seq for seqs, _ in t.settled for seq in seqs) == list(range(8))
    [(reason, detail, topic)] = query(migrated, "SELECT reason, detail, topic FROM dead_letters")
    assert reason == "store_refused" and detail == "division by zero (SQLSTATE 22012)"
    assert topic == items([5])[0].topic
    assert t.metrics.stored.labels("writer")._value.get() == 7
    assert t.metrics.rejected.labels("store_refused")._value.get() == 1


def test_a_message_that_breaks_the_write_is_dead_lettered_as_handler_crash_with_its_traceback_logged(
        make_batcher, migrated):
    t = make_batcher(SeqWriter(crashes={2}))
    t.batcher.add(items(range(4)))
    t.batcher.drain()
    assert written(migrated) == [0, 1, 3]
    assert query(migrated, "SELECT reason, detail FROM dead_letters") == [
        ("handler_crash", "ValueError('a bug on seq 2')")]
    assert t.log.events("handler_crash", exception=True)


def test_a_suspect_goes_alone_after_what_came_before_it(make_batcher, migrated):
    writer = SeqWriter()
    t = make_batcher(writer)
    t.batcher.add(items([0, 1]))
    t.batcher.add(items([2]), alone=True)
    assert [s for s, _ in t.settled] == [(0, 1), (2,)] and writer.writes == 2


def test_with_nothing_to_write_the_retry_asks_the_database_itself(make_batcher, make_proxy, migrated, pg_server):
    proxy = make_proxy(pg_server.port, pg_server.host)
    t = make_batcher(SeqWriter(), dsn=migrated.replace(f":{pg_server.port}/", f":{proxy.port}/"))
    proxy.cut()
    t.batcher.job(lambda cur: cur.execute("SELECT 1") and (lambda: None))
    assert not t.db.ok and t.later.delays == []  # nothing pending: the next round notices
    t.batcher.retry_now()
    assert not t.db.ok and t.later.delays == [0.5]  # asked, still away: try again later
    proxy.restore()
    wait_until(lambda: (t.batcher.retry_now(), t.db.ok)[1], what="the probe to find the database back")
    assert t.log.events("db_recovered")
