"""HttpApi: the shell of core/api.py, the operators' HTTP API (SPEC §6).

The actor owns the server (core/http_server.py: waitress, with bounded
connections and workers) and the read pool (core/reads.py). The server's
workers run the WSGI application, core/api.Api, which reaches the actors
through the Backend built here: pushes and commands are asks to the config
publisher and the commands actor, with a timeout; /healthz reads the actors'
addresses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pykka

from ..core.api import Api, Backend, Unavailable
from ..core.configs import PushResult
from ..core.database import open_pool
from ..core.http_server import HttpServer
from ..core.reads import POOL_SIZE, Reads
from ..settings import HttpSettings
from .address import ActorUnavailable, Address
from .messages import Health, HealthReport
from .supervised import Context, SupervisedActor
from .commands import CreateCommand
from .config_publisher import push_config


@dataclass(frozen=True)
class Peers:
    """The actors the API asks (or, for /healthz, reads the state of), by role."""

    registry: Address
    config_publisher: Address
    commands: Address
    db_writer: Address
    mqtt: Address
    all: tuple[Address, ...]

    def backend(self, ask_timeout: float) -> Backend:
        def push(uid: str, body: Any) -> PushResult:
            with _asking():
                return push_config(self.config_publisher, uid, body, ask_timeout)

        def create_command(uid: str, body: Any) -> tuple[dict[str, Any], bool]:
            with _asking():
                return self.commands.ask(
                    CreateCommand(uid, body, deadline=time.monotonic() + ask_timeout - 0.2), ask_timeout)

        resources = {self.mqtt.name: "mqtt", self.db_writer.name: "database", self.registry.name: "database",
                     self.config_publisher.name: "database", self.commands.name: "database"}
        return Backend(push_config=push, create_command=create_command, actors=self.all, resources=resources)


@contextmanager
def _asking() -> Iterator[None]:
    """An actor being restarted, or one that does not answer in time, is Unavailable to the API."""
    try:
        yield
    except (ActorUnavailable, pykka.Timeout) as exc:
        raise Unavailable(str(exc) or "timed out") from exc


@dataclass(frozen=True)
class _ServerStopped:
    """From a server's event loop thread: it ended on an error."""

    server: HttpServer
    error: str


class HttpApi(SupervisedActor):
    def __init__(self, context: Context, *, settings: HttpSettings, dsn: str, peers: Peers, metrics,
                 ask_timeout: float, stall_after_s: float):
        super().__init__(context)
        self.settings = settings
        self.metrics = metrics
        self._dsn = dsn
        self._ask_timeout = ask_timeout
        self._api = dict(backend=peers.backend(ask_timeout), metrics=metrics,
                         token=settings.token.get_secret_value(), stall_after_s=stall_after_s)
        self.reads: Reads | None = None
        self.server: HttpServer | None = None
        self._shed_logged = -math.inf

    def on_start(self) -> None:
        self.reads = Reads(open_pool("reads", self._dsn, POOL_SIZE), timeout=self._ask_timeout)
        self.app = Api(reads=self.reads, log=self.log, **self._api)
        # Binding fails here, loudly, if the port is taken.
        self.server = HttpServer(self.ctx.name, self.app, host=self.settings.host, port=self.settings.port,
                                 connection_limit=self.settings.connection_limit, threads=self.settings.threads,
                                 on_shed=self._shed, on_failed=self._server_failed)
        self.server.start()
        self.log.info("http_listening", host=self.settings.host, port=self.server.port,
                      connection_limit=self.server.slots, threads=self.settings.threads)

    def _server_failed(self, server: HttpServer, error: BaseException) -> None:
        # On the server's thread: the actor fails in its own, and is restarted.
        self.ctx.address.tell(_ServerStopped(server, repr(error)))

    def _shed(self) -> None:
        # On the server's thread.
        self.metrics.http_connections_shed.inc()
        now = time.monotonic()
        if now - self._shed_logged >= 60:
            self._shed_logged = now
            self.log.warning("http_connections_shed", connection_limit=self.server.slots,
                             detail="every connection slot was taken: the connection idle the longest was closed "
                                    "(each one counted in hydrod_http_connections_shed_total)")

    def release(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.reads is not None:
            self.reads.close()
            self.reads = None

    def handle(self, message: Any) -> Any:
        match message:
            case Health():
                alive = self.server is not None and self.server.alive
                return HealthReport(alive, "serving" if alive else "not serving")
            case _ServerStopped(server, error) if server is self.server:
                raise RuntimeError(f"the HTTP server stopped: {error}")
            case _ServerStopped():
                return None  # replayed to a new incarnation, which has its own server
            case _:
                raise TypeError(f"HttpApi does not handle {type(message).__name__}")
