"""The HTTP server: waitress, with bounded connections and workers.

One thread runs waitress's event loop, which holds the connections, and
`threads` workers run the requests. HTTP clients can never take the file
descriptors that the broker link and the database pools need: at most
min(connection_limit, the soft RLIMIT_NOFILE - RESERVED_FDS) connections are
open at once. When every slot is taken, the connection idle the longest is
closed to make room for the new one (as nginx reuses idle keep-alive
connections), so idle clients cannot lock out the others; an idle connection is
closed after IDLE_TIMEOUT_S anyway. waitress reads a whole request body (at
most MAX_BODY, chunked or not) before the application sees the request, and an
error answer closes the connection.
"""

from __future__ import annotations

import errno
import json
import resource
import threading
from collections.abc import Callable

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

MAX_BODY = 256 * 1024
# File descriptors kept for everything but HTTP connections: stdio, the broker
# link, the database pools (also while they reconnect), the server's own.
RESERVED_FDS = 100
IDLE_TIMEOUT_S = 30.0


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
    """waitress's worker threads, named after their owner."""

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


class HttpServer:
    """Serves `app` on host:port from start() to stop(). `on_shed()` is called for each
    idle connection closed to make room, `on_failed(server, error)` if the event loop
    ends on an error; both on the loop's thread."""

    def __init__(self, name: str, app, *, host: str, port: int, connection_limit: int, threads: int,
                 on_shed: Callable[[], None], on_failed: Callable[[HttpServer, BaseException], None]):
        self.name = name
        self.app = app
        self.host, self.port = host, port
        self.slots = connection_slots(connection_limit)
        self.threads = threads
        self.on_shed, self.on_failed = on_shed, on_failed
        self.sockets: dict = {}  # waitress's socket map: the listener, the wake-up pipe, the connections
        self._server: _Server | None = None
        self._workers = _Workers(name)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closing = threading.Lock()  # the wake-up pipe is pulled only while it is open
        self._closed = False

    def start(self) -> None:
        """Bind and serve; OSError('cannot listen on HOST:PORT: ...') when it cannot bind."""
        try:
            self._server = _Server(
                self.app, map=self.sockets, dispatcher=self._workers, slots=self.slots, on_shed=self.on_shed,
                host=self.host, port=self.port, ident="hydrod", max_request_body_size=MAX_BODY,
                # Past `slots`: the listener, the wake-up pipe, and connections being closed.
                connection_limit=self.slots + 4, channel_timeout=IDLE_TIMEOUT_S, cleanup_interval=1,
                asyncore_use_poll=True)  # select() cannot watch descriptors past 1023
        except (OSError, ValueError) as exc:
            wasyncore.close_all(self.sockets)
            why = "address in use" if getattr(exc, "errno", None) == errno.EADDRINUSE else str(exc)
            raise OSError(f"cannot listen on {self.host}:{self.port}: {why}") from None
        self.port = int(self._server.effective_port)
        self._workers.set_thread_count(self.threads)
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-server", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve(self) -> None:
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=1.0, map=self.sockets, use_poll=True, count=1)
        except BaseException as exc:
            self.on_failed(self, exc)
        finally:
            with self._closing:  # on this thread, which owns the sockets
                wasyncore.close_all(self.sockets, ignore_all=True)
                self._closed = True

    def stop(self) -> None:
        """Close every connection and the listener; wait (5 s at most) for requests under way."""
        if self._server is None:
            return
        self._stopping.set()
        with self._closing:
            if not self._closed:  # a closed descriptor's number may be another file's by now
                self._server.pull_trigger()  # wakes the loop at once
        self._thread.join(5)
        self._workers.shutdown(timeout=5)
        self._server = None
