"""Database: one actor's own PostgreSQL pool, and what that actor knows of the database.

Every actor that uses PostgreSQL holds one. It says an outage once
(`db_unavailable`, error level) and the recovery once (`db_recovered`, with how
long it lasted), keeps `hydrod_db_up{actor}` true to it, and answers `Health`
from it. The pool opens in the background: start-up does not wait for
PostgreSQL, and a lost connection is reconnected for as long as it takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from .. import store


def open_pool(name: str, dsn: str, size: tuple[int, int],
              configure: Callable[[psycopg.Connection], None] | None = None) -> ConnectionPool:
    """A pool named `name`, opened in the background, reconnecting for as long as it takes."""
    pool = ConnectionPool(dsn, min_size=size[0], max_size=size[1], name=name, open=False,
                          configure=configure, reconnect_timeout=24 * 3600, kwargs={"connect_timeout": 5})
    pool.open(wait=False)
    return pool


class Database:
    def __init__(self, name: str, dsn: str, size: tuple[int, int], *, metrics, log,
                 configure: Callable[[psycopg.Connection], None] | None = None, timeout: float = 5.0):
        self.name = name
        self.metrics = metrics
        self.log = log
        self.timeout = timeout  # for a connection from the pool
        self.pool = open_pool(name, dsn, size, configure)
        self.ok = True  # until a failure says otherwise
        self._down_since: float | None = None
        metrics.db_up.labels(name).set(1)

    @contextmanager
    def transaction(self, timeout: float | None = None) -> Iterator[psycopg.Cursor]:
        """A pooled connection in a transaction: `with db.transaction() as cur: ...`."""
        with (self.pool.connection(timeout=self.timeout if timeout is None else timeout) as conn,
              conn.transaction(), conn.cursor() as cur):
            yield cur

    def down(self, error: BaseException, **fields: Any) -> None:
        """The database failed us: said once per outage, with `fields` (what was being done)."""
        if self.ok:
            self.ok = False
            self._down_since = time.monotonic()
            self.metrics.db_up.labels(self.name).set(0)
            self.log.error("db_unavailable", error=store.error_line(error), **fields)

    def up(self) -> None:
        """The database answered: said once, when it had been away."""
        if not self.ok:
            self.ok = True
            self.metrics.db_up.labels(self.name).set(1)
            self.log.info("db_recovered", outage_s=round(time.monotonic() - (self._down_since or 0.0), 3))
            self._down_since = None

    def probe(self) -> bool:
        """Ask the database directly (nothing to write, but it was away); True when it answers."""
        try:
            with self.transaction() as cur:
                cur.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            self.down(exc)
            return False
        self.up()
        return True

    def health(self) -> tuple[bool, str]:
        return self.ok, "database reachable" if self.ok else "database unreachable"

    def close(self) -> None:
        self.pool.close(timeout=2)
