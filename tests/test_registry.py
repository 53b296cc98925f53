"""core/registry.py, driven synchronously on a real PostgreSQL (no actor, no broker):
registration, held reports, binding and the self-healing resend, each announced
only once its batch is committed."""

from __future__ import annotations

import psycopg
import pytest

from harness import RecordingLog, query, routed
from hydrod import store
from hydrod.core.registry import Registry
from hydrod.metrics import Metrics

HW, UID = "esp32-a1b2c3d4e5f6", "nd-ph-a1b2c3d4e5f6"
HELLO = {"message_type": "node_hello", "hardware_id": HW, "node_type": "ph", "fw_version": "1.0.0",
         "capabilities": ["ph"]}


@pytest.fixture
def registry():
    resent = []
    made = Registry(resend=resent.append, resend_interval_s=60.0, metrics=Metrics(), log=RecordingLog())
    made.resent = resent
    return made


@pytest.fixture
def write(migrated):
    """write(registry, items) -> Written, in one committed transaction."""
    with psycopg.connect(migrated) as conn:
        def run(registry, items):
            with conn.transaction(), conn.cursor() as cur:
                return registry.write(cur, items)
        yield run


def hello(seq, **fields):
    return routed(seq, "hydro/node_hello", {**HELLO, **fields})


def report(seq, gh="gh-temp", zone="zn-temp", node=HW, **payload):
    return routed(seq, f"hydro/{gh}/{zone}/{node}/config_report", {"node_id": node, "channels": [], **payload})


def test_a_hello_registers_its_node_and_says_so_only_once_committed(registry, write, migrated):
    written = write(registry, [hello(0)])
    assert query(migrated, "SELECT uid, hardware_id, lifecycle_state FROM nodes") == [
        (UID, HW, "REGISTERED_BACKEND")]
    assert registry.log.events("node_registered") == [] and registry.metrics.nodes_registered._value.get() == 0
    written.announce()
    assert registry.log.events("node_registered", node_uid=UID, hardware_id=HW)
    assert registry.metrics.nodes_registered._value.get() == 1
    write(registry, [hello(1, fw_version="1.1.0")]).announce()
    assert registry.log.events("node_updated", node_uid=UID, changed=["fw_version"])


def test_a_report_before_its_hello_is_held_and_applied_by_the_hello_in_the_same_batch(registry, write, migrated):
    write(registry, [report(0, version=1)]).announce()
    assert registry.log.events("config_report_held", node_key=HW)
    assert query(migrated, "SELECT count(*) FROM held_config_reports") == [(1,)]
    write(registry, [report(1, version=2), hello(2)]).announce()
    assert query(migrated, "SELECT config->>'version' FROM nodes") == [("2",)]
    assert query(migrated, "SELECT count(*) FROM held_config_reports") == [(0,)]


def test_a_bad_hello_is_refused_and_the_rest_of_its_batch_registers(registry, write, migrated):
    bad = routed(0, "hydro/node_hello", {"message_type": "node_hello"})
    written = write(registry, [bad, hello(1)])
    assert [(r.item.seq, r.reason) for r in written.refused] == [(0, "bad_payload")]
    assert query(migrated, "SELECT uid FROM nodes") == [(UID,)]


def test_a_bound_node_back_in_the_temp_namespace_is_resent_its_config_once_committed_and_once_per_interval(
        registry, write, migrated):
    write(registry, [hello(0)])
    with psycopg.connect(migrated) as conn, conn.transaction(), conn.cursor() as cur:
        node = store.node_for_push(cur, UID)
        config_id = store.record_config(cur, node_id=node["id"], version=1, topic="t",
                                        payload=b'{"gh_uid":"gh-1","zone_uid":"zn-1","version":1}')
        store.mark_sent(cur, [config_id])
    write(registry, [report(1, gh="gh-1", zone="zn-1", node=UID, version=1)]).announce()
    assert registry.log.events("node_bound", node_uid=UID, gh_uid="gh-1", zone_uid="zn-1")
    assert registry.log.events("config_applied", node_uid=UID, version=1)

    written = write(registry, [report(2)])  # reset: it reports from the temp namespace
    assert registry.resent == []
    written.announce()
    [resend] = registry.resent
    assert (resend.uid, resend.version, resend.topic) == (UID, 1, f"hydro/gh-temp/zn-temp/{HW}/config")
    assert resend.payload == b'{"gh_uid":"gh-1","zone_uid":"zn-1","version":1}'
    write(registry, [report(3)]).announce()
    assert len(registry.resent) == 1, "resent again within the interval"
