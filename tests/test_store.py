"""store.py against a real PostgreSQL: the decisions that must hold across
several hydrod instances, with two connections standing for two instances."""

import threading

import psycopg
import pytest

from hydrod import store

REPORT = {"node_id": "esp32-a1b2c3d4e5f6", "version": 1, "channels": []}


@pytest.fixture
def connect(database):
    with psycopg.connect(database) as conn:
        store.migrate(conn)
    opened = []

    def open_one():
        conn = psycopg.connect(database)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


def register(cur, hardware_id="esp32-a1b2c3d4e5f6"):
    return store.register_node(cur, hardware_id=hardware_id, node_type="ph", fw_version="1", capabilities=[],
                               hardware_revision=None, name=None, wanted_uid=None,
                               base="nd-ph-a1b2c3d4e5f6", seen_at=1_764_000_000.0)


def hold_or_apply(cur):
    return store.store_config_report(cur, node_key="esp32-a1b2c3d4e5f6", gh="gh-temp", zone="zn-temp", temp=True,
                                     topic="hydro/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config_report",
                                     config=REPORT, received_at=1_764_000_001.0)


def finish_registration(cur, keys):
    """What the registry does at the end of a batch that created nodes."""
    store.lock_node_keys(cur, keys)
    return store.take_held_reports(cur, keys)


def test_a_report_held_by_another_instance_during_a_registration_is_taken_by_it(connect):
    registering, reporting = connect(), connect()
    with registering.transaction(), registering.cursor() as cur:
        created = register(cur)
        # Meanwhile, another instance gets the node's report: the node is not visible to it.
        with reporting.transaction(), reporting.cursor() as other:
            assert hold_or_apply(other).uid is None
        held = finish_registration(cur, {"esp32-a1b2c3d4e5f6", created.uid})
    assert [h["node_key"] for h in held] == ["esp32-a1b2c3d4e5f6"]


def test_a_report_arriving_while_a_registration_commits_waits_and_finds_the_node(connect):
    registering, reporting = connect(), connect()
    outcome = []
    with registering.transaction(), registering.cursor() as cur:
        created = register(cur)
        assert finish_registration(cur, {"esp32-a1b2c3d4e5f6", created.uid}) == []

        def report():
            with reporting.transaction(), reporting.cursor() as other:
                outcome.append(hold_or_apply(other))

        other = threading.Thread(target=report)
        other.start()
        other.join(0.5)
        assert other.is_alive()  # it waits on the node key's lock, not on a stale view
    other.join(10)
    assert outcome and outcome[0].uid == "nd-ph-a1b2c3d4e5f6"  # applied, not held
    with registering.cursor() as cur:
        cur.execute("SELECT count(*) FROM held_config_reports")
        assert cur.fetchone()[0] == 0
