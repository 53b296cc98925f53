"""Everything hydrod says to PostgreSQL: migrations, and one function per write.

Plain functions over a psycopg connection or cursor: the actors own the
connections and the transactions; this module owns the SQL. Decisions that
must hold across several hydrod instances (uids, binds, acknowledgements) are
made here, in SQL, under row locks, not in any one process's memory.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass
from datetime import date, timedelta
from importlib import resources
from typing import Any, Iterable

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .errors import ConfigError, DatabaseUnusable
from . import protocol
from .protocol import STORE_REFUSED

MIGRATION_LOCK = 0x687964726F64  # "hydrod": one migrator at a time

# --- connecting (start-up and the commands) ---------------------------------------

# What libpq (fe-connect.c) and psycopg say of an option value they cannot use:
# no wait fixes these. Anything else (refused, timed out, DNS) may pass.
_BAD_OPTION = re.compile(r'invalid (?:integer value "[^"]*" for connection option|[\w ]+ value: |port number)'
                         r'|could not match \d+ (?:port numbers|host names) to')


def connect(dsn: str, timeout: float = 5) -> psycopg.Connection:
    """A connection for start-up and the commands, to a database hydrod can use.

    A DSN option libpq refuses raises ConfigError (its password never shown), a
    database that is not UTF-8 DatabaseUnusable; psycopg.OperationalError means
    PostgreSQL could not be reached."""
    try:
        conn = psycopg.connect(dsn, connect_timeout=timeout)
    except psycopg.OperationalError as exc:
        message = error_line(exc)
        if _BAD_OPTION.search(message):
            password = conninfo_to_dict(dsn).get("password")
            if password:
                message = message.replace(str(password), "*****")
            raise ConfigError(f"`database.dsn`: {message}") from None
        raise
    # Node names, configs and events are text and JSON from anywhere: a SQL_ASCII
    # database (initdb without LANG) stores bytes it cannot compare or escape.
    encoding = conn.info.parameter_status("server_encoding")
    if encoding != "UTF8":
        name = conn.info.dbname
        conn.close()
        raise DatabaseUnusable(f"database {name} is {encoding}, and hydrod needs UTF8: create it with CREATE "
                               f"DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' "
                               "TEMPLATE template0")
    return conn


def error_line(exc: BaseException) -> str:
    """The first line of a psycopg error, without libpq's 'connection is bad:' prefix."""
    text = str(exc).strip()
    return text.splitlines()[0].removeprefix("connection is bad: ") if text else type(exc).__name__

# --- migrations ---------------------------------------------------------------


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in migrations/, in order."""
    found = []
    for entry in resources.files("hydrod").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations not applied yet; return their names."""
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            applied_now.append(name)
    return applied_now


# --- the MQTT session's subscriptions ----------------------------------------------


def remember_subscriptions(conn: psycopg.Connection, client_id: str, wanted: Iterable[str]) -> list[str]:
    """Record the filters about to be subscribed for client_id; return the others ever
    subscribed for it, which its persistent session may still hold (to unsubscribe)."""
    wanted = list(wanted)
    with conn.transaction():
        conn.execute("INSERT INTO mqtt_subscriptions (client_id, filter) SELECT %s, unnest(%s::text[])"
                     " ON CONFLICT DO NOTHING", (client_id, wanted))
        rows = conn.execute("SELECT filter FROM mqtt_subscriptions WHERE client_id = %s"
                            " AND NOT filter = ANY(%s) ORDER BY filter", (client_id, wanted)).fetchall()
    return [row[0] for row in rows]


# --- staging (per connection) ---------------------------------------------------

STAGE_COLUMNS = (
    "seq", "kind", "node_key", "gh", "zone", "channel", "metric", "value", "ts",
    "received_at", "online", "uptime", "free_heap", "rssi", "fw_version", "payload", "dedup",
    "delivery", "dup",
)


