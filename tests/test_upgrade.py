"""Upgrading from the released 0.1 (commit b18d18f): 0.1 itself, taken from this
repository's history and run from its own files, fills a database over a real
broker; then this hydrod runs on the same database."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import psycopg
import pytest

from harness import Daemon, bind_node, publish, query, register_node, to_toml, wait_until
from hydrod import store
from test_partitions import rollup_mismatches

RELEASE_0_1 = "b18d18f"
ROOT = Path(__file__).resolve().parents[1]
DAY = 86400


def release_0_1(directory: Path) -> Path:
    """0.1's files as the package `hydrod` under directory (for PYTHONPATH)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and this repository's history to take 0.1 (commit b18d18f) from")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", RELEASE_0_1],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"commit {RELEASE_0_1} (0.1) is not in this clone: {archive.stderr.decode().strip()}")
    package = directory / "hydrod"
    package.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(package, filter="data")
    return directory


TABLES = {
    "nodes": "id, uid, hardware_id, type, fw_version, capabilities, gh_uid, zone_uid, config, node_secret,"
             " lifecycle_state, created_at",
    "node_configs": "id, node_id, version, config, payload, topic, status, created_at, published_at, applied_at",
    "telemetry_samples": "id, node_id, channel, metric_type, value, ts, received_at, metadata",
    "telemetry_last": "node_id, channel, metric_type, value, ts, received_at, metadata",
    "node_events": "id, node_id, node_key, channel, kind, payload, ts, received_at, dedup",
    "dead_letters": "id, received_at, topic, payload, reason, detail",
    "held_config_reports": "node_key, gh, zone, topic, payload, received_at",
}


def rollups_match(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return rollup_mismatches(conn) == []


def snapshot(dsn: str) -> dict[str, list[tuple]]:
    return {table: query(dsn, f"SELECT {columns} FROM {table} ORDER BY 1, 2") for table, columns in TABLES.items()}


def test_a_database_written_by_0_1_keeps_every_row_and_gets_partitions_and_rollups(
        tmp_path, broker, database, make_daemon):
    old = Daemon(tmp_path / "hydrod-0.1", broker.port, database,
                 env={"PYTHONPATH": str(release_0_1(tmp_path / "release"))})
    del old.config["history"]  # a section 0.1 does not know
    old.config_path.write_text(to_toml(old.config))
    old.start()
    old.wait_ready(30)
    assert query(database, "SELECT version FROM schema_migrations") == [(1,)]  # 0.1 it is
    uid = register_node(broker.port, database, "esp32-a1b2c3d4e5f6")
    bind_node(old, broker.port, database, uid)
    register_node(broker.port, database, "esp32-0000000000aa")
    now = query(database, "SELECT extract(epoch FROM now())::bigint")[0][0]
    topic = f"hydro/gh-1/zn-1/{uid}/ph/telemetry"
    sent = [(topic, {"metric_type": "PH", "value": 5.0 + i / 100, "ts": now - 3 * DAY + i * 3600})
            for i in range(72)]
    publish(broker.port, [*sent,
                          (f"hydro/gh-1/zn-1/{uid}/heartbeat", {"uptime": 10, "free_heap": 1000, "rssi": -60}),
                          (f"hydro/gh-1/zn-1/{uid}/event", {"event": "pump_on", "ts": now - 100}),
                          (f"hydro/gh-temp/zn-temp/esp32-ffffffffffff/config_report", {"version": 1}),
                          (topic, b"{not json")])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 72
               and query(database, "SELECT count(*) FROM dead_letters")[0][0] == 1, what="0.1 stored it all")
    old.terminate()
    before = snapshot(database)
    assert all(before[table] for table in TABLES)

    new = make_daemon()
    new.wait_ready(60)
    assert query(database, "SELECT version FROM schema_migrations ORDER BY 1") == [
        (version,) for version, _, _ in store.migrations()]
    assert snapshot(database) == before
    days = query(database, "SELECT count(DISTINCT (ts AT TIME ZONE 'UTC')::date) FROM telemetry_samples")[0][0]
    partitions = query(database, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry_samples'::regclass")
    assert partitions[0][0] >= days >= 3
    assert rollups_match(database)
    # On the upgraded database: an old sample sent again is stored once and counted once,
    # a new one is stored and rolled up, and retention ran.
    publish(broker.port, [sent[0], (topic, {"metric_type": "PH", "value": 9.0, "ts": now})])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 73, what="new sample")
    new.wait_for("history_pruned")
    assert query(database, "SELECT sum(count) FROM telemetry_1d") == [(73,)]
    assert rollups_match(database)
