"""systemd's notify protocol (sd_notify(3)): datagrams on $NOTIFY_SOCKET.

A few lines rather than a package: `sdnotify` has had no release since 2017
and drops every error silently, and `systemd-python` needs libsystemd's
headers to build. Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("hydrod", actor="supervisor")


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ):
        path = environ.get("NOTIFY_SOCKET", "")
        # An abstract socket's name starts with '@', which stands for a NUL byte.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval: float | None = None  # seconds between WATCHDOG=1, or None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if self.address and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6  # half of WatchdogSec, as sd_watchdog_enabled(3) advises
        self._failed = False

    def notify(self, *assignments: str) -> None:
        """Send e.g. notify("READY=1", "STATUS=subscribed"). A failure is logged once, never raised:
        systemd not listening must not stop hydrod (and if it wanted READY, it stops hydrod itself)."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(assignments).encode())
        except OSError as exc:
            if not self._failed:
                log.error("systemd_notify_failed", socket=self.address.replace("\0", "@"),
                          sent=list(assignments), error=repr(exc))
            self._failed = True
        else:
            self._failed = False
