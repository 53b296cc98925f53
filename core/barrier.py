"""The barrier: a node's history waits for its own registry work to be committed.

A node's history (telemetry, heartbeats, status, events) waits until what that
node said before it (its node_hello, its config_report) is committed: then its
node exists, and is bound. So a sample that arrives right after a node's first
hello never finds an unknown node. Other nodes' history does not wait: a burst of
hellos from new nodes holds back no bound node's telemetry.

Which history is a node's? Registry work is open under every name it gives its
node (`protocol.node_names`: its topic's node segment; a hello's hardware id, the
uid derived from it and its provisioned uid; a config_report's `node_id`), and
history waits when its own topic's node segment is one of them. A node's name in
its topics changes only through registry work that carries both names (a hello
on `hydro/node_hello` names its hardware id and derived uid in its payload; a
config_report from its zone names its uid), and the broker keeps one client's
messages in order. A uid other than these (one with a suffix, given on a
collision) a node only learns from a config, pushed once it is registered.
Messages that name no node (rejected topics) never wait.
"""

from __future__ import annotations

from ..protocol import Routed, node_names


class Barrier:
    """History held while registry work for its node, that arrived before it, is open."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[str, ...]] = {}  # seq of open registry work -> its node's names
        self._by_name: dict[str, dict[int, None]] = {}  # name -> its open seqs, in arrival order
        self._held: dict[str, list[Routed]] = {}  # name -> its history waiting, in arrival order

    def open(self, routed: Routed) -> None:
        """`routed` (a node_hello or config_report) goes to the registry now."""
        names = node_names(routed)
        if not names:
            return
        self._open[routed.seq] = names
        for name in names:
            self._by_name.setdefault(name, {})[routed.seq] = None

    def holds(self, routed: Routed) -> bool:
        """Whether history `routed` must wait (it is then kept here until released)."""
        if routed.node not in self._by_name:
            return False
        self._held.setdefault(routed.node, []).append(routed)
        return True

    def settle(self, seqs) -> list[Routed]:
        """Registry work among `seqs` is committed: the history now free to go, in arrival order."""
        if not self._open:
            return []
        touched: set[str] = set()
        for seq in seqs:
            names = self._open.pop(seq, None)
            if names is not None:
                for name in names:
                    del self._by_name[name][seq]
                touched.update(names)
        free: list[Routed] = []
        for name in touched:
            still_open = self._by_name[name]
            first_open = next(iter(still_open), None)
            if first_open is None:
                del self._by_name[name]
            held = self._held.get(name)
            if not held:
                continue
            released = 0
            while released < len(held) and (first_open is None or held[released].seq < first_open):
                released += 1
            free.extend(held[:released])
            if released == len(held):
                del self._held[name]
            else:
                del held[:released]
        if len(touched) > 1:
            free.sort(key=lambda routed: routed.seq)
        return free

    def __len__(self) -> int:
        """Registry messages open."""
        return len(self._open)