def prepare_connection(conn: psycopg.Connection) -> None:
    """psycopg_pool `configure` hook: the staging table each batch is copied into."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS hydrod_stage ("
        " seq bigint, kind text, node_key text, gh text, zone text, channel text,"
        " metric text, value double precision, ts double precision,"
        " received_at double precision, online boolean, uptime double precision,"
        " free_heap bigint, rssi integer, fw_version text, payload jsonb, dedup text,"
        " delivery text, dup boolean"
        ") ON COMMIT DELETE ROWS"
    )
    conn.commit()


# --- history: telemetry, liveness, events ---------------------------------------

# STATUS_TIME. A node's status is set by the newest message by time, whichever
# hydrod instance commits it last: nodes.status_at keeps the time of the message
# that set it, and an older message leaves the status alone. A message's time is
# when hydrod received it: the one clock every kind has (heartbeats, last wills,
# hellos carry no ts), in the order the broker delivered them. A node's own ts is
# whole seconds from a clock synced to whole seconds: a status sent just after a
# heartbeat would often look older than it.



def node_named(key: str) -> str:
    """SQL for the id of the node that `key` (an SQL expression) names: the node with
    that uid, or else the one with that hardware id (SPEC §1). The one place this rule is."""
    return (f"(SELECT id FROM (SELECT id, 0 AS rank FROM nodes WHERE uid = {key}"
            f" UNION ALL SELECT id, 1 AS rank FROM nodes WHERE hardware_id = {key}) named"
            f" ORDER BY rank LIMIT 1)")


# One statement stores a whole staged batch: it resolves each row's node (by uid,
# then hardware id), refuses what must be refused, skips what the broker
# redelivered after it was stored, and says what it did (write_history).
_HISTORY_SQL = """
WITH keys AS (
    SELECT DISTINCT node_key FROM hydrod_stage
), resolved_keys AS (
    SELECT k.node_key, n.id, n.gh_uid, n.zone_uid
    FROM keys k JOIN nodes n ON n.id = {node_named_by_k}
), r AS (
    SELECT s.*, rk.id AS node_id,
        CASE
            WHEN rk.id IS NULL AND s.kind IN ('telemetry', 'heartbeat', 'status', 'lwt') THEN 'unknown_node'
            WHEN s.kind = 'telemetry' AND rk.gh_uid IS NOT NULL
                 AND (rk.gh_uid IS DISTINCT FROM s.gh OR rk.zone_uid IS DISTINCT FROM s.zone)
                THEN 'zone_mismatch'
        END AS reason,
        -- A redelivery (DUP) of a row without an identity of its own, stored already
        -- (or earlier in this batch): found by its packet id and bytes (`delivery`).
        coalesce(s.dup AND s.delivery IS NOT NULL AND (
            EXISTS (SELECT 1 FROM node_events e
                    WHERE e.node_key = s.node_key AND e.kind = s.kind AND e.delivery = s.delivery)
            OR EXISTS (SELECT 1 FROM hydrod_stage p
                       WHERE p.node_key = s.node_key AND p.kind = s.kind AND p.delivery = s.delivery
                         AND p.seq < s.seq)), false) AS redelivered
    FROM hydrod_stage s LEFT JOIN resolved_keys rk USING (node_key)
), samples AS (
    INSERT INTO telemetry_samples (node_id, channel, metric_type, value, ts, received_at, metadata)
    SELECT node_id, channel, metric, value, to_timestamp(ts), to_timestamp(received_at),
           payload - '{metric_type,value,ts}'::text[]
    FROM r WHERE kind = 'telemetry' AND reason IS NULL
    ORDER BY seq
    ON CONFLICT (node_id, channel, metric_type, ts) DO NOTHING
    RETURNING node_id, channel, metric_type, value, ts
), {rollups}, latest AS (
    INSERT INTO telemetry_last (node_id, channel, metric_type, value, ts, received_at, metadata)
    SELECT DISTINCT ON (node_id, channel, metric)
           node_id, channel, metric, value, to_timestamp(ts), to_timestamp(received_at),
           payload - '{metric_type,value,ts}'::text[]
    FROM r WHERE kind = 'telemetry' AND reason IS NULL
    ORDER BY node_id, channel, metric, ts DESC, seq DESC
    ON CONFLICT (node_id, channel, metric_type) DO UPDATE
        SET value = EXCLUDED.value, ts = EXCLUDED.ts,
            received_at = EXCLUDED.received_at, metadata = EXCLUDED.metadata
        WHERE telemetry_last.ts < EXCLUDED.ts
), events AS (
    INSERT INTO node_events (node_id, node_key, channel, kind, payload, ts, received_at, dedup, delivery)
    SELECT node_id, node_key, channel, kind, payload, to_timestamp(ts), to_timestamp(received_at), dedup, delivery
    FROM r WHERE kind NOT IN ('telemetry') AND reason IS NULL AND NOT redelivered
    ORDER BY seq  -- ids follow arrival order
    ON CONFLICT (node_key, kind, dedup) WHERE dedup IS NOT NULL DO NOTHING
    RETURNING kind
), live AS (
    SELECT node_id,
        max(received_at) FILTER (WHERE online) AS seen,
        -- The newest message by time sets the status (see STATUS_TIME), not the last to commit.
        (array_agg(online ORDER BY received_at DESC, seq DESC))[1] AS online,
        max(received_at) AS status_time,
        max(received_at) FILTER (WHERE kind = 'heartbeat') AS heartbeat_at,
        (array_agg(uptime ORDER BY seq DESC) FILTER (WHERE kind = 'heartbeat'))[1] AS uptime,
        (array_agg(free_heap ORDER BY seq DESC) FILTER (WHERE kind = 'heartbeat'))[1] AS free_heap,
        (array_agg(rssi ORDER BY seq DESC) FILTER (WHERE kind = 'heartbeat'))[1] AS rssi,
        (array_agg(fw_version ORDER BY seq DESC) FILTER (WHERE kind = 'heartbeat' AND fw_version IS NOT NULL))[1] AS fw_version
    FROM r WHERE node_id IS NOT NULL AND reason IS NULL AND NOT redelivered
    GROUP BY node_id
), touched AS (
    UPDATE nodes n SET
        status = CASE WHEN n.status_at IS NULL OR to_timestamp(live.status_time) >= n.status_at
                      THEN CASE WHEN live.online THEN 'online' ELSE 'offline' END
                      ELSE n.status END,
        status_at = greatest(n.status_at, to_timestamp(live.status_time)),
        last_seen_at = CASE WHEN live.seen IS NULL THEN n.last_seen_at
                            ELSE greatest(n.last_seen_at, to_timestamp(live.seen)) END,
        last_heartbeat_at = coalesce(to_timestamp(live.heartbeat_at), n.last_heartbeat_at),
        uptime_seconds = coalesce(live.uptime, n.uptime_seconds),
        free_heap_bytes = coalesce(live.free_heap, n.free_heap_bytes),
        rssi = coalesce(live.rssi, n.rssi),
        fw_version = coalesce(live.fw_version, n.fw_version),
        updated_at = now()
    FROM (SELECT l.*, o.status AS old_status FROM live l JOIN nodes o ON o.id = l.node_id) live
    WHERE n.id = live.node_id
    RETURNING n.uid, n.status, live.old_status
)
SELECT 'reject' AS what, seq::text, reason FROM r WHERE reason IS NOT NULL
UNION ALL
SELECT 'status', uid, status FROM touched WHERE status IS DISTINCT FROM old_status
UNION ALL
SELECT 'redelivered', seq::text, kind FROM r WHERE redelivered AND reason IS NULL
UNION ALL
SELECT 'written', kind, count(*)::text
FROM (SELECT 'telemetry'::text AS kind FROM samples UNION ALL SELECT kind FROM events) w
GROUP BY kind
""".replace("{node_named_by_k}", node_named("k.node_key"))

# ROLLUPS. Only the samples this statement inserted (RETURNING of ON CONFLICT DO
# NOTHING: a redelivery inserts nothing) are added to their minute, hour and day,
# under the rollup row's lock, in the transaction that stores them: a rollup never
# lags its raw rows and never counts a sample twice, whichever instance stores it.
# Buckets are UTC, like the day partitions. A bucket's avg takes in the batch's sum
# weighted by the counts. Rows are upserted in key order, so two writers lock the
# same buckets in the same order.
_ROLLUP_SQL = """
{name}_new AS (
    SELECT node_id, channel, metric_type, date_trunc('{unit}', {ts}, 'UTC') AS bucket,
           {count} AS count, min({min}) AS min, max({max}) AS max, sum({sum}) AS sum,
           (array_agg({last} ORDER BY {last_ts} DESC))[1] AS last, max({last_ts}) AS last_ts
    FROM {source} GROUP BY 1, 2, 3, 4
), {name}_up AS (
    INSERT INTO telemetry_{table} AS t (node_id, channel, metric_type, bucket, count, min, max, avg, last,
                                       last_ts)
    SELECT node_id, channel, metric_type, bucket, count, min, max, sum / count, last, last_ts
    FROM {name}_new ORDER BY node_id, channel, metric_type, bucket
    ON CONFLICT (node_id, channel, metric_type, bucket) DO UPDATE SET
        count = t.count + EXCLUDED.count, min = least(t.min, EXCLUDED.min), max = greatest(t.max, EXCLUDED.max),
        avg = (t.avg * t.count + EXCLUDED.avg * EXCLUDED.count) / (t.count + EXCLUDED.count),
        last = CASE WHEN EXCLUDED.last_ts > t.last_ts THEN EXCLUDED.last ELSE t.last END,
        last_ts = greatest(t.last_ts, EXCLUDED.last_ts)
)"""
_FROM_SAMPLES = {"ts": "ts", "count": "count(*)", "min": "value", "max": "value", "sum": "value",
                 "last": "value", "last_ts": "ts"}
_FROM_ROLLUP = {"ts": "bucket", "count": "sum(count)", "min": "min", "max": "max", "sum": "sum",
                "last": "last", "last_ts": "last_ts"}
_HISTORY_SQL = _HISTORY_SQL.replace("{rollups}", ",\n".join((
    _ROLLUP_SQL.format(name="minute", table="1m", unit="minute", source="samples", **_FROM_SAMPLES).strip(),
    _ROLLUP_SQL.format(name="hour", table="1h", unit="hour", source="minute_new", **_FROM_ROLLUP).strip(),
    _ROLLUP_SQL.format(name="day", table="1d", unit="day", source="hour_new", **_FROM_ROLLUP).strip(),
)))


@dataclass(frozen=True)
class HistoryWritten:
    refused: list[tuple[int, str, str]]  # (seq, reason, detail)
    statuses: dict[str, str]  # {uid: new status} for nodes whose status changed
    redelivered: list[int]  # seqs skipped: the broker's redelivery of a row stored already
    written: dict[str, int]  # rows inserted, by kind; the rest of a kind were there already


def write_history(cur: psycopg.Cursor, rows: Iterable[tuple]) -> HistoryWritten:
    """Store staged history rows (STAGE_COLUMNS); say what was refused, skipped and
    written. A row PostgreSQL refuses to stage is left out as `store_refused`."""
    rows = list(rows)
    done = HistoryWritten([(rows[index][0], STORE_REFUSED, detail) for index, detail in _stage(cur, rows)],
                          {}, [], {})
    ensure_partitions(cur, (row[_TS] for row in rows if row[_KIND] == "telemetry"))
    cur.execute(_HISTORY_SQL)
    for what, key, value in cur.fetchall():
        if what == "reject":
            done.refused.append((int(key), value, ""))
        elif what == "status":
            done.statuses[key] = value
        elif what == "redelivered":
            done.redelivered.append(int(key))
        else:
            done.written[key] = int(value)
    return done


_KIND, _TS = STAGE_COLUMNS.index("kind"), STAGE_COLUMNS.index("ts")


def ensure_partitions(cur: psycopg.Cursor, timestamps: Iterable[float]) -> int:
    """Make the day partitions of telemetry_samples that samples at these unix
    times need and that are missing; return how many were made. One round trip:
    days that exist are checked without a lock (see migrations/005_history.sql)."""
    days = sorted({date(1970, 1, 1) + timedelta(days=int(ts // 86400)) for ts in timestamps})
    if not days:
        return 0
    cur.execute("SELECT hydrod_telemetry_partitions(%s::date[])", (days,))
    return int(cur.fetchone()[0])


def make_partitions_ahead(cur: psycopg.Cursor, days: int) -> int:
    """Make the partitions of today and the next `days` days (UTC) that are missing."""
    cur.execute("SELECT hydrod_telemetry_partitions(array(SELECT (now() AT TIME ZONE 'UTC')::date + i"
                " FROM generate_series(0, %s) AS i))", (days,))
    return int(cur.fetchone()[0])


def expired_partitions(conn: psycopg.Connection, raw_days: int) -> list[tuple[str, bool | None]]:
    """(name, detach pending) of each day partition wholly older than raw_days, oldest
    first; None for a day table left detached by a pruning that stopped half-way."""
    return [(name, pending) for name, pending in conn.execute(
        "SELECT c.relname, i.inhdetachpending FROM pg_class c"
        " LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND i.inhparent = 'telemetry_samples'::regclass"
        " WHERE c.relkind = 'r' AND c.relname ~ '^telemetry_samples_[0-9]{8}$'"
        "   AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'telemetry_samples'::regclass)"
        "   AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'"
        "       <= now() - make_interval(days => %s)"
        " ORDER BY c.relname", (raw_days,))]


def drop_partitions(conn: psycopg.Connection, partitions: list[tuple[str, bool | None]]) -> None:
    """Detach and drop days of raw samples (expired_partitions); `conn` in autocommit mode.

    DETACH ... CONCURRENTLY takes only SHARE UPDATE EXCLUSIVE on telemetry_samples:
    inserts and reads go on meanwhile (it waits for the transactions that use the
    table). The 'prune' lock keeps a writer that needs one of these old days from
    checking it half-detached (migrations/005_history.sql). Then one DROP for all."""
    if not partitions:
        return
    conn.execute("SELECT pg_advisory_lock(hydrod_partition_lock('prune'))")
    try:
        for name, pending in partitions:
            if pending is not None:
                how = sql.SQL("FINALIZE" if pending else "CONCURRENTLY")
                conn.execute(sql.SQL("ALTER TABLE telemetry_samples DETACH PARTITION {} {}")
                             .format(sql.Identifier(name), how))
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.SQL(", ").join(sql.Identifier(name)
                                                                         for name, _ in partitions)))
    finally:
        conn.execute("SELECT pg_advisory_unlock(hydrod_partition_lock('prune'))")


ROLLUP_TABLES = ("telemetry_1m", "telemetry_1h", "telemetry_1d")


def prune_rollup(conn: psycopg.Connection, table: str, days: int) -> int:
    """Delete a rollup's buckets that began more than `days` days ago; return how many."""
    if table not in ROLLUP_TABLES:
        raise ValueError(f"not a rollup table: {table}")
    cur = conn.execute(sql.SQL("DELETE FROM {} WHERE bucket < now() - make_interval(days => %s)")
                       .format(sql.Identifier(table)), (days,))
    return cur.rowcount


