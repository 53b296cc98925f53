"""The barrier: history that must wait for registry work to be committed.

A node's history waits until what it said before (its node_hello, its
config_report) is committed: then its node exists, and is bound. So a sample
that arrives right after a node's first hello never finds an unknown node.
"""

from __future__ import annotations

from ..protocol import Routed


class Barrier:
    """History held while registry work that arrived before it is open."""

    def __init__(self) -> None:
        self._open: dict[int, None] = {}  # seqs of registry work, not settled, in arrival order
        self._held: list[Routed] = []  # history that arrived after them

    def open(self, routed: Routed) -> None:
        """`routed` (a node_hello or config_report) goes to the registry now."""
        self._open[routed.seq] = None

    def holds(self, routed: Routed) -> bool:
        """Whether history `routed` must wait (it is then kept here until released)."""
        if not self._open:
            return False
        self._held.append(routed)
        return True

    def settle(self, seqs) -> list[Routed]:
        """Registry work among `seqs` is committed: the history now free to go, in arrival order."""
        if not self._open:
            return []
        for seq in seqs:
            self._open.pop(seq, None)
        held = self._held
        if not held:
            return []
        first_open = next(iter(self._open), None)
        released = 0
        while released < len(held) and (first_open is None or held[released].seq < first_open):
            released += 1
        free = held[:released]
        del held[:released]
        return free

    def __len__(self) -> int:
        """Registry messages open."""
        return len(self._open)
