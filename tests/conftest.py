"""Shared fixtures: a private Mosquitto per test, a PostgreSQL server per session
with a fresh database per test, TCP proxies and hydrod subprocesses that are
always cleaned up. The machinery is in harness.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon, Mosquitto, PgServer, TcpProxy, running_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started private broker: .port, .stop(), .kill(), .restart()."""
    with running_broker(tmp_path / "mosquitto") as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """127.0.0.1:5432 when it lets us create databases, else a private cluster."""
    server = PgServer.find_or_start()
    try:
        yield server
    finally:
        server.stop_private()


@pytest.fixture
def database(pg_server: PgServer) -> Iterator[str]:
    """The DSN of a new, empty database, dropped after the test."""
    name = pg_server.create_database()
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def migrated(database: str) -> str:
    """`database` with hydrod's schema: for the plain classes in core/, driven without a daemon."""
    import psycopg

    from hydrod import store
    with psycopg.connect(database) as conn:
        store.migrate(conn)
    return database


@pytest.fixture
def make_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """make_proxy(target_port, target_host="127.0.0.1") -> TcpProxy, closed after the test."""
    proxies: list[TcpProxy] = []

    def make(target_port: int, target_host: str = "127.0.0.1") -> TcpProxy:
        proxy = TcpProxy(target_port, target_host)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def make_daemon(tmp_path: Path, broker: Mosquitto, database: str) -> Iterator[Callable[..., Daemon]]:
    """make_daemon(start=True, env=None, args=(), command=None, **sections) -> Daemon.

    Each keyword is a config section merged over the fast test defaults, e.g.
    make_daemon(telemetry={"batch_size": 10}, mqtt={"port": proxy.port}).
    Defaults point at this test's `broker` and `database`. Every daemon still
    running at teardown is killed."""
    daemons: list[Daemon] = []

    def make(start: bool = True, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
             command: list[str] | None = None, **sections: dict[str, Any]) -> Daemon:
        daemon = Daemon(tmp_path / f"hydrod-{len(daemons)}", broker.port, database,
                        sections, env=env, args=args, command=command)
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for number, daemon in enumerate(daemons):
        daemon.cleanup()
        # Shown by pytest only when the test fails.
        print(f"--- hydrod #{number} (exit {daemon.proc and daemon.proc.returncode}) "
              f"last lines ---\n{daemon.tail(80)}")