_COPY_STAGE = f"COPY hydrod_stage ({', '.join(STAGE_COLUMNS)}) FROM STDIN"
# COPY's error context names the refused row: "COPY hydrod_stage, line 3, column rssi: ...".
_COPY_LINE = re.compile(r"hydrod_stage\D*?(\d+)")


def _stage(cur: psycopg.Cursor, rows: list[tuple]) -> list[tuple[int, str]]:
    """COPY rows into the staging table, leaving out each one PostgreSQL refuses;
    return (index, detail) of those.

    Each COPY runs under a savepoint, so a refused row costs a few more COPYs, not
    the transaction. The error names the row (its line in COPY's context, or the
    row psycopg was writing): the rows before it go in one COPY, then it alone. An
    error that names no row suspects the middle. A COPY that fails sends its rows
    for nothing, so after a refusal the next COPY is half as long, and after a
    success twice as long: refusals come in runs, and a run of n costs about n
    one-row COPYs, not n COPYs of the rest of the batch."""
    refused: list[tuple[int, str]] = []
    lo, size, suspect = 0, len(rows), None
    while lo < len(rows):
        hi = lo + 1 if suspect == lo else suspect if suspect is not None else min(len(rows), lo + size)
        at = lo
        try:
            with cur.connection.transaction(), cur.copy(_COPY_STAGE) as copy:
                for at in range(lo, hi):
                    copy.write_row(rows[at])
        except psycopg.DataError as exc:
            size = max(1, (hi - lo) // 2)
            if hi - lo == 1:
                refused.append((lo, refusal_detail(exc)))
                lo, suspect = hi, None
                continue
            named = at if exc.sqlstate is None else _refused_line(exc, lo, hi)  # no SQLSTATE: psycopg's
            suspect = named if named is not None else lo + (hi - lo) // 2
            continue
        if suspect is None:
            size *= 2
        elif suspect < hi:
            suspect = None  # it was not the one after all
        lo = hi
    return refused


def _refused_line(exc: psycopg.Error, lo: int, hi: int) -> int | None:
    """The index of the row a COPY of rows[lo:hi] failed on, from the error's context."""
    found = _COPY_LINE.search(exc.diag.context or "")
    index = lo + int(found.group(1)) - 1 if found else -1
    return index if lo <= index < hi else None


def refusal_detail(exc: psycopg.Error) -> str:
    """Why PostgreSQL refused a row: its primary message and SQLSTATE. Never the
    error's detail or context: they quote the row ("Failing row contains ...")."""
    message = exc.diag.message_primary or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(message) > 200:
        message = message[:200] + "..."
    return f"{message} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else message


def write_dead_letters(cur: psycopg.Cursor, rows: Iterable[tuple[float, str, bytes, str, str]]) -> None:
    """rows: (received_at unix seconds, topic, payload, reason, detail)."""
    with cur.copy("COPY dead_letters (received_at, topic, payload, reason, detail) FROM STDIN") as copy:
        for received_at, topic, payload, reason, detail in rows:
            copy.write_row((_ts(received_at), topic, payload, reason, detail))


def _ts(unix: float):
    from datetime import datetime, timezone
    return datetime.fromtimestamp(unix, tz=timezone.utc)


def mark_silent_offline(cur: psycopg.Cursor, offline_after_s: float) -> list[str]:
    """Nodes online but silent for offline_after_s become offline; return their uids.

    The new status is as of the node's last sign of life (STATUS_TIME): any later
    message brings it back, even one received before this sweep and committed after.
    The history gets a `status` event, stamped when the silence began to count."""
    cur.execute(
        "WITH silent AS ("
        "   UPDATE nodes SET status = 'offline', updated_at = now(),"
        "     status_at = greatest(status_at, coalesce(last_seen_at, now()))"
        "   WHERE status = 'online' AND (last_seen_at IS NULL"
        "     OR last_seen_at < now() - make_interval(secs => %(after)s))"
        "   RETURNING id, uid, last_seen_at"
        " ), history AS ("
        "   INSERT INTO node_events (node_id, node_key, kind, payload, ts, received_at)"
        "   SELECT id, uid, 'status',"
        "     jsonb_build_object('status', 'OFFLINE', 'reason', 'silent', 'after_s', %(after)s::double precision),"
        "     coalesce(last_seen_at + make_interval(secs => %(after)s), now()), now()"
        "   FROM silent ORDER BY uid"
        " )"
        " SELECT uid FROM silent ORDER BY uid",
        {"after": offline_after_s},
    )
    return [row[0] for row in cur.fetchall()]


# --- registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    uid: str
    created: bool
    changed: tuple[str, ...]  # the fields a repeat hello changed


def register_node(cur: psycopg.Cursor, *, hardware_id: str, node_type: str, fw_version: str | None,
                  capabilities: list[str] | None, hardware_revision: str | None, name: str | None,
                  wanted_uid: str | None, base: str, seen_at: float) -> Registration:
    """Create the node for a new hardware id, or update a known one (uid kept).

    A repeat hello without fw_version, capabilities or hardware_revision (None)
    keeps the stored ones.

    One statement for a known node, one for a new one whose uid is free: a
    fleet that says hello all at once after an outage is mostly round trips."""
    seen = _ts(seen_at)
    cur.execute(
        "WITH old AS (SELECT id, uid, type, fw_version, capabilities, hardware_revision FROM nodes"
        "             WHERE hardware_id = %s FOR UPDATE)"
        " UPDATE nodes n SET type = %s, fw_version = coalesce(%s, n.fw_version),"
        "   capabilities = coalesce(%s, n.capabilities), hardware_revision = coalesce(%s, n.hardware_revision),"
        "   name = coalesce(%s, n.name),"
        "   status = CASE WHEN n.status_at IS NULL OR n.status_at <= %s THEN 'online' ELSE n.status END,"
        "   status_at = greatest(n.status_at, %s),"
        "   last_seen_at = greatest(n.last_seen_at, %s), updated_at = now()"
        " FROM old WHERE n.id = old.id"
        " RETURNING old.uid, old.type, old.fw_version, old.capabilities, old.hardware_revision",
        (hardware_id, node_type, fw_version, None if capabilities is None else Jsonb(capabilities),
         hardware_revision, name, seen, seen, seen),
    )
    row = cur.fetchone()
    if row is not None:
        uid, old_type, old_fw, old_caps, old_rev = row
        changed = tuple(field for field, old, new in (
            ("type", old_type, node_type), ("fw_version", old_fw, fw_version),
            ("capabilities", old_caps, capabilities), ("hardware_revision", old_rev, hardware_revision),
        ) if new is not None and old != new)
        return Registration(uid, False, changed)
    first = wanted_uid or base
    candidates = itertools.chain([first], (c for c in _uid_candidates(cur, first) if c != first))
    for candidate in candidates:
        cur.execute(
            "INSERT INTO nodes (uid, hardware_id, type, fw_version, capabilities, hardware_revision,"
            " name, status, status_at, last_seen_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, 'online', %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING uid",
            (candidate, hardware_id, node_type, fw_version, Jsonb(capabilities or []), hardware_revision,
             name, seen, seen),
        )
        if cur.fetchone() is not None:
            return Registration(candidate, True, ())
        # Either the uid is taken (try the next) or another instance registered
        # this very hardware id meanwhile (then it is an update).
        cur.execute("SELECT 1 FROM nodes WHERE hardware_id = %s", (hardware_id,))
        if cur.fetchone() is not None:
            return register_node(cur, hardware_id=hardware_id, node_type=node_type, fw_version=fw_version,
                                 capabilities=capabilities, hardware_revision=hardware_revision,
                                 name=name, wanted_uid=wanted_uid, base=base, seen_at=seen_at)
    raise RuntimeError("unreachable: uid candidates are endless")


def _uid_candidates(cur: psycopg.Cursor, base: str):
    """base, base-1, base-2, ... skipping the ones already taken."""
    cur.execute(
        "SELECT uid FROM nodes WHERE uid = %s OR uid LIKE %s",
        (base, base.replace("_", r"\_").replace("%", r"\%") + "-%"),
    )
    taken = {row[0] for row in cur.fetchall()}
    if base not in taken:
        yield base
    suffix = 1
    while True:
        candidate = f"{base}-{suffix}"
        if candidate not in taken:
            yield candidate
        suffix += 1


@dataclass(frozen=True)
class ReportOutcome:
    uid: str | None  # None: the node is unknown and the report is held
    applied_versions: tuple[int, ...]
    bound_to: tuple[str, str] | None
    # (version, payload, hardware id): a bound node back in the temp namespace, to be
    # sent its last applied config again (claimed here, at most once per interval).
    resend: tuple[int, bytes, str] | None = None


def find_node(cur: psycopg.Cursor, node_key: str, lock: bool = False) -> dict[str, Any] | None:
    """The node `node_key` names (node_named), locked with `lock`."""
    cur.execute(f"SELECT * FROM nodes WHERE id = {node_named('%(key)s')}{' FOR UPDATE' if lock else ''}",
                {"key": node_key})
    row = cur.fetchone()
    return None if row is None else dict(zip([c.name for c in cur.description], row))


def store_config_report(cur: psycopg.Cursor, *, node_key: str, gh: str, zone: str, temp: bool,
                        topic: str, config: dict[str, Any], received_at: float,
                        resend_interval_s: float | None = None) -> ReportOutcome:
    """Keep a node's reported config; acknowledge pushes; complete a pending bind.

    With resend_interval_s, a bound node reporting from the temp namespace (reset,
    reflashed) is due its last applied config again: see ReportOutcome.resend."""
    lock_node_keys(cur, [node_key])
    node = find_node(cur, node_key, lock=True)
    if node is None:
        cur.execute(
            "INSERT INTO held_config_reports (node_key, gh, zone, topic, payload, received_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (node_key) DO UPDATE SET gh = EXCLUDED.gh, zone = EXCLUDED.zone,"
            " topic = EXCLUDED.topic, payload = EXCLUDED.payload, received_at = EXCLUDED.received_at"
            " WHERE held_config_reports.received_at <= EXCLUDED.received_at",
            (node_key, gh, zone, topic, Jsonb(config), _ts(received_at)),
        )
        return ReportOutcome(None, (), None)
    version = config.get("version")
    reported = version if isinstance(version, (int, float)) and not isinstance(version, bool) else None
    # A report acknowledges the configs that sent the node where it now reports
    # from: a report from the temp namespace (sent on every connect) is no
    # acknowledgement of a config that binds the node to a zone. Only configs
    # handed to the link: one still queued cannot have been applied, while one
    # sent may be applied before its PUBACK is recorded.
    cur.execute(
        "UPDATE node_configs SET status = 'applied', applied_at = now()"
        " WHERE node_id = %s AND status IN ('queued', 'published', 'timeout') AND sent_at IS NOT NULL"
        "   AND (%s::double precision IS NULL OR version <= %s::double precision)"
        "   AND config->>'gh_uid' = %s AND config->>'zone_uid' = %s"
        " RETURNING version",
        (node["id"], reported, reported, gh, zone),
    )
    applied = cur.fetchall()
    # A bind completes when the node reports from the gh/zone a config sent it to.
    bound_to = (gh, zone) if node["gh_uid"] is None and not temp and applied else None
    # A held report applied late must not replace a newer one.
    cur.execute(
        "UPDATE nodes SET config = CASE WHEN config_reported_at IS NULL OR config_reported_at <= %(at)s"
        "   THEN %(config)s ELSE config END,"
        " config_reported_at = greatest(config_reported_at, %(at)s),"
        " status = CASE WHEN status_at IS NULL OR status_at <= %(at)s THEN 'online' ELSE status END,"
        " status_at = greatest(status_at, %(at)s),"
        " last_seen_at = greatest(last_seen_at, %(at)s), updated_at = now(),"
        " gh_uid = coalesce(%(gh)s, gh_uid), zone_uid = coalesce(%(zone)s, zone_uid),"
        # The node segment the node uses in its own zone (uid or hardware id): commands go there.
        " topic_key = CASE WHEN %(own)s THEN %(key)s ELSE topic_key END,"
        " lifecycle_state = CASE WHEN %(bound)s AND lifecycle_state IN"
        "   ('MANUFACTURED', 'UNPROVISIONED', 'PROVISIONED_WIFI', 'REGISTERED_BACKEND')"
        "   THEN 'ASSIGNED_TO_ZONE' ELSE lifecycle_state END"
        " WHERE id = %(id)s",
        {"at": _ts(received_at), "config": Jsonb(config), "gh": bound_to[0] if bound_to else None,
         "zone": bound_to[1] if bound_to else None, "bound": bound_to is not None, "id": node["id"],
         "own": not temp and (bound_to == (gh, zone) or (node["gh_uid"], node["zone_uid"]) == (gh, zone)),
         "key": node_key},
    )
    resend = None
    if (temp and resend_interval_s is not None and node["gh_uid"] is not None
            and node["lifecycle_state"] != "DECOMMISSIONED"):
        claimed = _claim_resend(cur, node["id"], resend_interval_s)
        if claimed is not None:
            resend = (*claimed, node["hardware_id"])
    return ReportOutcome(node["uid"], tuple(int(row[0]) for row in applied), bound_to, resend)


def _claim_resend(cur: psycopg.Cursor, node_id: int, interval_s: float) -> tuple[int, bytes] | None:
    """(version, payload as published) of the node's last applied config, when it was
    not sent again within interval_s; the claim is kept in nodes.config_resent_at, so
    it holds across restarts and instances (the node's row is locked by the caller)."""
    cur.execute(
        "WITH last AS (SELECT version, payload FROM node_configs WHERE node_id = %(id)s AND status = 'applied'"
        "              ORDER BY version DESC LIMIT 1),"
        " claim AS (UPDATE nodes SET config_resent_at = now()"
        "   WHERE id = %(id)s AND EXISTS (SELECT 1 FROM last)"
        "     AND (config_resent_at IS NULL OR config_resent_at <= now() - make_interval(secs => %(interval)s))"
        "   RETURNING id)"
        " SELECT version, payload FROM last WHERE EXISTS (SELECT 1 FROM claim)",
        {"id": node_id, "interval": interval_s},
    )
    row = cur.fetchone()
    return None if row is None else (int(row[0]), row[1].encode())


NODE_KEY_LOCK = 0x6879  # advisory lock namespace: one lock per node key (uid or hardware id)


def lock_node_keys(cur: psycopg.Cursor, keys: Iterable[str]) -> None:
    """Serialise, across hydrod instances, holding a report for a node key and
    registering the node under it: neither can miss the other (until commit)."""
    cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(k)) FROM unnest(%s::text[]) AS k ORDER BY k",
                (NODE_KEY_LOCK, sorted(set(keys))))


