"""The messages every hydrod actor understands, and those it sends the supervisor.

They are the contract between every actor and the supervisor (or every actor and
its peers), so that dependencies keep pointing one way: actors never import
`supervisor.py`. A message that is asked derives from `Ask[R]`, R being what the
answer is: `Address.ask` returns an R, never Any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..protocol import Routed

if TYPE_CHECKING:
    import pykka

R = TypeVar("R", covariant=True)


class Ask(Generic[R]):
    """A message that is asked; its handler answers with an R."""

    __slots__ = ()


# --- answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthReport:
    """An actor's answer to Health: is it, and what it owns (broker link, database), well?"""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Drained:
    """The answer to a shutdown step: how many messages it found pending."""

    pending: int


# --- messages every actor understands ----------------------------------------------


@dataclass(frozen=True)
class Deliver:
    """Received MQTT messages for a consumer, in arrival order.

    `alone`: a suspect (part of a batch that crashed its actor), to be handled
    apart from anything else, so that a poison message is cornered.
    """

    items: tuple[Routed, ...]
    alone: bool = False


@dataclass(frozen=True)
class Health(Ask[HealthReport]):
    """Ask: is this actor and the resource it owns well?

    Keep the answer cheap: each actor also works it out after every message it
    handles, for /healthz to read from its address without asking."""


@dataclass(frozen=True)
class Flush(Ask[Drained]):
    """Ask: commit what is pending now (shutdown drain)."""


@dataclass(frozen=True)
class LinkChanged:
    """The MQTT link went up or down."""

    up: bool


# --- to the supervisor -------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """This actor now does its job (MqttIo: subscribed), so hydrod is ready."""

    name: str


@dataclass(frozen=True)
class ActorFailed:
    """An actor died; what it held is handed over, in the order it must be replayed:
    `salvaged`, then the suspect (`message`), then `leftovers`."""

    name: str
    ref: pykka.ActorRef
    error: BaseException
    message: Any  # the suspect: what it was handling (see SupervisedActor.salvage), or None
    leftovers: tuple[Any, ...]  # messages still queued for it, as they were told
    salvaged: tuple[Any, ...] = ()  # messages it held, not suspects: replayed first, as they are
