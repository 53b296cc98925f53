"""HttpApi: the operators' HTTP API (SPEC §6), served by Werkzeug on its own threads.

The actor owns the server's lifecycle. Request threads only ask the other
actors, each ask with a timeout, and turn the answers into JSON.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import pykka
import structlog
from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from .. import protocol
from ..settings import HttpSettings
from .base import ActorUnavailable, Address, Context, Health, SupervisedActor
from .config_publisher import PushConfig, PushRefused
from .node_registry import ListNodes

MAX_BODY = 256 * 1024


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

    def __init__(self, peers: Peers, metrics, token: str, ask_timeout: float):
        self.peers = peers
        self.metrics = metrics
        self.token = token
        self.ask_timeout = ask_timeout
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
            if endpoint in ("nodes", "node", "push") and not self._authorised(request):
                response = _json({"error": "missing or wrong bearer token"}, 401)
                response.headers["WWW-Authenticate"] = "Bearer"
            else:
                response = getattr(self, f"on_{endpoint}")(request, **args)
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
        checks, failing = {}, []
        # An actor that answers "not ok" names the resource it owns; one that does
        # not answer is named itself.
        resource = {self.peers.mqtt.name: "mqtt", self.peers.db_writer.name: "database",
                    self.peers.registry.name: "database", self.peers.config_publisher.name: "database"}
        for address in self.peers.all:
            try:
                ok, detail = address.ask(Health(), min(self.ask_timeout, 2.0))
                part = resource.get(address.name, address.name)
            except (ActorUnavailable, pykka.Timeout) as exc:
                ok, detail, part = False, f"actor not answering: {exc or 'timed out'}", address.name
            checks[address.name] = {"ok": ok, "detail": detail}
            if not ok and part not in failing:
                failing.append(part)
        status = 200 if not failing else 503
        return _json({"status": "ok" if status == 200 else "failing", "failing": failing, "checks": checks},
                     status)

    def on_metrics(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), mimetype="text/plain; version=0.0.4")


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
    return Response(json.dumps(data, default=_encode), status=status, mimetype="application/json")


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


class HttpApi(SupervisedActor):
    def __init__(self, context: Context, *, settings: HttpSettings, peers: Peers, metrics, ask_timeout: float):
        super().__init__(context)
        self.settings = settings
        self.app = Api(peers, metrics, settings.token.get_secret_value(), ask_timeout)
        self._server = None
        self._thread: threading.Thread | None = None

    def on_start(self) -> None:
        # Binding fails here, loudly, if the port is taken. Werkzeug reports that
        # with sys.exit(), which pykka would take as "stop every actor".
        try:
            self._server = make_server(self.settings.host, self.settings.port, self.app, threaded=True)
        except SystemExit:
            raise OSError(f"cannot listen on {self.settings.host}:{self.settings.port} "
                          "(address in use or not available)") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"{self.ctx.name}-server",
                                        daemon=True)
        self._thread.start()
        self.log.info("http_listening", host=self.settings.host, port=self._server.server_port)

    def release(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def handle(self, message: Any) -> Any:
        match message:
            case Health():
                return self._thread is not None and self._thread.is_alive(), "serving"
            case _:
                raise TypeError(f"HttpApi does not handle {type(message).__name__}")
