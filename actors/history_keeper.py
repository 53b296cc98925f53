"""HistoryKeeperActor: runs core.partitions.HistoryKeeper at start-up and every hour.

An actor of its own, with its own connection, because dropping a day of raw
samples waits for the transactions that use telemetry_samples: the history
writer goes on writing meanwhile. A round that fails is logged and counted, and
the next one comes an hour later all the same (the Ticker only sends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from .. import store
from ..core.partitions import HistoryKeeper
from ..settings import HistorySettings
from ..core.timers import Ticker
from .messages import Health, HealthReport
from .supervised import SupervisedActor

INTERVAL_S = 3600.0
# A round that would wait longer than this on another session's lock gives up
# until the next one (a pruning stopped half-way is finished by the next round).
LOCK_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class KeepHistory:
    """Start-up and Ticker: one round of partitions ahead and retention."""


class HistoryKeeperActor(SupervisedActor):
    def __init__(self, context, *, dsn: str, settings: HistorySettings, metrics, interval_s: float = INTERVAL_S):
        super().__init__(context)
        self._dsn = dsn
        self.keeper = HistoryKeeper(settings)
        self.metrics = metrics
        self.interval_s = interval_s
        self._ok: tuple[bool, str] = (True, "no round yet")
        self._ticker: Ticker | None = None

    def on_start(self) -> None:
        self.ctx.address.tell(KeepHistory())
        self._ticker = Ticker(self.ctx.name, self.ctx.address, KeepHistory(), self.interval_s).start()

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None

    def handle(self, message: Any) -> Any:
        match message:
            case KeepHistory():
                self._round()
            case Health():
                return HealthReport(*self._ok)
            case _:
                raise TypeError(f"{self.ctx.name} does not handle {type(message).__name__}")
        return None

    def _round(self) -> None:
        try:
            with store.connect(self._dsn) as conn:
                conn.autocommit = True
                conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                done = self.keeper.run(conn)
        except psycopg.Error as exc:
            # Not a health failure: writes go on, and the next round tries again.
            self._ok = (True, "last round failed")
            self.metrics.history_prune_failures.inc()
            self.log.error("history_prune_failed", error=store.error_line(exc), sqlstate=exc.sqlstate,
                           next_in_s=self.interval_s)
            return
        self._ok = (True, "last round done")
        s = self.keeper.settings
        self.metrics.history_prunings.inc()
        self.metrics.history_partitions_dropped.inc(len(done.partitions_dropped))
        for table, rows in done.rollup_rows_deleted.items():
            self.metrics.history_rollup_rows_deleted.labels(table).inc(rows)
        self.log.info("history_pruned", partitions_dropped=list(done.partitions_dropped),
                      partitions_made=done.partitions_made, rollup_rows_deleted=done.rollup_rows_deleted,
                      raw_days=s.raw_days, rollup_days={"1m": s.rollup_1m_days, "1h": s.rollup_1h_days,
                                                        "1d": s.rollup_1d_days},
                      took_s=round(done.seconds, 3))
