"""GET /api/nodes/{uid}/telemetry and /telemetry/last, and `hydrod history` (SPEC §8),
over telemetry a node sent through the real broker and stored by the real daemon."""

import csv
import io
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from harness import bind_node, fill_rollups, publish, query, register_node, wait_until

T0 = 1772323200  # 2026-03-01T00:00:00Z
SAMPLES = [(T0 + 10 * i, 5.5 + i / 100) for i in range(12)]


def iso(ts):
    return datetime.fromtimestamp(ts, UTC).isoformat()


@pytest.fixture
def node(make_daemon, broker, database):
    """(daemon, uid) of a bound node that sent 12 PH samples, 10 s apart, and one temperature."""
    daemon = make_daemon(http={"token": "s3cret"})
    daemon.wait_ready()
    uid = register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    bind_node(daemon, broker.port, database, uid, token="s3cret")
    topic = f"hydro/gh-1/zn-1/{uid}"
    publish(broker.port, [(f"{topic}/ph_sensor/telemetry", {"metric_type": "PH", "value": value, "ts": ts,
                                                            "unit": "pH"}) for ts, value in SAMPLES]
            + [(f"{topic}/water/telemetry", {"metric_type": "TEMPERATURE", "value": 21.5, "ts": T0})])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 13, what="13 samples")
    return daemon, uid


def get(daemon, path, token="s3cret"):
    return daemon.http("GET", path, token=token)


def test_raw_points_come_back_in_time_order_for_the_range_and_last_has_each_latest_value(node):
    daemon, uid = node
    status, body = get(daemon, f"/api/nodes/{uid}/telemetry?metric=PH&from={T0 + 20}&to=2026-03-01T00:01:00Z"
                               "&step=raw")
    assert status == 200, body
    assert (body["node_uid"], body["metric"], body["channel"], body["step"]) == (uid, "PH", "ph_sensor", "raw")
    assert (body["from"], body["to"]) == ("2026-03-01T00:00:20+00:00", "2026-03-01T00:01:00+00:00")
    assert body["points"] == [{"ts": iso(ts), "avg": value, "min": value,
                               "max": value, "count": 1} for ts, value in SAMPLES[2:7]]
    status, body = get(daemon, f"/api/nodes/{uid}/telemetry/last")
    assert status == 200
    assert [(v["channel"], v["metric"], v["value"], v["ts"], v["unit"]) for v in body["values"]] == [
        ("ph_sensor", "PH", SAMPLES[-1][1], iso(SAMPLES[-1][0]), "pH"), ("water", "TEMPERATURE", 21.5, iso(T0), None)]


def test_auto_over_a_stored_range_answers_from_the_rollups(node, database):
    daemon, uid = node
    fill_rollups(database)
    status, body = get(daemon, f"/api/nodes/{uid}/telemetry?metric=PH&from=2026-02-01&to=2026-03-02&step=auto")
    assert status == 200 and body["step"] == "raw" and len(body["points"]) == 12  # 12 samples fit raw
    status, body = get(daemon, f"/api/nodes/{uid}/telemetry?metric=PH&from=2026-02-01&to=2026-03-02&step=1h")
    values = [v for _, v in SAMPLES]
    assert status == 200 and body["points"] == [{"ts": "2026-03-01T00:00:00+00:00", "avg": pytest.approx(
        sum(values) / 12), "min": min(values), "max": max(values), "count": 12}]


def test_bad_steps_and_times_get_a_400_naming_the_parameter_and_unknown_nodes_a_404(node):
    daemon, uid = node
    for query_string, parameter in [("metric=PH&step=5m", "step"), ("metric=PH&from=2026-03-02&to=2026-03-01", "from"),
                                    ("metric=PH&to=soon", "to"), ("step=raw", "metric"),
                                    ("metric=TEMPERATURE&channel=", None)]:  # an empty channel is none: it answers
        status, body = get(daemon, f"/api/nodes/{uid}/telemetry?{query_string}")
        if parameter is None:
            assert status == 200 and body["channel"] == "water", body
        else:
            assert status == 400 and body["parameter"] == parameter and f"`{parameter}`" in body["error"], body
    for path in ("/api/nodes/nd-nobody/telemetry?metric=PH", "/api/nodes/nd-nobody/telemetry/last",
                 "/api/nodes/no%20uid/telemetry?metric=PH"):
        status, body = get(daemon, path)
        assert status == 404 and "no node with uid" in body["error"], (path, body)
    for path in (f"/api/nodes/{uid}/telemetry?metric=PH", f"/api/nodes/{uid}/telemetry/last"):
        assert get(daemon, path, token=None)[0] == 401
        assert get(daemon, path, token="wrong")[0] == 401


def hydrod(*args):
    return subprocess.run([sys.executable, "-m", "hydrod", *args], capture_output=True, text=True, timeout=60)


def test_history_on_the_command_line_prints_a_table_or_csv_or_says_what_was_refused(node):
    daemon, uid = node
    config = str(daemon.config_path)
    table = hydrod("history", uid, "PH", "--from", str(T0), "--to", "2026-03-01T00:00:30Z", "--step", "raw",
                   "--config", config)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ts", "avg", "min", "max", "count"]
    assert lines[1].split() == ["2026-03-01T00:00:00+00:00", "5.5", "5.5", "5.5", "1"]
    assert len(lines) == 1 + 4 + 1 and "4 point(s), PH on channel ph_sensor, step raw" in lines[-1]
    as_csv = hydrod("history", uid, "PH", "--channel", "ph_sensor", "--from", str(T0), "--to", str(T0 + 110),
                    "--csv", "--config", config)
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(rows[0]) == ["ts", "avg", "min", "max", "count"]
    assert [(row["ts"], float(row["avg"])) for row in rows] == [
        (iso(ts), value) for ts, value in SAMPLES]
    bad = hydrod("history", uid, "PH", "--step", "5m", "--config", str(daemon.config_path))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("hydrod: history refused (400): `step` must be one of raw, 1m, 1h, 1d, auto, "
                                  "not '5m'")
    unknown = hydrod("history", "nd-nobody", "PH", "--config", str(daemon.config_path))
    assert unknown.returncode == 1 and "(404): no node with uid nd-nobody" in unknown.stderr
