"""core/history.py, driven synchronously on a real PostgreSQL (no actor, no broker):
what a batch of history becomes, what is refused and why, what is announced only
once committed, and the offline sweep."""

from __future__ import annotations

import time

import psycopg
import pytest

from harness import RecordingLog, query, routed
from hydrod import store
from hydrod.core.history import History
from hydrod.metrics import Metrics

HW, UID = "esp32-a1b2c3d4e5f6", "nd-ph-a1b2c3d4e5f6"


@pytest.fixture
def history():
    return History(metrics=Metrics(), log=RecordingLog(), offline_after_s=60.0, held_report_ttl_s=3600.0)


@pytest.fixture
def cursor(migrated):
    """cursor() -> a cursor in a transaction of its own, committed when the block ends."""
    with psycopg.connect(migrated) as conn:
        store.prepare_connection(conn)

        def in_transaction():
            return _Transaction(conn)

        yield in_transaction


class _Transaction:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self._tx = self.conn.transaction()
        self._tx.__enter__()
        self._cur = self.conn.cursor()
        return self._cur

    def __exit__(self, *exc):
        self._cur.close()
        return self._tx.__exit__(*exc)


def register(cursor, hardware_id=HW, base=UID, seen_at=None):
    with cursor() as cur:
        store.register_node(cur, hardware_id=hardware_id, node_type="ph", fw_version="1.0.0", capabilities=["ph"],
                            hardware_revision=None, name=None, wanted_uid=None, base=base,
                            seen_at=seen_at or time.time())


def sample(seq, value, ts, **fields):
    return routed(seq, "telemetry", {"metric_type": "ph", "value": value, "ts": ts, "unit": "pH"}, **fields)


def test_samples_are_stored_with_their_metadata_and_one_sent_twice_once(history, cursor, migrated):
    register(cursor)
    with cursor() as cur:
        written = history.write(cur, [sample(0, 6.1, 1_764_000_000), sample(1, 6.2, 1_764_000_001),
                                      sample(2, 6.1, 1_764_000_000)])
    assert written.refused == [] and written.not_stored == 1
    assert query(migrated, "SELECT metric_type, value, metadata FROM telemetry_samples ORDER BY ts") == [
        ("PH", 6.1, {"unit": "pH"}), ("PH", 6.2, {"unit": "pH"})]
    assert history.metrics.duplicates.labels("telemetry")._value.get() == 0  # not before the commit
    written.announce()
    assert history.metrics.duplicates.labels("telemetry")._value.get() == 1


def test_a_node_is_found_by_its_uid_or_else_by_its_hardware_id(history, cursor, migrated):
    register(cursor)
    register(cursor, hardware_id="esp32-000000000001", base=HW)  # a node whose uid is another's hardware id
    with cursor() as cur:
        history.write(cur, [sample(0, 6.0, 1_764_000_000, node=HW), sample(1, 6.0, 1_764_000_000, node=UID)])
    rows = query(migrated, "SELECT n.hardware_id FROM telemetry_samples s JOIN nodes n ON n.id = s.node_id"
                           " ORDER BY n.hardware_id")
    assert rows == [("esp32-000000000001",), (HW,)]


def test_history_from_an_unknown_node_or_another_zone_is_refused_naming_why(history, cursor, migrated):
    register(cursor)
    query(migrated, "UPDATE nodes SET gh_uid = 'gh-1', zone_uid = 'zn-1'")
    with cursor() as cur:
        written = history.write(cur, [sample(0, 6.0, 1_764_000_000, node="nd-nobody"),
                                      sample(1, 6.0, 1_764_000_000, zone="zn-2"),
                                      routed(2, "status", {"status": "SLEEPING"})])
    assert sorted((r.item.seq, r.reason, r.detail) for r in written.refused) == [
        (0, "unknown_node", "no node with uid or hardware id `nd-nobody`"),
        (1, "zone_mismatch", f"node `{UID}` is bound elsewhere; it sent on gh-1/zn-2"),
        (2, "bad_payload", "status must be ONLINE or OFFLINE, not 'SLEEPING'")]
    assert query(migrated, "SELECT count(*) FROM telemetry_samples") == [(0,)]


def test_a_status_change_is_announced_only_once_committed(history, cursor, migrated):
    register(cursor, seen_at=time.time() - 5)
    with cursor() as cur:
        written = history.write(cur, [routed(0, "lwt", b"offline")])
    assert history.log.events("node_offline") == []
    written.announce()
    assert history.log.events("node_offline", node_uid=UID)
    assert query(migrated, "SELECT status FROM nodes") == [("offline",)]


def test_the_sweep_sets_silent_nodes_offline_and_drops_expired_held_reports(cursor, migrated):
    history = History(metrics=Metrics(), log=RecordingLog(), offline_after_s=1.0, held_report_ttl_s=1.0)
    register(cursor, seen_at=time.time() - 10)
    register(cursor, hardware_id="esp32-000000000001", base="nd-ph-live")
    query(migrated, "INSERT INTO held_config_reports (node_key, gh, zone, topic, payload, received_at)"
                    " VALUES ('esp32-0000deadbeef', 'gh-temp', 'zn-temp', 't', '{}', now() - interval '1 hour')")
    with cursor() as cur:
        announce = history.sweep(cur)
    assert query(migrated, "SELECT uid, status FROM nodes ORDER BY uid") == [(UID, "offline"), ("nd-ph-live", "online")]
    assert query(migrated, "SELECT count(*) FROM held_config_reports") == [(0,)]
    announce()
    assert history.log.events("node_offline", node_uid=UID, reason="silent")
    assert history.log.events("config_report_expired", node_key="esp32-0000deadbeef", ttl_s=1.0)
    assert history.metrics.nodes_marked_offline._value.get() == 1
    assert history.metrics.held_reports_expired._value.get() == 1