def expire_held_reports(cur: psycopg.Cursor, ttl_s: float) -> list[tuple[str, str, float]]:
    """Drop reports held longer than ttl_s (their node never said hello); return (node_key, topic, age s)."""
    cur.execute(
        "DELETE FROM held_config_reports WHERE received_at < now() - make_interval(secs => %s)"
        " RETURNING node_key, topic, extract(epoch FROM now() - received_at)",
        (ttl_s,),
    )
    return [(key, topic, float(age)) for key, topic, age in cur.fetchall()]


def take_held_reports(cur: psycopg.Cursor, keys: Iterable[str]) -> list[dict[str, Any]]:
    cur.execute(
        "DELETE FROM held_config_reports WHERE node_key = ANY(%s)"
        " RETURNING node_key, gh, zone, topic, payload, extract(epoch FROM received_at)",
        (list(keys),),
    )
    return [dict(zip(("node_key", "gh", "zone", "topic", "payload", "received_at"), row))
            for row in cur.fetchall()]


# --- config push --------------------------------------------------------------------


def node_for_push(cur: psycopg.Cursor, uid: str) -> dict[str, Any] | None:
    """The node to push to, locked, with a node_secret generated once and kept."""
    cur.execute("SELECT id, uid, hardware_id, type, gh_uid, zone_uid, node_secret, lifecycle_state"
                " FROM nodes WHERE uid = %s FOR UPDATE", (uid,))
    row = cur.fetchone()
    if row is None:
        return None
    node = dict(zip([c.name for c in cur.description], row))
    if not node["node_secret"]:
        node["node_secret"] = secrets.token_hex(32)
        cur.execute("UPDATE nodes SET node_secret = %s WHERE id = %s", (node["node_secret"], node["id"]))
    cur.execute("SELECT coalesce(max(version), 0) FROM node_configs WHERE node_id = %s", (node["id"],))
    node["last_version"] = int(cur.fetchone()[0])
    return node


