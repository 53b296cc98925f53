"""What every hydrod actor shares: a stable address, failure reporting, timers.

The messages declared here are the contract between every actor and the
supervisor (or every actor and its peers), so that dependencies keep pointing
one way: actors never import `supervisor.py`.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
import structlog
from pykka._envelope import Envelope  # the leftovers are envelopes already

from ..protocol import Routed


class ActorUnavailable(Exception):
    """The addressed actor is being restarted or has stopped."""


# --- messages every actor understands ----------------------------------------


@dataclass(frozen=True)
class Deliver:
    """Received MQTT messages for a consumer, in arrival order.

    `alone`: a suspect (part of a batch that crashed its actor), to be handled
    apart from anything else, so that a poison message is cornered.
    """

    items: tuple[Routed, ...]
    alone: bool = False


@dataclass(frozen=True)
class Health:
    """Ask: is this actor and the resource it owns well? Returns (ok, detail).

    Keep the answer cheap: each actor also works it out after every message it
    handles, for /healthz to read from its address without asking."""


@dataclass(frozen=True)
class Flush:
    """Ask: commit what is pending now (shutdown drain); returns how many were pending."""


@dataclass(frozen=True)
class LinkChanged:
    """The MQTT link went up or down."""

    up: bool


@dataclass(frozen=True)
class Ready:
    """To the supervisor: this actor now does its job (MqttIo: subscribed), so hydrod is ready."""

    name: str


@dataclass(frozen=True)
class ActorFailed:
    """To the supervisor: an actor died; what it held is handed over."""

    name: str
    ref: pykka.ActorRef
    error: BaseException
    message: Any  # the suspect: what it was handling (see SupervisedActor.salvage), or None
    leftovers: tuple[Any, ...]  # pykka envelopes still queued for it
    salvaged: tuple[Any, ...] = ()  # messages it held, not suspects: replayed first, as they are


# --- the address ------------------------------------------------------------------


class Address:
    """The name senders use for an actor; it outlives each incarnation.

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
        self.health: tuple[bool, str] | None = None  # its answer to Health after its last message

    def tell(self, message: Any) -> None:
        with self._lock:
            if self._ref is not None:
                try:
                    self._ref.tell(message)
                    return
                except pykka.ActorDeadError:
                    pass  # dying: its on_failure is about to detach it
            self._held.append(message)

    def ask(self, message: Any, timeout: float) -> Any:
        with self._lock:
            ref = self._ref
        if ref is None:
            raise ActorUnavailable(f"{self.name} is restarting or stopped")
        try:
            return ref.ask(message, timeout=timeout)
        except pykka.ActorDeadError:
            raise ActorUnavailable(f"{self.name} is restarting or stopped") from None

    def attach(self, ref: pykka.ActorRef, replay_first: tuple[Any, ...] = (),
               replay: tuple[Any, ...] = ()) -> None:
        """Point the address at a (new) incarnation.

        Order: `replay_first` messages, then `replay` envelopes (what the dead
        incarnation had queued), then what was told to the address meanwhile.
        """
        with self._lock:
            self.busy_since = None  # the dead incarnation's, if any; this one is idle
            # Checked once, under the lock: if the actor dies after this, its on_failure
            # waits for the lock in detach() and then takes all of it back.
            if not ref.is_alive():
                raise ActorUnavailable(f"{self.name} died before it could take its messages")
            for message in replay_first:
                ref.actor_inbox.put(Envelope(message))
            for envelope in replay:
                ref.actor_inbox.put(envelope)
            for message in self._held:
                ref.actor_inbox.put(Envelope(message))
            self._held.clear()
            self._ref = ref

    def detach(self, ref: pykka.ActorRef) -> None:
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


# --- the actor shell -------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the supervisor hands an actor when it starts it."""

    name: str
    address: Address
    supervisor: Address
    # Test hook: called with (actor name, message) before each message.
    fault_hook: Callable[[str, Any], None] | None = None


