"""HttpApi: the operators' HTTP API (SPEC §6), served by waitress.

The actor owns the server: one thread runs waitress's event loop, which holds
the connections, and `http.threads` workers run the requests. Workers only ask
the other actors, each ask with a timeout, and turn the answers into JSON.

HTTP clients can never take the file descriptors that the broker link and the
database pools need: at most min(http.connection_limit, the soft RLIMIT_NOFILE
- RESERVED_FDS) connections are open at once. When every slot is taken, the
connection idle the longest is closed to make room for the new one (as nginx
reuses idle keep-alive connections), so idle clients cannot lock out the
others; an idle connection is closed after IDLE_TIMEOUT_S anyway. waitress
reads a whole request body (at most MAX_BODY, chunked or not) before the
application sees the request, and an error answer closes the connection.
"""

from __future__ import annotations

import errno
import hmac
import json
import math
import re
import resource
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pykka
import structlog
from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from .. import protocol
from ..settings import HttpSettings
from .base import ActorUnavailable, Address, Context, Health, SupervisedActor
from .config_publisher import PushConfig, PushRefused
from .node_registry import ListNodes

MAX_BODY = 256 * 1024
# File descriptors kept for everything but HTTP connections: stdio, the broker
# link, the database pools (also while they reconnect), the server's own.
RESERVED_FDS = 100
IDLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Peers:
    """The actors the API asks, by role."""

    registry: Address
    config_publisher: Address
    db_writer: Address
    mqtt: Address
    all: tuple[Address, ...]


