"""Reading telemetry back (SPEC §8): parameters, the choice of table, points and the
latest values, driven synchronously on a real PostgreSQL database."""

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from harness import fill_rollups, make_partitions
from hydrod import store
from hydrod.core import telemetry_query as tq
from hydrod.core.telemetry_query import BadQuery, TelemetryQuery, parse_query

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
START = datetime(2026, 2, 1, tzinfo=UTC)


@pytest.fixture
def conn(database):
    with psycopg.connect(database, autocommit=True) as conn:
        store.migrate(conn)
        conn.execute("SET TimeZone = 'America/Sao_Paulo'")  # the answers are in UTC whatever the session's
        conn.execute("INSERT INTO nodes (uid, hardware_id) VALUES ('nd-a', 'hw-a'), ('nd-b', 'hw-b')")
        yield conn


def samples(conn, node_uid, channel, metric, times_values):
    """Written with SQL, as hydrod would store them (the rollups: fill_rollups)."""
    times_values = list(times_values)
    make_partitions(conn, min(ts for ts, _ in times_values), max(ts for ts, _ in times_values))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetry_samples (node_id, channel, metric_type, value, ts, received_at)"
            " SELECT id, %s, %s, %s, %s, %s FROM nodes WHERE uid = %s",
            [(channel, metric, value, ts, ts, node_uid) for ts, value in times_values])
        cur.execute(
            "INSERT INTO telemetry_last (node_id, channel, metric_type, value, ts, received_at, metadata)"
            " SELECT DISTINCT ON (node_id, channel, metric_type) node_id, channel, metric_type, value, ts,"
            " received_at, '{\"unit\": \"pH\"}' FROM telemetry_samples ORDER BY node_id, channel, metric_type,"
            " ts DESC ON CONFLICT (node_id, channel, metric_type) DO UPDATE SET value = excluded.value,"
            " ts = excluded.ts")


def every(seconds, n, start=START, value=lambda i: 5.0 + (i % 10) / 10):
    return [(start + timedelta(seconds=seconds * i), value(i)) for i in range(n)]


def node(conn, uid):
    return tq.node_id(conn, uid)


def points(conn, uid, query):
    """tq.points' series, its points parsed (their ts as datetimes, checked to be in UTC)."""
    series = tq.points(conn, uid, query)
    parsed = json.loads(series.points_json)
    assert series.count == len(parsed) and all(p["ts"].endswith("+00:00") for p in parsed)
    return series, [{**p, "ts": datetime.fromisoformat(p["ts"])} for p in parsed]


def test_defaults_are_the_day_up_to_now_with_the_step_auto():
    query = parse_query({"metric": "PH"}, now=NOW)
    assert query == TelemetryQuery("PH", None, NOW - timedelta(days=1), NOW, "auto")
    ending = parse_query({"metric": "PH", "to": "2026-02-10T00:00:00Z"}, now=NOW)
    assert (ending.start, ending.end) == (datetime(2026, 2, 9, tzinfo=UTC), datetime(2026, 2, 10, tzinfo=UTC))


def test_times_are_iso_8601_with_or_without_an_offset_or_unix_seconds():
    query = parse_query({"metric": "PH", "from": "2026-02-01T01:00:00+01:00", "to": "1772366400.5",
                         "channel": "ph_sensor", "step": "1h"}, now=NOW)
    assert query.start == START and query.end == datetime(2026, 3, 1, 12, 0, 0, 500000, tzinfo=UTC)
    assert (query.channel, query.step) == ("ph_sensor", "1h")
    assert parse_query({"metric": "PH", "from": "2026-02-01 00:00", "to": "2026-02-02"}).start == START


@pytest.mark.parametrize("args, parameter, words", [
    ({}, "metric", "`metric` is required"),
    ({"metric": "PH", "step": "5m"}, "step", "raw, 1m, 1h, 1d, auto, not '5m'"),
    ({"metric": "PH", "from": "yesterday"}, "from", "neither ISO 8601 nor Unix seconds: 'yesterday'"),
    ({"metric": "PH", "to": "2026-13-01"}, "to", "neither ISO 8601 nor Unix seconds"),
    ({"metric": "PH", "to": "nan"}, "to", "not a finite number"),
    ({"metric": "PH", "from": "1e300"}, "from", "out of range"),
    ({"metric": "PH", "from": "2026-03-02", "to": "2026-03-01"}, "from", "is after `to`"),
])
def test_a_bad_parameter_is_refused_naming_it(args, parameter, words):
    with pytest.raises(BadQuery) as refused:
        parse_query(args, now=NOW)
    assert refused.value.parameter == parameter and words in refused.value.message


def test_raw_points_are_each_sample_in_time_order_within_the_range_inclusive(conn):
    data = every(10, 30)
    samples(conn, "nd-a", "ph_sensor", "PH", reversed(data))
    samples(conn, "nd-b", "ph_sensor", "PH", [(START + timedelta(seconds=5), 99.0)])  # another node's
    query = TelemetryQuery("PH", "ph_sensor", data[3][0], data[7][0], "raw")
    series, found = points(conn, "nd-a", query)
    assert series.step == "raw" and series.channel == "ph_sensor"
    assert [(p["ts"], p["avg"], p["min"], p["max"], p["count"]) for p in found] == [
        (ts, value, value, value, 1) for ts, value in data[3:8]]


