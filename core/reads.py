"""Reads: what the HTTP API reads from PostgreSQL, on a pool of its own.

Never through an actor on the ingest path: a listing waits for no batch, and no
batch waits for a listing. Reads are plain SELECTs, so a writer's row locks do
not hold them up either.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import ConnectionPool

from .. import store
from . import telemetry_query
from .telemetry_query import Series, TelemetryQuery
from .commands import read_command, read_node_commands

POOL_SIZE = (1, 2)  # (min, max): a few operators' requests at a time


class Reads:
    def __init__(self, pool: ConnectionPool, timeout: float = 5.0):
        self.pool = pool
        self.timeout = timeout  # for a connection; psycopg_pool.PoolTimeout past it

    def nodes(self) -> list[dict[str, Any]]:
        """Every node, by uid."""
        with self.pool.connection(timeout=self.timeout) as conn:
            return store.list_nodes(conn)

    def node(self, uid: str) -> dict[str, Any] | None:
        with self.pool.connection(timeout=self.timeout) as conn:
            found = store.list_nodes(conn, uid)
        return found[0] if found else None

    def telemetry(self, uid: str, query: TelemetryQuery) -> Series | None:
        """A node's points (SPEC §8); None for an unknown node."""
        with self.pool.connection(timeout=self.timeout) as conn:
            return telemetry_query.points(conn, uid, query)

    def telemetry_last(self, uid: str) -> list[dict[str, Any]] | None:
        """A node's latest value of each channel and metric; None for an unknown node."""
        with self.pool.connection(timeout=self.timeout) as conn:
            node = telemetry_query.node_id(conn, uid)
            return None if node is None else telemetry_query.latest(conn, node)
    def command(self, cmd_id: str) -> dict[str, Any] | None:
        """A command with its transitions (SPEC §7)."""
        with self.pool.connection(timeout=self.timeout) as conn:
            return read_command(conn, cmd_id)

    def node_commands(self, uid: str, limit: int) -> list[dict[str, Any]] | None:
        """A node's latest commands, newest first; None for an unknown node."""
        with self.pool.connection(timeout=self.timeout) as conn:
            return read_node_commands(conn, uid, limit)

    def close(self) -> None:
        self.pool.close(timeout=2)