class Api:
    """The WSGI application: plain, testable without the actor."""

    def __init__(self, peers: Peers, metrics, token: str, ask_timeout: float, stall_after_s: float):
        self.peers = peers
        self.metrics = metrics
        self.token = token
        self.ask_timeout = ask_timeout
        self.stall_after_s = stall_after_s
        self.urls = Map([
            Rule("/api/nodes", endpoint="nodes", methods=["GET"]),
            Rule("/api/nodes/<uid>", endpoint="node", methods=["GET"]),
            Rule("/api/nodes/<uid>/config", endpoint="push", methods=["POST"]),
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
        if endpoint in ("nodes", "node", "push") and not self._authorised(request):
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
        return _json(self.peers.registry.ask(ListNodes(), self.ask_timeout))

    def on_node(self, request: Request, uid: str) -> Response:
        if not _UID.fullmatch(uid):
            raise NotFound(f"no node with uid {uid!r}")
        found = self.peers.registry.ask(ListNodes(uid), self.ask_timeout)
        if not found:
            raise NotFound(f"no node with uid {uid}")
        return _json(found[0])

    def on_push(self, request: Request, uid: str) -> Response:
        if not _UID.fullmatch(uid):
            raise NotFound(f"no node with uid {uid!r}")
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
            return _json({"error": "body contains a NUL character (\\u0000), which a config cannot carry"}, 400)
        try:
            result = self.peers.config_publisher.ask(
                PushConfig(uid, body, deadline=time.monotonic() + self.ask_timeout - 0.2), self.ask_timeout)
        except PushRefused as exc:
            return _json({"error": exc.message}, exc.status)
        return _json({"node_uid": result.node_uid, "version": result.version, "topic": result.topic,
                      "status": result.status}, 202)

    def on_healthz(self, request: Request) -> Response:
        """Failing: an actor being restarted or stalled on one message, or the resource
        an actor owns, as the actor last saw it. Asks no one: a busy actor is working."""
        checks, failing = {}, []
        resource = {self.peers.mqtt.name: "mqtt", self.peers.db_writer.name: "database",
                    self.peers.registry.name: "database", self.peers.config_publisher.name: "database"}
        now = time.monotonic()
        for address in self.peers.all:
            busy_since, handling = address.busy_since, address.handling
            busy_s = None if busy_since is None else now - busy_since
            part = address.name
            if address.ref is None:
                ok, detail = False, "restarting or stopped"
            elif busy_s is not None and busy_s > self.stall_after_s:
                ok, detail = False, f"stalled: on one {handling} for {busy_s:.1f} s"
            else:
                ok, detail = address.health or (True, "running")
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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


class _Request(Request):
    max_content_length = MAX_BODY  # Werkzeug answers 413 past it, with or without Content-Length


_UID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # anything else names no node
_log = structlog.get_logger("hydrod", actor="http_api")


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(without_secrets(data), default=_encode), status=status, mimetype="application/json")


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


# --- the server ----------------------------------------------------------------------


class _Task(WSGITask):
    """An error answer closes the connection: a client in trouble starts afresh."""

    def build_response_header(self):
        if not self.status.startswith(("1", "2", "3")):
            self.set_close_on_finish()
        return super().build_response_header()


class _ErrorTask(ErrorTask):
    """waitress's own refusals (a body too large, a malformed request), in JSON like the API's."""

    def execute(self):
        error = self.request.error
        message = (f"body too large: over {MAX_BODY} bytes" if error.code == 413
                   else f"{error.reason.lower()}: {error.body}")
        body = json.dumps({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    task_class = _Task
    error_task_class = _ErrorTask


class _Workers(ThreadedTaskDispatcher):
    """waitress's worker threads, named after the actor."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def start_new_thread(self, target, thread_no):
        threading.Thread(target=target, args=(thread_no,), name=f"{self.name}-worker-{thread_no}",
                         daemon=True).start()


class _Server(TcpWSGIServer):
    """waitress's server, with room made for a new connection when every slot is taken."""

    channel_class = _Channel

    def __init__(self, app, *, slots: int, on_shed, **kwargs):
        self.slots = slots
        self.on_shed = on_shed
        super().__init__(app, **kwargs)

    def handle_accept(self):
        # Runs on the event loop's thread, like waitress's own maintenance().
        open_channels = [c for c in list(self.active_channels.values()) if not c.will_close]
        if len(open_channels) >= self.slots:
            idle = [c for c in open_channels if not c.requests]
            if idle:
                min(idle, key=lambda c: c.last_activity).will_close = True
                self.on_shed()
            # All busy: waitress's connection_limit stops accepting until one is done.
        super().handle_accept()


def connection_slots(configured: int) -> int:
    """HTTP connections allowed at once: what is configured, within the file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - RESERVED_FDS))


class HttpApi(SupervisedActor):
    def __init__(self, context: Context, *, settings: HttpSettings, peers: Peers, metrics, ask_timeout: float,
                 stall_after_s: float):
        super().__init__(context)
        self.settings = settings
        self.metrics = metrics
        self.app = Api(peers, metrics, settings.token.get_secret_value(), ask_timeout, stall_after_s)
        self._server: _Server | None = None
        self._workers: _Workers | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._shed_logged = -math.inf

    def on_start(self) -> None:
        host, port = self.settings.host, self.settings.port
        slots = connection_slots(self.settings.connection_limit)
        workers = _Workers(self.ctx.name)
        sockets: dict = {}
        try:
            # Binding fails here, loudly, if the port is taken.
            self._server = _Server(
                self.app, map=sockets, dispatcher=workers, slots=slots, on_shed=self._shed,
                host=host, port=port, ident="hydrod", max_request_body_size=MAX_BODY,
                # Past `slots`: the listener, the wake-up pipe, and connections being closed.
                connection_limit=slots + 4, channel_timeout=IDLE_TIMEOUT_S, cleanup_interval=1,
                asyncore_use_poll=True)  # select() cannot watch descriptors past 1023
        except (OSError, ValueError) as exc:
            wasyncore.close_all(sockets)
            why = "address in use" if getattr(exc, "errno", None) == errno.EADDRINUSE else str(exc)
            raise OSError(f"cannot listen on {host}:{port}: {why}") from None
        workers.set_thread_count(self.settings.threads)
        self._workers = workers
        self._thread = threading.Thread(target=self._serve, args=(sockets,), name=f"{self.ctx.name}-server",
                                        daemon=True)
        self._thread.start()
        self.log.info("http_listening", host=host, port=int(self._server.effective_port), connection_limit=slots,
                      threads=self.settings.threads)

    def _serve(self, sockets: dict) -> None:
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=1.0, map=sockets, use_poll=True, count=1)
        finally:
            wasyncore.close_all(sockets)  # on this thread, which owns the sockets

    def _shed(self) -> None:
        self.metrics.http_connections_shed.inc()
        now = time.monotonic()
        if now - self._shed_logged >= 60:
            self._shed_logged = now
            self.log.warning("http_connections_shed", connection_limit=self._server.slots,
                             detail="every connection slot was taken: the connection idle the longest was closed "
                                    "(each one counted in hydrod_http_connections_shed_total)")

    def release(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        try:
            self._server.pull_trigger()  # wakes the loop at once
        except OSError:
            pass  # the loop has stopped and closed it already
        self._thread.join(5)
        self._workers.shutdown(timeout=5)
        self._server = None

    def handle(self, message: Any) -> Any:
        match message:
            case Health():
                return self._thread is not None and self._thread.is_alive(), "serving"
            case _:
                raise TypeError(f"HttpApi does not handle {type(message).__name__}")
