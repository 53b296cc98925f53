"""Time in hydrod's own hands: backoff with jitter, a ticker, a delayed tell.

Each only tells: the work happens in the actor that receives the message, which
keeps its schedule even when one round fails. What they tell to is anything with
a `tell` (an actor's `Address`), so they need no actor to be tested.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Protocol


class Mailbox(Protocol):
    def tell(self, message: Any) -> None: ...


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


class Ticker:
    """Tells `message` to `to` every `interval` seconds until stopped."""

    def __init__(self, name: str, to: Mailbox, message: Any, interval: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(to, message, interval),
                                        name=f"{name}-ticker", daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _run(self, to: Mailbox, message: Any, interval: float) -> None:
        while not self._stop.wait(interval):
            to.tell(message)

    def stop(self) -> None:
        self._stop.set()


def tell_later(to: Mailbox, message: Any, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, to.tell, (message,))
    timer.daemon = True
    timer.start()
    return timer
