"""The shell every hydrod actor is: a pykka actor that reports its death, and
everything it held, to the supervisor.

A failure is caught here, not left to pykka: pykka would stop the actor and drop
what is queued for it, and taking that from its inbox means handling pykka's
private envelopes. Instead the failed incarnation stops taking new messages at
its address, tells itself an end marker, and passes on (unhandled) every message
up to the marker: all that was queued for it. Then it reports them to the
supervisor, which hands them to the replacement, and stops.

So an actor is asked through its `Address` (or `address.ask_ref` before it has
one), never with `ActorRef.ask`: the answer travels with the message, in an
`Asked`, and an ask queued for a failed actor is answered by its replacement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
import structlog

from .address import Address, Asked
from .messages import ActorFailed, Health


@dataclass(frozen=True)
class Context:
    """What the supervisor hands an actor when it starts it."""

    name: str
    address: Address
    supervisor: Address
    # Test hook: called with (actor name, message) before each message.
    fault_hook: Callable[[str, Any], None] | None = None


@dataclass(frozen=True)
class _EndOfInbox:
    """Told by a failed actor to itself: every message before it was queued for it."""


class SupervisedActor(pykka.ThreadingActor):
    """Subclasses implement `handle` (and `release`, `salvage` if they own or hold anything)."""

    use_daemon_thread = True

    def __init__(self, context: Context):
        super().__init__()
        self.ctx = context
        self.log = structlog.get_logger("hydrod", actor=context.name)
        self._current: Any = None
        self._failure: BaseException | None = None
        self._failed_with: tuple[Any, tuple[Any, ...]] = (None, ())  # (suspect, salvaged)
        self._leftovers: list[Any] = []
        self._released = False
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

    def on_receive(self, message: Any) -> None:
        # pykka never sees an exception from here: it would drop what is queued.
        asked = message if type(message) is Asked else None
        if self._start_error is not None:
            if asked is not None:  # the supervisor's start-up ping: the error is the answer
                error = self._start_error
                asked.reply.set_exception((type(error), error, error.__traceback__))
            return
        if self._failure is not None:
            self._pass_on(message)
            return
        if asked is not None:
            message = asked.message
        self._current = message
        address = self.ctx.address
        address.handling, address.busy_since = type(message).__name__, time.monotonic()
        try:
            if self.ctx.fault_hook is not None:
                self.ctx.fault_hook(self.ctx.name, message)
            result = self.handle(message)
            health = result if isinstance(message, Health) else self.handle(Health())
        except Exception as exc:
            if asked is None:
                self._fail(exc)
                return
            asked.reply.set_exception()  # an ask's failure is its answer; the actor goes on
        else:
            if asked is not None:
                asked.reply.set(result)
            address.health = health
        self._current = None
        address.busy_since = None

    def handle(self, message: Any) -> Any:
        raise NotImplementedError

    # -- failure --

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._failed_with = self.salvage()
        # From here on, what is told to the address waits there for the replacement;
        # everything already queued here comes before the marker.
        self.ctx.address.detach(self.actor_ref)
        self.actor_ref.tell(_EndOfInbox())

    def _pass_on(self, message: Any) -> None:
        if type(message) is not _EndOfInbox:
            self._leftovers.append(message)
            return
        self._release_once()
        suspect, salvaged = self._failed_with
        self.ctx.supervisor.tell(ActorFailed(self.ctx.name, self.actor_ref, self._failure, suspect,
                                             tuple(self._leftovers), salvaged))
        self._leftovers = []
        self.stop()

    def on_stop(self) -> None:
        self._release_once()

    def _release_once(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.release()
        except Exception:  # the replacement starts clean either way
            self.log.exception("actor_cleanup_failed")

    def salvage(self) -> tuple[Any, tuple[Any, ...]]:
        """(the suspect message, what else the actor held) for the replacement.

        By default the suspect is the message being handled, and nothing else is held."""
        return self._current, ()

    def release(self) -> None:
        """Free what the actor owns (connections, threads). Called once, on stop or failure."""

    def mailbox_empty(self) -> bool:
        return self.actor_inbox.empty()