class SupervisedActor(pykka.ThreadingActor):
    """A pykka actor that reports its death, and what it held, to the supervisor."""

    use_daemon_thread = True

    def __init__(self, context: Context):
        super().__init__()
        self.ctx = context
        self.log = structlog.get_logger("hydrod", actor=context.name)
        self._current: Any = None
        # pykka logs an exception from on_start and stops the actor, so the
        # supervisor's start-up ping would only hear "dead", never why. Each
        # actor's on_start runs guarded instead: its error is the answer to the
        # ping, and the stop that follows still releases what it had made.
        self._start_error: Exception | None = None
        self._unguarded_start, self.on_start = self.on_start, self._guarded_start

    def _guarded_start(self) -> None:
        try:
            self._unguarded_start()
        except Exception as exc:
            self._start_error = exc

    def on_receive(self, message: Any) -> Any:
        if self._start_error is not None:
            raise self._start_error
        self._current = message
        address = self.ctx.address
        address.handling, address.busy_since = type(message).__name__, time.monotonic()
        if self.ctx.fault_hook is not None:
            self.ctx.fault_hook(self.ctx.name, message)
        result = self.handle(message)
        self._current = None
        address.health = result if isinstance(message, Health) else self.handle(Health())
        address.busy_since = None
        return result

    def handle(self, message: Any) -> Any:
        raise NotImplementedError

    def on_failure(self, exc_type, exc_value, traceback) -> None:
        # Stop new tells landing in the dead inbox, then take what is queued.
        self.ctx.address.detach(self.actor_ref)
        leftovers = []
        while True:
            try:
                leftovers.append(self.actor_inbox.get_nowait())
            except queue.Empty:
                break
        try:
            self.release()
        except Exception:  # the replacement starts clean either way
            self.log.exception("actor_cleanup_failed")
        suspect, salvaged = self.salvage()
        self.ctx.supervisor.tell(ActorFailed(self.ctx.name, self.actor_ref, exc_value,
                                             suspect, tuple(leftovers), salvaged))

    def on_stop(self) -> None:
        self.release()

    def salvage(self) -> tuple[Any, tuple[Any, ...]]:
        """(the suspect message, what else the actor held) for the replacement.

        By default the suspect is the message being handled, and nothing else is held."""
        return self._current, ()

    def release(self) -> None:
        """Free what the actor owns (connections, threads). Called once, on stop or failure."""

    def mailbox_empty(self) -> bool:
        return self.actor_inbox.empty()


# --- timers and backoff --------------------------------------------------------------


class Ticker:
    """Tells `message` to `address` every `interval` seconds until stopped.

    It only sends: the work happens in the actor, which keeps its schedule even
    when one round fails.
    """

    def __init__(self, name: str, address: Address, message: Any, interval: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, message, interval),
                                        name=f"{name}-ticker", daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _run(self, address: Address, message: Any, interval: float) -> None:
        while not self._stop.wait(interval):
            address.tell(message)

    def stop(self) -> None:
        self._stop.set()


def tell_later(address: Address, message: Any, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, address.tell, (message,))
    timer.daemon = True
    timer.start()
    return timer


class Backoff:
    """Exponential backoff with full jitter, capped (psycopg_pool's AttemptWithBackoff)."""

    def __init__(self, minimum: float, maximum: float):
        self.minimum = minimum
        self.maximum = maximum
        self.attempts = 0
        self.since: float | None = None

    def next_delay(self) -> float:
        if self.since is None:
            self.since = time.monotonic()
        ceiling = min(self.maximum, self.minimum * (2 ** self.attempts))
        self.attempts += 1
        return random.uniform(self.minimum / 2, max(ceiling, self.minimum))

    def reset(self) -> float | None:
        """Back to the start; returns how long the failures lasted, if any."""
        lasted = None if self.since is None else time.monotonic() - self.since
        self.attempts = 0
        self.since = None
        return lasted
