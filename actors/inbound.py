"""What MqttIo keeps of received messages: the hand-over from paho's thread and
the ledger that decides when each may be acknowledged."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple


class Inbound(NamedTuple):
    """One PUBLISH received (a tuple: built once per message, on paho's thread)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float
    dup: bool  # the broker's DUP flag: it sent this very PUBLISH before

    def __repr__(self) -> str:  # never the payload (see protocol.Routed)
        return f"Inbound(topic={self.topic!r}, payload=<{len(self.payload)} bytes>, mid={self.mid}, qos={self.qos})"


class Arrivals:
    """PUBLISHes from paho's thread to MqttIo: one pykka message a burst, not one a PUBLISH.

    A pykka tell per PUBLISH cost 13% of a drain's CPU (Queue.put, notify, one
    dispatch each), measured with py-spy. So paho's callback appends to this deque
    and wakes MqttIo only when the deque goes from empty to non-empty;
    MqttIo takes everything in one pass. There is one producer, and deque's append
    and popleft are atomic, so an arrival is never left without a wake-up. Each
    MqttIo incarnation has its own, tied to its own paho client.
    """

    def __init__(self, wake: Callable[[], None]):
        self._queue: deque[Inbound] = deque()
        self._wake = wake

    def on_message(self, _client, _userdata, msg) -> None:  # paho's thread
        queue = self._queue
        queue.append(Inbound(msg.topic, msg.payload, msg.mid, msg.qos, time.time(), bool(msg.dup)))
        if len(queue) == 1:
            self._wake()

    def take(self, limit: int | None = None):
        queue = self._queue
        taken = 0
        while queue and (limit is None or taken < limit):
            taken += 1
            yield queue.popleft()

    def __len__(self) -> int:
        return len(self._queue)


class Ledger:
    """Received messages in arrival order, acknowledged only from the front."""

    def __init__(self, start: int) -> None:
        # Each incarnation starts far above the last one's numbers, so a late
        # Settled meant for a dead incarnation can never settle a new message.
        self._next = start
        self._queue: deque[tuple[int, int, int, int]] = deque()  # (seq, mid, qos, epoch)
        self._done: set[int] = set()

    def admit(self, mid: int, qos: int, epoch: int) -> int:
        seq = self._next
        self._next += 1
        self._queue.append((seq, mid, qos, epoch))
        return seq

    def settle(self, seqs, epoch: int) -> list[tuple[int, int]]:
        """Mark seqs done; return the (mid, qos) now due for acknowledgement, in order."""
        queue, done = self._queue, self._done
        head = queue[0][0] if queue else self._next
        done.update(seq for seq in seqs if head <= seq < self._next)
        due = []
        while queue and queue[0][0] in done:
            seq, mid, qos, entry_epoch = queue.popleft()
            done.discard(seq)
            # A message from an earlier connection is redelivered by the broker;
            # its old packet id means nothing on this one.
            if qos and entry_epoch == epoch:
                due.append((mid, qos))
        return due

    def __len__(self) -> int:
        return len(self._queue)
