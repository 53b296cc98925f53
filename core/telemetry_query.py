"""Reading telemetry back (SPEC §8): a node's points over a range, and its latest values.

Plain functions over a psycopg connection; no actor is involved. `parse_query` turns
the HTTP API's query string into a `TelemetryQuery`, refusing what it cannot use with
a `BadQuery` that names the parameter. `points` answers it from the raw samples or
one rollup table, `latest` from `telemetry_last`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

STEPS = ("raw", "1m", "1h", "1d")  # finest first: `auto` takes the first that fits
WIDTH = {"raw": None, "1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
TABLE = {"1m": "telemetry_1m", "1h": "telemetry_1h", "1d": "telemetry_1d"}
AUTO_MAX_POINTS = 2000  # SPEC §8: `auto` is the finest step answering with at most this many
MAX_POINTS = 100_000  # an explicit step answering with more is refused: the answer would be megabytes
DEFAULT_RANGE = timedelta(hours=24)  # `from` when not given: a day before `to`


class BadQuery(ValueError):
    """A query parameter that cannot be used; `parameter` names it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter
        self.message = message


@dataclass(frozen=True)
class TelemetryQuery:
    metric: str
    channel: str | None
    start: datetime
    end: datetime
    step: str  # one of STEPS, or "auto"


def parse_query(args: Mapping[str, str], now: datetime | None = None) -> TelemetryQuery:
    """`metric` (required), `channel`, `from`, `to` (ISO 8601 or Unix seconds; `to`
    defaults to now, `from` to a day before `to`), `step` (default `auto`)."""
    metric = args.get("metric", "").strip()
    if not metric:
        raise BadQuery("metric", "`metric` is required, e.g. metric=PH")
    channel = args.get("channel", "").strip() or None
    step = args.get("step", "").strip() or "auto"
    if step not in (*STEPS, "auto"):
        raise BadQuery("step", f"`step` must be one of raw, 1m, 1h, 1d, auto, not {step!r}")
    now = now or datetime.now(UTC)
    end = parse_time("to", args["to"]) if args.get("to", "").strip() else now
    start = parse_time("from", args["from"]) if args.get("from", "").strip() else end - DEFAULT_RANGE
    if start > end:
        raise BadQuery("from", f"`from` ({start.isoformat()}) is after `to` ({end.isoformat()})")
    return TelemetryQuery(metric, channel, start, end, step)


