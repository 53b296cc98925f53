"""The acknowledgement ledger: what MqttIo has received, and when the broker may
forget each message. MQTT wants QoS 1 messages acknowledged in the order they
arrived, so a message is acknowledged only once it and all before it are settled
(committed, dead-lettered or answered)."""

from __future__ import annotations

from collections import deque


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
