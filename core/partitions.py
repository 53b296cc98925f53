"""History upkeep (SPEC §8): the day partitions ahead of time, and retention.

Plain and synchronous: `HistoryKeeper.run(conn)` does one round on an autocommit
connection. The actor (actors/history_keeper.py) runs it at start-up and hourly.
The partitions a sample needs are also made on demand, in the write itself
(store.ensure_partitions), so a round that fails or runs late never costs a sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psycopg

from .. import store
from ..settings import HistorySettings

# Today and the next days: a day's partition exists well before its first sample.
AHEAD_DAYS = 3


@dataclass(frozen=True)
class Pruning:
    """What one round did."""
    partitions_made: int
    partitions_dropped: tuple[str, ...]
    rollup_rows_deleted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class HistoryKeeper:
    def __init__(self, settings: HistorySettings):
        self.settings = settings

    def run(self, conn: psycopg.Connection) -> Pruning:
        """Make the partitions ahead; drop raw days older than raw_days, whole
        partitions at a time; delete rollup buckets older than their retention."""
        started = time.perf_counter()
        s = self.settings
        with conn.transaction(), conn.cursor() as cur:
            made = store.make_partitions_ahead(cur, AHEAD_DAYS)
        # Each DETACH commits twice: no round waits for the WAL to reach the disk each
        # time. A crash may undo the last steps; the next round does them again.
        conn.execute("SET synchronous_commit = off")
        expired = store.expired_partitions(conn, s.raw_days) if s.raw_days else []
        store.drop_partitions(conn, expired)
        dropped = [name for name, _ in expired]
        deleted = {table: store.prune_rollup(conn, table, days)
                   for table, days in zip(store.ROLLUP_TABLES, (s.rollup_1m_days, s.rollup_1h_days, s.rollup_1d_days))
                   if days}
        return Pruning(made, tuple(dropped), deleted, time.perf_counter() - started)