def parse_time(name: str, text: str) -> datetime:
    """ISO 8601 (a time without an offset is UTC), or Unix seconds."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            raise BadQuery(name, f"`{name}` is not a finite number of Unix seconds: {text!r}")
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise BadQuery(name, f"`{name}` is out of range: {text!r}") from None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(name, f"`{name}` is neither ISO 8601 nor Unix seconds: {text!r} "
                             "(e.g. 2026-03-01T12:00:00Z or 1772366400)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Series:
    """What `points` answers: the channel and step it used, and the points in time order
    as a JSON array, made by PostgreSQL (a day of raw samples is tens of thousands of
    points: built and encoded in Python they cost several times as much)."""

    channel: str | None
    step: str
    count: int
    points_json: str  # [{"ts": ISO 8601 in UTC, "avg", "min", "max", "count"}, ...]


class TooManyPoints(BadQuery):
    def __init__(self, step: str):
        super().__init__("step", f"step={step} answers with more than {MAX_POINTS} points over this range: "
                                 "choose a coarser step or a shorter range")


class AmbiguousChannel(BadQuery):
    def __init__(self, metric: str, channels: list[str]):
        super().__init__("channel", f"metric {metric} is on channels {', '.join(channels)}: name one with channel=")


def node_id(conn: psycopg.Connection, uid: str) -> int | None:
    row = conn.execute("SELECT id FROM nodes WHERE uid = %s", (uid,)).fetchone()
    return row[0] if row else None


def points(conn: psycopg.Connection, uid: str, query: TelemetryQuery) -> Series | None:
    """The points of one series of node `uid` (None when there is no such node): for
    `raw` one per sample (avg = min = max = the value, count 1), for a rollup step one
    per bucket overlapping the range, stamped with the bucket's start. Three round
    trips at most: the node and its channels, the counts `auto` needs, the points."""
    found = conn.execute(
        "SELECT id, array(SELECT channel FROM telemetry_last WHERE node_id = nodes.id AND metric_type = %s"
        " ORDER BY channel) FROM nodes WHERE uid = %s", (query.metric, uid)).fetchone()
    if found is None:
        return None
    node, channels = found
    if query.channel is None and len(channels) > 1:
        raise AmbiguousChannel(query.metric, channels)
    channel = query.channel or (channels[0] if channels else None)
    if channel is None:  # the node never sent this metric
        return Series(None, "raw" if query.step == "auto" else query.step, 0, "[]")
    key = (node, channel, query.metric)
    step = query.step if query.step != "auto" else _auto_step(conn, key, query.start, query.end)
    limit = MAX_POINTS if query.step != "auto" else AUTO_MAX_POINTS
    # A row to JSON: its columns (ts, avg, min, max, count) are the point's keys; ts
    # as ISO 8601 text in UTC whatever the session's TimeZone (text that sorts in
    # time order).
    count, points_json = conn.execute(
        "SELECT count(*), coalesce(json_agg(p ORDER BY p.ts), '[]')::text FROM (SELECT"
        " (to_json(ts AT TIME ZONE 'UTC') #>> '{}') || '+00:00' AS ts, avg, min, max, count"
        f" FROM ({_select(step)}) AS found) AS p",
        (*key, *_bounds(step, query.start, query.end), limit + 1)).fetchone()
    if count > limit:  # only an explicit step gets here: auto chose one that fits
        raise TooManyPoints(step)
    return Series(channel, step, count, points_json)


def _auto_step(conn: psycopg.Connection, key: tuple[int, str, str], start: datetime, end: datetime) -> str:
    """The finest step with at most AUTO_MAX_POINTS points over the range. A rollup
    step that cannot have more buckets than that is taken without counting; the finer
    ones are counted in one statement, each reading at most AUTO_MAX_POINTS + 1 index
    entries."""
    counted = []
    for step in STEPS:
        width = WIDTH[step]
        if width is not None and (end - start) / width + 1 <= AUTO_MAX_POINTS:
            break
        counted.append(step)
    params = [value for step in counted for value in (*key, *_bounds(step, start, end), AUTO_MAX_POINTS + 1)]
    counts = conn.execute("SELECT " + ", ".join(f"({_count(step)})" for step in counted), params).fetchone()
    for step, found in zip(counted, counts):
        if found <= AUTO_MAX_POINTS:
            return step
    return STEPS[min(len(counted), len(STEPS) - 1)]  # the next one, or 1d for over 2,000 days of data


def _bounds(step: str, start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """Raw samples in [start, end]; buckets that overlap it (a bucket starting before
    `start` holds samples from it when it ends after it)."""
    width = WIDTH[step]
    return (start, end) if width is None else (start - width, end)


def _select(step: str) -> str:
    if step == "raw":
        return ("SELECT ts, value AS avg, value AS min, value AS max, 1 AS count FROM telemetry_samples"
                " WHERE node_id = %s AND channel = %s AND metric_type = %s AND ts >= %s AND ts <= %s"
                " ORDER BY ts LIMIT %s")
    bucket_after = "bucket > %s"  # start - width: the bucket ends after `start`
    return (f"SELECT bucket AS ts, avg, min, max, count FROM {TABLE[step]}"
            f" WHERE node_id = %s AND channel = %s AND metric_type = %s AND {bucket_after} AND bucket <= %s"
            " ORDER BY bucket LIMIT %s")


def _count(step: str) -> str:
    return f"SELECT count(*) FROM ({_select(step)}) AS found"


def latest(conn: psycopg.Connection, node: int) -> list[dict[str, Any]]:
    """The latest sample of each channel and metric: `telemetry_last`, one row per
    series, read by its primary key (no partition of the raw samples is touched)."""
    rows = conn.execute(
        "SELECT channel, metric_type, value, ts, received_at, metadata->>'unit' FROM telemetry_last"
        " WHERE node_id = %s ORDER BY channel, metric_type", (node,)).fetchall()
    return [{"channel": channel, "metric": metric, "value": value, "ts": ts.astimezone(UTC),
             "received_at": received.astimezone(UTC), "unit": unit}
            for channel, metric, value, ts, received, unit in rows]

