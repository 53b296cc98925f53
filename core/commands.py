"""Commands to nodes (SPEC §7): created, queued, signed and handed to the broker link,
moved by the node's answers, timed out and expired. Plain and synchronous: the actor
in `actors/commands.py` feeds it; the tests drive it against a real PostgreSQL.

The promise is "never twice on its own": a command is handed to the broker link at
most once. Its `handed_at` is committed before the hand-over, and a command with a
`handed_at` is never handed over again, whatever happens next:

- the broker's PUBACK makes it `SENT`;
- the link says it could not publish it at all (the link was down): `handed_at` is
  cleared, and it waits `QUEUED` again, still first in its node's line;
- the link drops, or hydrod stops or dies, between the hand-over and the PUBACK: it
  may or may not have reached the node. It stays `QUEUED` with its `handed_at` (the
  API shows both), is not sent again, and holds its node's later commands back (they
  must not overtake it) until an answer from the node moves it, or until
  `response_timeout_s` after the hand-over, when it becomes `TIMEOUT` with
  `error_code` `no_puback`. A late answer still moves it then, as after any TIMEOUT.

Per node, one command at a time is between hand-over and PUBACK, in creation order:
so a publish the link refuses can never let a later command overtake an earlier one.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .. import protocol, signing

QUEUED, SENT, ACK, TIMEOUT, EXPIRED = "QUEUED", "SENT", "ACK", "TIMEOUT", "EXPIRED"
FINAL_ANSWERS = frozenset({"DONE", "NO_EFFECT", "ERROR", "INVALID", "BUSY"})
ANSWERS = FINAL_ANSWERS | {ACK}
FINAL = FINAL_ANSWERS | {TIMEOUT, EXPIRED}  # no answer is awaited any more (a late one still applies)
NO_PUBACK = "no_puback"

BODY_KEYS = frozenset({"channel", "cmd", "params", "cmd_id", "ttl_s"})
MAX_DEPTH = 16
MAX_TTL_S = 86400.0
# Parameters that move water, acid or motors: a value outside these is refused (400).
SAFE_RANGES = {
    "ml": (0, 500, False),  # (low, high, low included)
    "duration_ms": (0, 300000, False),
    "position_pct": (0, 100, True),
}
_CHANNEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CMD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
CLAIM_LOCK = 0x6863  # advisory lock: one claimer at a time, across hydrod instances


class CommandRefused(Exception):
    """A request that cannot become a command; `status` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class NewCommand:
    channel: str
    cmd: str
    params: dict[str, Any]
    cmd_id: str | None
    ttl_s: float | None


@dataclass(frozen=True)
class Outgoing:
    """A command signed and recorded as handed over: publish it, once."""

    id: int
    cmd_id: str
    node_uid: str
    topic: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True)
class Answer:
    """A command_response as received: the topic's node segment, the payload, when."""

    node_key: str
    payload: bytes = field(repr=False)
    received_at: float


def check_body(body: Any) -> NewCommand:
    """The request body as a command, or CommandRefused(400) naming the field."""
    if not isinstance(body, dict):
        raise CommandRefused(400, "body must be a JSON object: {\"channel\", \"cmd\", \"params\", \"cmd_id\"?, \"ttl_s\"?}")
    unknown = sorted(set(body) - BODY_KEYS)
    if unknown:
        raise CommandRefused(400, f"unknown field `{unknown[0]}`: a command has only "
                                  "`channel`, `cmd`, `params`, `cmd_id` and `ttl_s`")
    channel, cmd = body.get("channel"), body.get("cmd")
    if not isinstance(channel, str) or not _CHANNEL.fullmatch(channel):
        raise CommandRefused(400, "`channel` must be 1-64 characters of A-Z a-z 0-9 _ -")
    if not isinstance(cmd, str) or not 1 <= len(cmd) <= 64:
        raise CommandRefused(400, "`cmd` must be a string of 1-64 characters")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise CommandRefused(400, "`params` must be a JSON object")
    cmd_id = body.get("cmd_id")
    if cmd_id is not None and (not isinstance(cmd_id, str) or not _CMD_ID.fullmatch(cmd_id)):
        raise CommandRefused(400, "`cmd_id` must be 1-128 characters of A-Z a-z 0-9 _ -")
    ttl_s = body.get("ttl_s")
    if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float))
                              or not 0 < ttl_s <= MAX_TTL_S):
        raise CommandRefused(400, f"`ttl_s` must be a number of seconds above 0 and at most {MAX_TTL_S:g}")
    _check_params(params)
    try:
        signing.canonical({"cmd": cmd, "params": params})
    except signing.Unsignable as exc:
        raise CommandRefused(400, f"cannot be signed as the firmware checks it: {str(exc).replace('$.', '')}") from None
    return NewCommand(channel, cmd, params, cmd_id, None if ttl_s is None else float(ttl_s))