def test_a_rollup_step_answers_from_its_table_one_point_per_bucket(conn):
    data = every(10, 6 * 90)  # an hour and a half, 6 samples a minute
    samples(conn, "nd-a", "ph_sensor", "PH", data)
    fill_rollups(conn.info.dsn)
    # The range starts mid-minute: the bucket it starts in is part of the answer.
    query = TelemetryQuery("PH", None, START + timedelta(seconds=30), START + timedelta(minutes=2), "1m")
    series, found = points(conn, "nd-a", query)
    first_minute = [v for _, v in data[:6]]
    assert series.step == "1m" and series.channel == "ph_sensor"
    assert [p["ts"] for p in found] == [START + timedelta(minutes=m) for m in range(3)]
    assert found[0]["count"] == 6 and found[0]["min"] == min(first_minute)
    assert found[0]["avg"] == pytest.approx(sum(first_minute) / 6)
    _, hourly = points(conn, "nd-a", TelemetryQuery("PH", None, START, START + timedelta(hours=2), "1h"))
    assert [(p["ts"], p["count"]) for p in hourly] == [(START, 360), (START + timedelta(hours=1), 180)]


def test_auto_takes_the_finest_table_answering_with_at_most_2000_points(conn):
    data = every(60, 3 * 24 * 60)  # three days, one sample a minute: 4,320 samples
    samples(conn, "nd-a", "ph_sensor", "PH", data)
    fill_rollups(conn.info.dsn)
    def auto(hours):
        series, found = points(conn, "nd-a", TelemetryQuery("PH", None, START, START + timedelta(hours=hours), "auto"))
        return series.step, len(found)

    assert auto(30) == ("raw", 30 * 60 + 1)  # 1,801 samples: raw answers
    assert auto(48) == ("1h", 49)  # 2,881 samples and as many minutes: too many for raw and 1m
    assert auto(24 * 100) == ("1h", 72)  # 100 days could hold 2,400 hours: counted, 72 are there
    assert auto(24 * 3000) == ("1h", 72)  # however long the range: the points are what counts


def test_auto_falls_back_to_days_when_every_finer_table_has_over_2000_points(conn):
    samples(conn, "nd-b", "ph_sensor", "PH", every(3600, 2100))  # hourly, 87.5 days
    fill_rollups(conn.info.dsn)
    series, found = points(conn, "nd-b", TelemetryQuery("PH", None, START, START + timedelta(days=90), "auto"))
    assert (series.step, len(found)) == ("1d", 88)
    assert sum(p["count"] for p in found) == 2100


def test_an_explicit_step_past_the_point_limit_is_refused_naming_the_step(conn, monkeypatch):
    samples(conn, "nd-a", "ph_sensor", "PH", every(10, 20))
    monkeypatch.setattr(tq, "MAX_POINTS", 10)
    with pytest.raises(BadQuery) as refused:
        tq.points(conn, "nd-a", TelemetryQuery("PH", None, START, START + timedelta(hours=1), "raw"))
    assert refused.value.parameter == "step" and "more than 10 points" in refused.value.message


def test_a_metric_on_several_channels_needs_the_channel_named(conn):
    samples(conn, "nd-a", "water", "TEMPERATURE", every(10, 3))
    samples(conn, "nd-a", "air", "TEMPERATURE", every(10, 5))
    with pytest.raises(BadQuery) as refused:
        tq.points(conn, "nd-a", TelemetryQuery("TEMPERATURE", None, START, START + timedelta(hours=1), "raw"))
    assert refused.value.parameter == "channel" and "air, water" in refused.value.message
    series, found = points(conn, "nd-a", TelemetryQuery("TEMPERATURE", "air", START, START + timedelta(hours=1), "raw"))
    assert len(found) == 5 and series.channel == "air"


def test_a_metric_the_node_never_sent_has_no_points(conn):
    series, found = points(conn, "nd-a", TelemetryQuery("EC", None, START, NOW, "auto"))
    assert (series.channel, found) == (None, [])
    assert tq.points(conn, "nd-nobody", TelemetryQuery("PH", None, START, NOW, "auto")) is None
    assert tq.node_id(conn, "nd-nobody") is None


def test_latest_is_the_newest_sample_of_each_channel_and_metric(conn):
    samples(conn, "nd-a", "ph_sensor", "PH", every(10, 4))
    samples(conn, "nd-a", "water", "TEMPERATURE", every(10, 2, value=lambda i: 20.0 + i))
    found = tq.latest(conn, node(conn, "nd-a"))
    assert [(v["channel"], v["metric"], v["value"], v["ts"], v["unit"]) for v in found] == [
        ("ph_sensor", "PH", 5.3, START + timedelta(seconds=30), "pH"),
        ("water", "TEMPERATURE", 21.0, START + timedelta(seconds=10), "pH")]
    assert tq.latest(conn, node(conn, "nd-b")) == []