def keep_node_secret(cur: psycopg.Cursor, node_id: int, secret: str) -> None:
    cur.execute("UPDATE nodes SET node_secret = %s, updated_at = now() WHERE id = %s", (secret, node_id))


def record_config(cur: psycopg.Cursor, *, node_id: int, version: int, payload: bytes, topic: str) -> int:
    """`config` is the published bytes themselves, as jsonb: exactly what went out."""
    text = payload.decode()
    cur.execute(
        "INSERT INTO node_configs (node_id, version, config, payload, topic, status)"
        " VALUES (%s, %s, %s::jsonb, %s, %s, 'queued') RETURNING id",
        (node_id, version, text, text, topic),
    )
    return int(cur.fetchone()[0])


def mark_sent(cur: psycopg.Cursor, config_ids: list[int]) -> None:
    """These queued configs are being handed to the broker link (committed before they are)."""
    cur.execute("UPDATE node_configs SET sent_at = now() WHERE id = ANY(%s) AND status = 'queued'",
                (list(config_ids),))


def mark_published(cur: psycopg.Cursor, config_id: int, topic: str) -> None:
    cur.execute(
        "UPDATE node_configs SET status = 'published', published_at = now(), topic = %s,"
        " sent_at = coalesce(sent_at, now())"
        " WHERE id = %s AND status = 'queued'",
        (topic, config_id),
    )


