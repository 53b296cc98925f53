"""What the two batching shells (db_writer.py, node_registry.py) share: their timer
messages, and what a crashed one hands its replacement. The batching itself is
core/batcher.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.batcher import Batcher
from .messages import Deliver


@dataclass(frozen=True)
class FlushDue:
    """Ticker: flush a batch whose oldest message has waited long enough."""


@dataclass(frozen=True)
class RetryDatabase:
    """Timer: try the database again."""


def salvage(current: Any, batcher: Batcher | None) -> tuple[Any, tuple[Any, ...]]:
    """The suspect, and everything else received and not committed.

    The suspect is the Deliver being handled when the actor died before the
    batcher took it in; when it died later (while writing), the whole pending
    batch is."""
    uncommitted = batcher.uncommitted() if batcher is not None else ()
    held = (Deliver(uncommitted),) if uncommitted else ()
    if isinstance(current, Deliver) and (batcher is None or current is not batcher.absorbed):
        return current, held
    return (held[0] if held else None), ()
