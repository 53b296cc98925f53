"""Api: the operators' HTTP API (SPEC §6), a plain WSGI application.

Routes (Werkzeug); the rules every request meets at the edge (the bearer token,
same-origin and JSON-only changes, the body limit); answers in JSON, with every
secret taken out. It reads on the read pool (core/reads.py) and reaches
the actors through a `Backend` of plain calls, which actors/http_api.py builds
from their addresses. Served by core/http_server.py; tests drive it directly.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import psycopg
from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from .. import protocol
from . import page, telemetry_query
from .commands import CommandRefused
from .configs import PushRefused, PushResult
from .http_server import MAX_BODY
from .reads import Reads
from .telemetry_query import BadQuery


class Unavailable(Exception):
    """The part of hydrod a request needs is being restarted, or did not answer in time."""


class Report(Protocol):
    """An actor's answer to Health (actors/messages.HealthReport)."""

    ok: bool
    detail: str


class Watched(Protocol):
    """An actor as /healthz reads it, without asking (actors/address.Address)."""

    name: str
    busy_since: float | None
    handling: str | None
    health: Report | None  # its answer to Health after its last message

    def not_progressing(self, stall_after_s: float, now: float) -> str | None: ...


@dataclass(frozen=True)
class Backend:
    """The rest of hydrod, as the API reaches it (built by actors/http_api.py)."""

    push_config: Callable[[str, Any], PushResult]  # raises PushRefused, or Unavailable
    # -> (the command's summary, whether it was created now); raises CommandRefused, or Unavailable
    create_command: Callable[[str, Any], tuple[dict[str, Any], bool]]
    actors: tuple[Watched, ...]  # what /healthz reports on
    resources: Mapping[str, str]  # actor name -> what its health is about ("mqtt", "database")


class Api:
    """The WSGI application."""

    def __init__(self, backend: Backend, reads: Reads, *, metrics, log, token: str, stall_after_s: float):
        self.backend = backend
        self.log = log
        self.reads = reads
        self.metrics = metrics
        self.token = token
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
        except Unavailable as exc:
            response = _json({"error": f"hydrod is busy or restarting: {exc}"}, 503)
        except psycopg.OperationalError as exc:
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            response = _json({"error": f"database unavailable: {first_line}"}, 503)
        except Exception:  # a bug: answer in JSON, keep the traceback in the log
            self.log.exception("http_request_failed", path=request.path, method=request.method)
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
            result = self.backend.push_config(uid, body)
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
        if not protocol.is_segment(uid):  # anything else names no node
            raise NotFound(f"no node with uid {uid!r}")
        body = _body(request, "a command")
        if isinstance(body, Response):
            return body
        try:
            summary, created = self.backend.create_command(uid, body)
        except CommandRefused as exc:
            return _json({"error": exc.message}, exc.status)
        return _json(summary, 202 if created else 200)

    def on_commands(self, request: Request, uid: str) -> Response:
        if not protocol.is_segment(uid):  # anything else names no node
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
        now = time.monotonic()
        for address in self.backend.actors:
            busy_since, handling = address.busy_since, address.handling
            busy_s = None if busy_since is None else now - busy_since
            part = address.name
            stuck = address.not_progressing(self.stall_after_s, now)
            if stuck is not None:
                ok, detail = False, stuck
            else:
                ok, detail = (address.health.ok, address.health.detail) if address.health else (True, "running")
                part = self.backend.resources.get(address.name, address.name)
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
