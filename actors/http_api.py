"""HttpApi: the operators' HTTP API (SPEC §6).

The actor owns the server (http_server.py: waitress, with bounded connections
and workers) and the read pool (core/reads.py). Its workers run the WSGI
application below, which reads nodes on that pool, asks the config publisher
for pushes (with a timeout), and turns the answers into JSON.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pykka
import structlog
from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from .. import protocol
from ..core import page, telemetry_query
from ..core.commands import CommandRefused
from ..core.configs import PushRefused
from ..core.database import open_pool
from ..core.reads import POOL_SIZE, Reads
from ..core.telemetry_query import BadQuery
from ..settings import HttpSettings
from .address import ActorUnavailable, Address
from .messages import Health, HealthReport
from .supervised import Context, SupervisedActor
from .config_publisher import push_config
from .commands import CreateCommand
from .http_server import MAX_BODY, HttpServer


@dataclass(frozen=True)
class Peers:
    """The actors the API asks (or, for /healthz, reads the state of), by role."""

    registry: Address
    config_publisher: Address
    commands: Address
    db_writer: Address
    mqtt: Address
    all: tuple[Address, ...]


class Api:
    """The WSGI application: plain, testable without the actor."""

    def __init__(self, peers: Peers, reads: Reads, metrics, token: str, ask_timeout: float, stall_after_s: float):
        self.peers = peers
        self.reads = reads
        self.metrics = metrics
        self.token = token
        self.ask_timeout = ask_timeout
        self.stall_after_s = stall_after_s
        self.urls = Map([
            Rule("/api/nodes", endpoint="nodes", methods=["GET"]),
            Rule("/api/nodes/<uid>", endpoint="node", methods=["GET"]),
            Rule("/api/nodes/<uid>/config", endpoint="push", methods=["POST"]),
            Rule("/api/nodes/<uid>/telemetry", endpoint="telemetry", methods=["GET"]),
            Rule("/api/nodes/<uid>/telemetry/last", endpoint="telemetry_last", methods=["GET"]),
            Rule("/", endpoint="page", methods=["GET"]),
            Rule("/static/<name>", endpoint="static", methods=["GET"]),
            Rule("/api/nodes/<uid>/commands", endpoint="command", methods=["POST"]),
            Rule("/api/nodes/<uid>/commands", endpoint="commands", methods=["GET"]),
            Rule("/api/commands/<cmd_id>", endpoint="command_status", methods=["GET"]),
            Rule("/healthz", endpoint="healthz", methods=["GET"]),
            Rule("/metrics", endpoint="metrics", methods=["GET"]),
        ])

    def __call__(self, environ, start_response):
        request = _Request(environ)
        try:
            endpoint, args = self.urls.bind_to_environ(environ).match()
            response = self._refusal(request, endpoint) or getattr(self, f"on_{endpoint}")(request, **args)
        except HTTPException as exc:
            response = _json({"error": exc.description}, exc.code)
        except (ActorUnavailable, pykka.Timeout) as exc:
            response = _json({"error": f"hydrod is busy or restarting: {exc or 'timed out'}"}, 503)
        except psycopg.OperationalError as exc:
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            response = _json({"error": f"database unavailable: {first_line}"}, 503)
        except Exception:  # a bug: answer in JSON, keep the traceback in the log
            _log.exception("http_request_failed", path=request.path, method=request.method)
            response = _json({"error": "internal error; see hydrod's log (event http_request_failed)"}, 500)
        return response(environ, start_response)

    def _refusal(self, request: Request, endpoint: str) -> Response | None:
        """The answer to a request that may not go on, or None."""
        changes = request.method not in ("GET", "HEAD", "OPTIONS")
        if changes and not _same_origin(request):
            # A web page the grower opens must not push configs, token or not.
            return _json({"error": f"cross-origin request refused: Origin {request.headers['Origin']!r} "
                                   f"is not this API's own ({request.host})"}, 403)
        if endpoint not in OPEN and not self._authorised(request):
            response = _json({"error": "missing or wrong bearer token"}, 401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if changes and request.mimetype != "application/json":
            # text/plain and form bodies are what a browser sends cross-site without asking.
            return _json({"error": f"Content-Type must be application/json, not {request.mimetype or 'none'!r}"},
                         415)
        return None

    def _authorised(self, request: Request) -> bool:
        if not self.token:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def on_nodes(self, request: Request) -> Response:
        return _json(self.reads.nodes())

    def on_node(self, request: Request, uid: str) -> Response:
        if not protocol.is_segment(uid):  # anything else names no node
            raise NotFound(f"no node with uid {uid!r}")
        found = self.reads.node(uid)
        if found is None:
            raise NotFound(f"no node with uid {uid}")
        return _json(found)

    def on_push(self, request: Request, uid: str) -> Response:
        if not protocol.is_segment(uid):  # anything else names no node
            raise NotFound(f"no node with uid {uid!r}")
        body = _body(request, "a config")
        if isinstance(body, Response):
            return body
        try:
            result = push_config(self.peers.config_publisher, uid, body, self.ask_timeout)
        except PushRefused as exc:
            return _json({"error": exc.message}, exc.status)
        return _json({"node_uid": result.node_uid, "version": result.version, "topic": result.topic,
                      "status": result.status}, 202)

    def on_telemetry(self, request: Request, uid: str) -> Response:
        try:
            query = telemetry_query.parse_query(request.args)
            series = self.reads.telemetry(uid, query) if protocol.is_segment(uid) else None
        except BadQuery as exc:
            return _json({"error": exc.message, "parameter": exc.parameter}, 400)
        if series is None:
            raise NotFound(f"no node with uid {uid}")
        head = json.dumps({"node_uid": uid, "metric": query.metric, "channel": series.channel,
                           "from": _utc(query.start), "to": _utc(query.end), "step": series.step})
        # The points as PostgreSQL wrote them: numbers and times under fixed keys.
        body = f'{head[:-1]}, "points": {series.points_json}}}'
        return Response(body, mimetype="application/json")

    def on_telemetry_last(self, request: Request, uid: str) -> Response:
        found = self.reads.telemetry_last(uid) if protocol.is_segment(uid) else None
        if found is None:
            raise NotFound(f"no node with uid {uid}")
        return _json({"node_uid": uid, "values": found})

    def on_page(self, request: Request) -> Response:
        return page.response(request, "index.html")

    def on_static(self, request: Request, name: str) -> Response:
        return page.response(request, name)
    def on_command(self, request: Request, uid: str) -> Response:
        if not protocol.is_segment(uid):
            raise NotFound(f"no node with uid {uid!r}")
        body = _body(request, "a command")
        if isinstance(body, Response):
            return body
        try:
            summary, created = self.peers.commands.ask(
                CreateCommand(uid, body, deadline=time.monotonic() + self.ask_timeout - 0.2), self.ask_timeout)
        except CommandRefused as exc:
            return _json({"error": exc.message}, exc.status)
        return _json(summary, 202 if created else 200)

    def on_commands(self, request: Request, uid: str) -> Response:
        if not protocol.is_segment(uid):
            raise NotFound(f"no node with uid {uid!r}")
        limit = request.args.get("limit", "50")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            return _json({"error": "`limit` must be a whole number from 1 to 1000"}, 400)
        found = self.reads.node_commands(uid, int(limit))
        if found is None:
            raise NotFound(f"no node with uid {uid}")
        return _json(found)

    def on_command_status(self, request: Request, cmd_id: str) -> Response:
        found = self.reads.command(cmd_id) if protocol.is_segment(cmd_id) else None
        if found is None:
            raise NotFound(f"no command with cmd_id {cmd_id!r}")
        return _json(found)

    def on_healthz(self, request: Request) -> Response:
        """Failing: an actor being restarted or stalled on one message, or the resource
        an actor owns, as the actor last saw it. Asks no one: a busy actor is working."""
        checks, failing = {}, []
        resource = {self.peers.mqtt.name: "mqtt", self.peers.db_writer.name: "database",
                    self.peers.registry.name: "database", self.peers.config_publisher.name: "database",
                    self.peers.commands.name: "database"}
        now = time.monotonic()
        for address in self.peers.all:
            busy_since, handling = address.busy_since, address.handling
            busy_s = None if busy_since is None else now - busy_since
            part = address.name
            stuck = address.not_progressing(self.stall_after_s, now)
            if stuck is not None:
                ok, detail = False, stuck
            else:
                ok, detail = (address.health.ok, address.health.detail) if address.health else (True, "running")
                part = resource.get(address.name, address.name)
                if busy_s is not None:
                    detail = f"{detail}; busy with {handling} for {busy_s:.1f} s"
            checks[address.name] = {"ok": ok, "detail": detail}
            if not ok and part not in failing:
                failing.append(part)
        status = 200 if not failing else 503
        return _json({"status": "ok" if status == 200 else "failing", "failing": failing, "checks": checks},
                     status)

    def on_metrics(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), mimetype="text/plain; version=0.0.4")


def _same_origin(request: Request) -> bool:
    """True when the request names no Origin (curl, hydrod's CLI: not a browser), or
    names the host and port it was sent to (its Host header). The scheme is not
    compared, so that a TLS proxy in front of hydrod works."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    theirs, ours = urlsplit(origin), urlsplit(f"//{request.host}")
    default = {"http": 80, "https": 443}.get(theirs.scheme)
    try:
        return (default is not None and theirs.hostname is not None and theirs.hostname == ours.hostname
                and (theirs.port or default) == (ours.port or default))
    except ValueError:  # a port that is not a number
        return False


# Keys whose values are secrets, wherever they are in an answer: nodes echo their
# broker and wifi credentials in the config they report.
SECRET_KEYS = frozenset({"node_secret", "secret", "password", "passwd", "pass", "pwd", "psk", "token",
                         "api_key", "apikey", "private_key", "key_password"})
SECRET_WORDS = ("secret", "password", "passwd", "token", "psk")


def is_secret(key: str) -> bool:
    key = key.lower()
    return key in SECRET_KEYS or any(word in key for word in SECRET_WORDS)


def without_secrets(data: Any) -> Any:
    """A copy of `data` without any secret key, at any depth (no recursion: a
    node's reported config can nest deeply)."""
    top = [data]
    todo: list[tuple[Any, Any]] = [(top, 0)]
    while todo:
        parent, index = todo.pop()
        value = parent[index]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if not (isinstance(k, str) and is_secret(k))}
            todo.extend((value, k) for k in value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
            todo.extend((value, i) for i in range(len(value)))
        else:
            continue
        parent[index] = value
    return top[0]


def _body(request: Request, what: str) -> Any:
    """The request's JSON body, or the error Response (400, 413) saying what is wrong."""
    try:
        raw = request.get_data(cache=False) or b"null"
    except RequestEntityTooLarge:  # chunked or not
        return _json({"error": f"body too large: over {MAX_BODY} bytes"}, 413)
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError) as exc:
        return _json({"error": f"body is not JSON: {exc}"}, 400)
    except RecursionError:
        return _json({"error": "body is not JSON: nested too deeply"}, 400)
    if protocol.holds_nul(body):
        return _json({"error": f"body contains a NUL character (\\u0000), which {what} cannot carry"}, 400)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


class _Request(Request):
    max_content_length = MAX_BODY  # Werkzeug answers 413 past it, with or without Content-Length


_log = structlog.get_logger("hydrod", actor="http_api")


# Served without the bearer token: probes, and the page and its files, which hold no
# data (the page's own requests to the API carry the token).
OPEN = frozenset({"healthz", "metrics", "page", "static"})


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(without_secrets(data), default=_encode), status=status, mimetype="application/json")


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


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
        self._api = dict(peers=peers, metrics=metrics, token=settings.token.get_secret_value(),
                         ask_timeout=ask_timeout, stall_after_s=stall_after_s)
        self.reads: Reads | None = None
        self.server: HttpServer | None = None
        self._shed_logged = -math.inf

    def on_start(self) -> None:
        self.reads = Reads(open_pool("reads", self._dsn, POOL_SIZE), timeout=self._api["ask_timeout"])
        self.app = Api(reads=self.reads, **self._api)
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