def _check_params(params: dict[str, Any]) -> None:
    """Depth and the safe ranges, at any depth; iterative (bodies can nest deeply)."""
    todo: list[tuple[Any, str, int]] = [(params, "params", 1)]
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise CommandRefused(400, f"`params` is nested more than {MAX_DEPTH} deep (at `{path}`)")
            for key, item in value.items():
                where = f"{path}.{key}"
                if key in SAFE_RANGES:
                    _check_safe(key, item, where)
                todo.append((item, where, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise CommandRefused(400, f"`params` is nested more than {MAX_DEPTH} deep (at `{path}`)")
            todo.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_safe(key: str, value: Any, where: str) -> None:
    low, high, low_included = SAFE_RANGES[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not (low <= value if low_included else low < value) or value > high:
        bracket = "[" if low_included else "("
        raise CommandRefused(400, f"unsafe parameter `{where}` = {value!r}: must be a number in {bracket}{low}, {high}]")


def step(status: str, handed: bool, answer: str) -> tuple[str, bool] | None:
    """The state machine of SPEC §7 for one answer: (new status, late), or None when
    the answer must leave the command as it is (a duplicate, out of order, or for a
    command never handed to the link)."""
    open_ = status in (SENT, ACK) or (status == QUEUED and handed)
    if answer == ACK:
        return (ACK, False) if status == SENT or (status == QUEUED and handed) else None
    if open_:
        return answer, False  # a final answer without an ACK before it is applied
    if status == TIMEOUT:
        return answer, True  # the node did act: applied, and marked late
    return None


def why_ignored(status: str, handed: bool, answer: str) -> str:
    if status == QUEUED and not handed or status == EXPIRED:
        return "never_sent"
    if status == answer or (status == ACK and answer == ACK):
        return "duplicate"
    if status == TIMEOUT:
        return "ack_after_timeout"
    return "out_of_order"


class Commands:
    """The commands of every node, in PostgreSQL. `pool` is a psycopg_pool pool;
    `log` a structlog logger; `metrics` hydrod's Metrics; `clock` Unix seconds."""

    def __init__(self, pool, *, default_ttl_s: float, response_timeout_s: float, metrics, log,
                 clock: Callable[[], float] = time.time, claim_limit: int = 1000):
        self.pool = pool
        self.default_ttl_s = default_ttl_s
        self.response_timeout_s = response_timeout_s
        self.metrics = metrics
        self.log = log
        self.clock = clock
        self.claim_limit = claim_limit

    # -- creating --

    def create(self, uid: str, body: Any, deadline: float | None = None) -> tuple[dict[str, Any], bool]:
        """(the command's summary, created) or CommandRefused. Not created: the same
        cmd_id with the same content exists already, and that one is returned."""
        new = check_body(body)
        with self.pool.connection(timeout=5) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT id, uid, gh_uid, node_secret, lifecycle_state FROM nodes WHERE uid = %s", (uid,))
            node = cur.fetchone()
            if node is None:
                raise CommandRefused(404, f"no node with uid {uid}")
            if new.cmd_id is not None:
                existing = self._same_or_refuse(cur, node, new)
                if existing is not None:
                    return existing, False
            if node["lifecycle_state"] == "DECOMMISSIONED":
                raise CommandRefused(409, f"node {uid} is decommissioned")
            if node["gh_uid"] is None:
                raise CommandRefused(409, f"node {uid} is not bound to a zone yet: push it a config naming "
                                          "`gh_uid` and `zone_uid` first")
            if not node["node_secret"]:
                raise CommandRefused(409, f"node {uid} has no node_secret yet: push it a config first")
            cmd_id = new.cmd_id or f"cmd-{secrets.token_hex(12)}"
            ttl_s = new.ttl_s if new.ttl_s is not None else self.default_ttl_s
            cur.execute(
                "INSERT INTO commands (cmd_id, node_id, channel, cmd, params, ttl_s, status, expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, 'QUEUED', now() + make_interval(secs => %s))"
                " ON CONFLICT (cmd_id) DO NOTHING RETURNING id",
                (cmd_id, node["id"], new.channel, new.cmd, Jsonb(new.params), ttl_s, ttl_s))
            row = cur.fetchone()
            if row is None:  # another instance took this cmd_id just now
                existing = self._same_or_refuse(cur, node, new)
                if existing is None:
                    raise CommandRefused(409, f"cmd_id {cmd_id} was taken and dropped at once: try again")
                return existing, False
            self._transition(cur, row["id"], QUEUED, None)
            if deadline is not None and time.monotonic() > deadline:
                raise CommandRefused(503, "hydrod is busy: the command was not made; it is safe to retry")
        self.metrics.commands.labels(QUEUED).inc()
        self.log.info("command_queued", cmd_id=cmd_id, node_uid=uid, channel=new.channel, cmd=new.cmd, ttl_s=ttl_s)
        return {"cmd_id": cmd_id, "node_uid": uid, "channel": new.channel, "cmd": new.cmd, "status": QUEUED}, True

    def _same_or_refuse(self, cur: psycopg.Cursor, node: dict[str, Any], new: NewCommand) -> dict[str, Any] | None:
        cur.execute("SELECT c.node_id, n.uid, c.channel, c.cmd, c.params, c.ttl_s, c.status"
                    " FROM commands c JOIN nodes n ON n.id = c.node_id WHERE c.cmd_id = %s", (new.cmd_id,))
        found = cur.fetchone()
        if found is None:
            return None
        same = (found["node_id"] == node["id"] and found["channel"] == new.channel and found["cmd"] == new.cmd
                and found["params"] == new.params and (new.ttl_s is None or found["ttl_s"] == new.ttl_s))
        if not same:
            raise CommandRefused(409, f"cmd_id {new.cmd_id} names another command already (node "
                                      f"{found['uid']}, channel {found['channel']}, cmd {found['cmd']})")
        return {"cmd_id": new.cmd_id, "node_uid": found["uid"], "channel": found["channel"], "cmd": found["cmd"],
                "status": found["status"]}

    # -- sending --

    def claim(self) -> list[Outgoing]:
        """The commands to publish now, signed now and recorded as handed over: for each
        online, bound node with no command between hand-over and PUBACK, its oldest
        queued command, if that has not expired. Call only while the link is up."""
        with self.pool.connection(timeout=5) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIM_LOCK,))
            self._expire(cur)
            cur.execute(
                "SELECT DISTINCT ON (c.node_id) c.id, c.cmd_id, c.channel, c.cmd, c.params, c.handed_at IS NULL,"
                "   n.uid, n.gh_uid, n.zone_uid, coalesce(n.topic_key, n.uid), n.node_secret,"
                "   n.status = 'online' AND n.lifecycle_state <> 'DECOMMISSIONED' AND n.gh_uid IS NOT NULL"
                " FROM commands c JOIN nodes n ON n.id = c.node_id"
                " WHERE c.status = 'QUEUED' ORDER BY c.node_id, c.id")
            due = [row for row in cur.fetchall() if row[5] and row[11]][: self.claim_limit]
            if not due:
                return []
            ts = int(self.clock())  # signed now: nodes refuse a ts more than 10 s from their clock
            out = []
            for cid, cmd_id, channel, cmd, params, _, uid, gh, zone, segment, secret, _ in due:
                topic = f"hydro/{gh}/{zone}/{segment}/{channel}/command"
                out.append(Outgoing(cid, cmd_id, uid, topic, signing.signed_payload(secret, cmd, cmd_id, params, ts)))
            cur.execute(
                "UPDATE commands c SET handed_at = now(), topic = o.topic, payload = o.payload::jsonb"
                " FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS o(id, topic, payload) WHERE c.id = o.id",
                ([o.id for o in out], [o.topic for o in out], [o.payload.decode() for o in out]))
        return out

    def published(self, command_ids: list[int]) -> None:
        """The broker took them (PUBACK): SENT, unless an answer moved them already."""
        with self.pool.connection(timeout=5) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("UPDATE commands c SET sent_at = coalesce(c.sent_at, now()),"
                        " status = CASE WHEN c.status = 'QUEUED' THEN 'SENT' ELSE c.status END"
                        " FROM nodes n WHERE n.id = c.node_id AND c.id = ANY(%s) AND c.handed_at IS NOT NULL"
                        " RETURNING c.id, c.cmd_id, n.uid, c.topic,"
                        "   c.status = 'SENT' AND c.acked_at IS NULL AND c.finished_at IS NULL",
                        (list(command_ids),))
            sent = [row for row in cur.fetchall() if row[4]]
            for row in sent:
                self._transition(cur, row[0], SENT, None)
        for _, cmd_id, uid, topic, _ in sent:
            self.metrics.commands.labels(SENT).inc()
            self.log.info("command_sent", cmd_id=cmd_id, node_uid=uid, topic=topic)

    def not_published(self, command_id: int) -> None:
        """The link could not publish it (it was down): it never left, so it waits again."""
        with self.pool.connection(timeout=5) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("UPDATE commands SET handed_at = NULL, payload = NULL, topic = NULL"
                        " WHERE id = %s AND status = 'QUEUED' RETURNING cmd_id", (command_id,))
            row = cur.fetchone()
        if row is not None:
            self.log.info("command_unpublished", cmd_id=row[0], detail="the broker link was down: queued again")

    # -- answers --

    def answer(self, answer: Answer) -> str:
        """Apply one command_response; returns what became of it (see `answers`)."""
        return self.answers([answer])[0]

    def answers(self, answers: list[Answer]) -> list[str]:
        """Apply command_responses in order, in one transaction; returns what became of
        each: `applied`, `ignored` (duplicate, out of order), `unknown` or `invalid`."""
        outcomes, notes = [], []
        with self.pool.connection(timeout=5) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            for answer in answers:
                outcome, note = self._answer(cur, answer)
                outcomes.append(outcome)
                notes.append(note)
        for outcome, note in zip(outcomes, notes):  # once committed
            self.metrics.command_responses.labels(outcome).inc()
            event, level, fields = note
            if outcome == "applied":
                self.metrics.commands.labels(fields["status"]).inc()
            getattr(self.log, level)(event, **fields)
        return outcomes

    def _answer(self, cur: psycopg.Cursor, answer: Answer) -> tuple[str, tuple[str, str, dict[str, Any]]]:
        try:
            body = json.loads(answer.payload)
        except (ValueError, UnicodeDecodeError):
            body = None
        status = body.get("status") if isinstance(body, dict) else None
        cmd_id = body.get("cmd_id") if isinstance(body, dict) else None
        if not isinstance(cmd_id, str) or not isinstance(status, str) or status.upper() not in ANSWERS:
            return "invalid", ("command_response_invalid", "warning", {
                "node_key": answer.node_key,
                "detail": "needs a string `cmd_id` and a `status` of ACK, DONE, NO_EFFECT, ERROR, INVALID, BUSY"})
        if protocol.holds_nul(body) or not _strict_json(body):
            return "invalid", ("command_response_invalid", "warning", {
                "node_key": answer.node_key, "cmd_id": cmd_id,
                "detail": "holds a NUL character or a number out of range, which the database cannot keep"})
        status = status.upper()
        # Only the node the command went to can answer it (uid, hardware id, or its topic segment).
        cur.execute("SELECT c.id, c.status, c.handed_at IS NOT NULL AS handed, n.uid"
                    " FROM commands c JOIN nodes n ON n.id = c.node_id"
                    " WHERE c.cmd_id = %s AND %s IN (n.uid, n.hardware_id, coalesce(n.topic_key, n.uid))"
                    " FOR UPDATE OF c", (cmd_id, answer.node_key))
        command = cur.fetchone()
        if command is None:
            return "unknown", ("command_response_unknown", "warning",
                               {"cmd_id": cmd_id, "node_key": answer.node_key, "status": status})
        moved = step(command["status"], command["handed"], status)
        if moved is None:
            return "ignored", ("command_response_ignored", "info", {
                "cmd_id": cmd_id, "node_uid": command["uid"], "answer": status, "command_status": command["status"],
                "reason": why_ignored(command["status"], command["handed"], status)})
        self._apply(cur, command["id"], moved, body, answer.received_at)
        new, late = moved
        if new == ACK:
            return "applied", ("command_acked", "info", {"cmd_id": cmd_id, "node_uid": command["uid"], "status": new})
        return "applied", ("command_finished", "info", {"cmd_id": cmd_id, "node_uid": command["uid"], "status": new,
                                                        "late": late, "error_code": body.get("error_code")})

    def _apply(self, cur: psycopg.Cursor, command_id: int, moved: tuple[str, bool], body: dict[str, Any],
               received_at: float) -> None:
        new, late = moved
        detail = {k: v for k, v in body.items() if k not in ("cmd_id", "status")}
        if new == ACK:
            cur.execute("UPDATE commands SET status = 'ACK', acked_at = to_timestamp(%s) WHERE id = %s",
                        (received_at, command_id))
        else:
            error_code = body.get("error_code")
            message = body.get("error_message")
            cur.execute(
                "UPDATE commands SET status = %s, finished_at = to_timestamp(%s), late = %s,"
                " error_code = %s, error_message = %s, details = %s WHERE id = %s",
                (new, received_at, late, error_code if isinstance(error_code, str) else None,
                 message if isinstance(message, str) else None,
                 None if body.get("details") is None else Jsonb(body["details"]), command_id))
        self._transition(cur, command_id, new, detail or None, late=late, at=received_at)

    def recover(self) -> int:
        """Apply the answers the history kept (node_events) to the commands still open:
        answers that came while no command mover was there to apply them (a crash
        after the history's commit). Returns how many moved a command."""
        with self.pool.connection(timeout=5) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT e.node_key, e.payload::text, extract(epoch FROM e.received_at)"
                " FROM commands c JOIN node_events e"
                "   ON e.kind = 'command_response' AND e.payload->>'cmd_id' = c.cmd_id"
                " WHERE c.status IN ('QUEUED', 'SENT', 'ACK', 'TIMEOUT') AND c.handed_at IS NOT NULL"
                # Only what came after the command's last change: not the answers applied already.
                "   AND e.received_at > (SELECT max(t.at) FROM command_transitions t WHERE t.command_id = c.id)"
                " ORDER BY e.id")
            kept = cur.fetchall()
        if not kept:
            return 0
        return self.answers([Answer(key, payload.encode(), float(at)) for key, payload, at in kept]).count("applied")

    # -- time --

    def sweep(self) -> None:
        """QUEUED past its ttl: EXPIRED. No final answer within response_timeout_s of the
        PUBACK, or of a hand-over never PUBACKed: TIMEOUT."""
        with self.pool.connection(timeout=5) as conn, conn.transaction(), conn.cursor() as cur:
            self._expire(cur)
            cur.execute(
                "UPDATE commands c SET status = 'TIMEOUT', finished_at = now(),"
                "   error_code = CASE WHEN c.status = 'QUEUED' THEN %(no_puback)s ELSE c.error_code END"
                " FROM nodes n WHERE n.id = c.node_id AND ("
                "   (c.status IN ('SENT', 'ACK') AND c.sent_at <= now() - make_interval(secs => %(t)s))"
                "   OR (c.status = 'QUEUED' AND c.handed_at <= now() - make_interval(secs => %(t)s)))"
                " RETURNING c.id, c.cmd_id, n.uid, c.error_code",
                {"t": self.response_timeout_s, "no_puback": NO_PUBACK})
            timed_out = cur.fetchall()
            for cid, _, _, code in timed_out:
                self._transition(cur, cid, TIMEOUT, {"reason": code or "no_answer"})
        for _, cmd_id, uid, code in timed_out:
            self.metrics.commands.labels(TIMEOUT).inc()
            self.log.warning("command_timeout", cmd_id=cmd_id, node_uid=uid, timeout_s=self.response_timeout_s,
                             reason=code or "no_answer")

    def _expire(self, cur: psycopg.Cursor) -> None:
        cur.execute(
            "UPDATE commands c SET status = 'EXPIRED', finished_at = now() FROM nodes n"
            " WHERE n.id = c.node_id AND c.status = 'QUEUED' AND c.handed_at IS NULL AND c.expires_at <= now()"
            " RETURNING c.id, c.cmd_id, n.uid, c.ttl_s, n.status")
        expired = cur.fetchall()
        for cid, cmd_id, uid, ttl_s, node_status in expired:
            self._transition(cur, cid, EXPIRED, {"ttl_s": ttl_s, "node_status": node_status})
            self.metrics.commands.labels(EXPIRED).inc()
            self.log.warning("command_expired", cmd_id=cmd_id, node_uid=uid, ttl_s=ttl_s, node_status=node_status)

    def _transition(self, cur: psycopg.Cursor, command_id: int, status: str, detail: dict[str, Any] | None,
                    late: bool = False, at: float | None = None) -> None:
        cur.execute("INSERT INTO command_transitions (command_id, status, late, detail, at)"
                    " VALUES (%s, %s, %s, %s, coalesce(to_timestamp(%s), now()))",
                    (command_id, status, late, None if detail is None else Jsonb(detail), at))

    # -- reads (the HTTP API reads on its own pool: core/reads.py) --

    def get(self, cmd_id: str) -> dict[str, Any] | None:
        with self.pool.connection(timeout=5) as conn:
            return read_command(conn, cmd_id)


