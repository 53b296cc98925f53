"""systemd's notify protocol: READY=1 once subscribed, WATCHDOG=1 only while every actor
makes progress, STOPPING=1 on SIGTERM; read from a real datagram socket bound here."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import threading
import time

import pytest

from harness import publish, query, wait_until
from hydrod import logs
from hydrod.actors.messages import Deliver
from hydrod.systemd import Notifier
from test_supervisor import HELLO, LogLines, _get, in_process, samples  # noqa: F401 (in_process: a fixture)


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; `name` as NOTIFY_SOCKET says it."""

    def __init__(self, path: str | None = None):
        self.name = path or f"@hydrod-test-{secrets.token_hex(6)}"  # '@': an abstract socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:] if self.name.startswith("@") else self.name)
        self.received: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name="notify-socket", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self._cond:
                self.received.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def lines(self, since: float = 0.0) -> list[str]:
        with self._cond:
            return [line for at, datagram in self.received if at >= since for line in datagram.splitlines()]

    def wait_for(self, line: str, count: int = 1, since: float = 0.0, timeout: float = 15.0) -> None:
        wait_until(lambda: self.lines(since).count(line) >= count, timeout, f"{count} x {line!r} on NOTIFY_SOCKET")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket():
    server = NotifySocket()
    yield server
    server.close()


def test_ready_comes_once_subscribed_watchdog_pings_follow_and_sigterm_says_stopping(
        make_daemon, broker, notify_socket):
    broker.stop()  # nothing to subscribe to yet
    daemon = make_daemon(env={"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "400000"})
    daemon.wait_for("mqtt_connect_failed")
    notify_socket.wait_for("WATCHDOG=1", count=2)  # alive, and pinging, meanwhile
    assert "READY=1" not in notify_socket.lines(), "READY before the subscription"
    broker.start()
    subscribed = daemon.wait_ready()
    notify_socket.wait_for("READY=1")
    ready = daemon.wait_for("daemon_ready", systemd=True)
    assert daemon.lines.index(subscribed) < daemon.lines.index(ready)
    since = time.monotonic()
    notify_socket.wait_for("WATCHDOG=1", count=3, since=since)  # every 0.2 s: half of WATCHDOG_USEC
    assert "STOPPING=1" not in notify_socket.lines()
    assert daemon.terminate() == 0
    assert "STOPPING=1" in notify_socket.lines()
    assert notify_socket.lines().count("READY=1") == 1


@pytest.fixture
def in_process_notified(in_process, notify_socket):
    """hydrod in the test process, its Notifier told of notify_socket with WATCHDOG_USEC."""

    def run(fault_hook, watchdog_usec, **sections):
        notifier = Notifier({"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": str(watchdog_usec)})
        return in_process(fault_hook, notifier=notifier, **sections)

    return run


def test_watchdog_pings_stop_while_an_actor_is_stuck_and_healthz_agrees(
        in_process_notified, broker, database, notify_socket):
    stuck, entered, release = threading.Event(), threading.Event(), threading.Event()

    def hook(actor, message):
        if actor == "db_writer" and isinstance(message, Deliver) and stuck.is_set():
            entered.set()
            release.wait(60)  # a batch that never ends

    daemon, lines = in_process_notified(hook, 200_000, supervisor={"stall_after_s": 1.0})
    publish(broker.port, [("hydro/node_hello", HELLO)])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    try:
        notify_socket.wait_for("WATCHDOG=1", count=3)
        stuck.set()
        publish(broker.port, samples(1))
        wait_until(entered.is_set, what="the stuck batch under way")
        withheld = lines.wait_for("watchdog_withheld")
        assert withheld["not_progressing"][0].startswith("db_writer: stalled: on one Deliver")
        status, body = _get(daemon, "/healthz")
        assert status == 503 and body["failing"] == ["db_writer"], body
        # Half of WATCHDOG_USEC is 0.1 s: ten intervals pass without a ping.
        after = time.monotonic() + 0.15  # a ping already on its way when the stall was seen
        with pytest.raises(AssertionError):
            notify_socket.wait_for("WATCHDOG=1", since=after, timeout=1.0)
        assert len(lines.events("watchdog_withheld")) == 1  # logged once, not at each interval
        release.set()
        lines.wait_for("watchdog_resumed")
        notify_socket.wait_for("WATCHDOG=1", since=time.monotonic())
    finally:
        release.set()


def test_notifier_speaks_to_a_socket_path_and_ignores_a_watchdog_meant_for_another_pid():
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # a socket path is short (108 bytes)
        server = NotifySocket(os.path.join(directory, "notify"))
        try:
            notifier = Notifier({"NOTIFY_SOCKET": server.name, "WATCHDOG_USEC": "30000000"})
            assert notifier.watchdog_interval == 15.0
            notifier.notify("READY=1", "STATUS=subscribed")
            server.wait_for("STATUS=subscribed")
            assert server.lines() == ["READY=1", "STATUS=subscribed"]
        finally:
            server.close()
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None
    assert Notifier({}).address == "" and Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


def test_a_notify_socket_nobody_listens_on_is_logged_once_and_hydrod_goes_on():
    lines = LogLines()
    logs.configure("info", "json", stream=lines)
    notifier = Notifier({"NOTIFY_SOCKET": f"@hydrod-test-nobody-{secrets.token_hex(6)}"})
    notifier.notify("WATCHDOG=1")
    notifier.notify("WATCHDOG=1")
    [failed] = lines.events("systemd_notify_failed")
    assert failed["sent"] == ["WATCHDOG=1"] and "ConnectionRefused" in failed["error"]
