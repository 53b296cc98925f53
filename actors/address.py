"""The address senders use for an actor: it outlives each incarnation.

Only pykka's public API: messages go in with `ActorRef.tell`, and an ask goes as
an `Asked` (the message and a `pykka.ThreadingFuture` for its answer), told like
any other message. So what a dead incarnation had queued is plain messages, and
its replacement answers the asks among them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pykka

from .messages import Ask, HealthReport

R = TypeVar("R")


class ActorUnavailable(Exception):
    """The addressed actor is being restarted or has stopped."""


@dataclass(frozen=True)
class Asked(Generic[R]):
    """An ask sent through an address: the message, and the future its answer goes to."""

    message: Ask[R]
    reply: pykka.Future[R]


def ask_ref(ref: pykka.ActorRef, message: Ask[R], timeout: float) -> R:
    """Ask an incarnation directly, before any address points at it (the start-up ping)."""
    reply: pykka.Future[R] = pykka.ThreadingFuture()
    ref.tell(Asked(message, reply))
    return reply.get(timeout=timeout)


class Address:
    """The name senders use for an actor.

    While the actor is being restarted, tells are held here and handed to
    the replacement in order, after what the dead incarnation had queued.
    """

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._ref: pykka.ActorRef | None = None
        self._held: list[Any] = []
        # What the actor is doing, for /healthz, which reads it without asking: an
        # ask waits behind a long batch. Written by the actor's own thread.
        self.busy_since: float | None = None  # monotonic, while it handles a message
        self.handling: str | None = None  # that message's type
        self.health: HealthReport | None = None  # its answer to Health after its last message

    def tell(self, message: Any) -> None:
        with self._lock:
            if self._ref is not None:
                try:
                    self._ref.tell(message)
                    return
                except pykka.ActorDeadError:
                    pass  # stopped from outside (a BaseException stops every actor)
            self._held.append(message)

    def ask(self, message: Ask[R], timeout: float) -> R:
        """The actor's answer, or its exception; ActorUnavailable while it restarts,
        pykka.Timeout after `timeout` seconds."""
        reply: pykka.Future[R] = pykka.ThreadingFuture()
        with self._lock:
            if self._ref is None:
                raise ActorUnavailable(f"{self.name} is restarting or stopped")
            try:
                self._ref.tell(Asked(message, reply))
            except pykka.ActorDeadError:
                raise ActorUnavailable(f"{self.name} is restarting or stopped") from None
        return reply.get(timeout=timeout)

    def attach(self, ref: pykka.ActorRef, replay_first: tuple[Any, ...] = (),
               replay: tuple[Any, ...] = ()) -> None:
        """Point the address at a (new) incarnation.

        Order: `replay_first`, then `replay` (what the dead incarnation had
        queued), then what was told to the address meanwhile.
        """
        with self._lock:
            self.busy_since = None  # the dead incarnation's, if any; this one is idle
            # Checked once, under the lock: an actor that fails detaches itself first,
            # which waits for this lock, and then takes back all that was told here.
            if not ref.is_alive():
                raise ActorUnavailable(f"{self.name} died before it could take its messages")
            for message in (*replay_first, *replay, *self._held):
                ref.tell(message)
            self._held.clear()
            self._ref = ref

    def detach(self, ref: pykka.ActorRef) -> None:
        """Hold what is told from now on (`ref` failed). Once this returns, nothing
        more is told to `ref` through this address."""
        with self._lock:
            if self._ref is ref:
                self._ref = None

    @property
    def ref(self) -> pykka.ActorRef | None:
        return self._ref

    def not_progressing(self, stall_after_s: float, now: float) -> str | None:
        """Why this actor is not alive and making progress, or None when it is.

        Read, not asked: an ask would wait behind a long batch. A busy actor is
        working; one on the same message for more than `stall_after_s` is stuck.
        /healthz and the systemd watchdog both judge actors by this."""
        if self._ref is None:
            return "restarting or stopped"
        busy_since, handling = self.busy_since, self.handling
        if busy_since is not None and now - busy_since > stall_after_s:
            return f"stalled: on one {handling} for {now - busy_since:.1f} s"
        return None

    @property
    def held(self) -> int:
        return len(self._held)

    def __repr__(self) -> str:
        return f"Address({self.name})"