def read_command(conn: psycopg.Connection, cmd_id: str) -> dict[str, Any] | None:
    """The command with every transition and its time, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT c.id, {_FIELDS} FROM commands c JOIN nodes n ON n.id = c.node_id"
                    " WHERE c.cmd_id = %s", (cmd_id,))
        command = cur.fetchone()
        if command is None:
            return None
        cur.execute("SELECT status, at, late, detail FROM command_transitions WHERE command_id = %s"
                    " ORDER BY id", (command.pop("id"),))
        command["transitions"] = cur.fetchall()
    return command


def read_node_commands(conn: psycopg.Connection, uid: str, limit: int) -> list[dict[str, Any]] | None:
    """The node's latest commands, newest first; None when there is no such node."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT id FROM nodes WHERE uid = %s", (uid,))
        node = cur.fetchone()
        if node is None:
            return None
        cur.execute(f"SELECT {_FIELDS} FROM commands c JOIN nodes n ON n.id = c.node_id"
                    " WHERE c.node_id = %s ORDER BY c.id DESC LIMIT %s", (node["id"], limit))
        return cur.fetchall()


def _strict_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


_FIELDS = ("c.cmd_id, n.uid AS node_uid, c.channel, c.cmd, c.params, c.status, c.topic, c.payload, c.ttl_s,"
           " c.created_at, c.handed_at, c.sent_at, c.acked_at, c.finished_at, c.expires_at, c.late,"
           " c.error_code, c.error_message, c.details")