def queued_configs(cur: psycopg.Cursor) -> list[tuple[int, str, int, str, bytes]]:
    """(config id, node uid, version, topic, payload) of every config not yet taken by the broker.

    The topic is worked out again: a node bound since the push listens on its own
    namespace now, not on the temp one the push was recorded for."""
    cur.execute("SELECT c.id, n.uid, c.version, c.topic, n.gh_uid, n.zone_uid, c.payload"
                " FROM node_configs c JOIN nodes n ON n.id = c.node_id WHERE c.status = 'queued' ORDER BY c.id")
    return [(config_id, uid, int(version), topic if gh is None else protocol.config_topic(gh, zone, uid),
             payload.encode()) for config_id, uid, version, topic, gh, zone, payload in cur.fetchall()]


def expire_configs(cur: psycopg.Cursor, timeout_s: float) -> list[tuple[str, int, str]]:
    """Published configs unacknowledged for timeout_s become `timeout`."""
    cur.execute(
        "UPDATE node_configs c SET status = 'timeout' FROM nodes n"
        " WHERE c.node_id = n.id AND c.status = 'published'"
        "   AND c.published_at < now() - make_interval(secs => %s)"
        " RETURNING n.uid, c.version, c.topic",
        (timeout_s,),
    )
    return [tuple(row) for row in cur.fetchall()]


# --- reads --------------------------------------------------------------------------

# Never node_secret, not even as an echo inside the node's reported config.
NODE_FIELDS = (
    "uid, hardware_id, type, fw_version, hardware_revision, capabilities, name, lifecycle_state,"
    " status, gh_uid, zone_uid, config - 'node_secret' AS config, last_seen_at, last_heartbeat_at,"
    " uptime_seconds, free_heap_bytes, rssi, created_at, updated_at"
)


def list_nodes(conn: psycopg.Connection, uid: str | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        if uid is None:
            cur.execute(f"SELECT {NODE_FIELDS} FROM nodes ORDER BY uid")
        else:
            cur.execute(f"SELECT {NODE_FIELDS} FROM nodes WHERE uid = %s", (uid,))
        return cur.fetchall()
