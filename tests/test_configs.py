"""core/configs.py, driven synchronously on a real PostgreSQL, with the broker link
as a stand-in that keeps what it is handed: queued and published pushes, acks,
timeouts, resends, and the publisher's view of the database."""

from __future__ import annotations

import time
from types import SimpleNamespace

import psycopg
import pytest

from harness import RecordingLog, query, wait_until
from hydrod import store
from hydrod.core.configs import Acked, Configs, PushRefused, ResendConfig
from hydrod.core.database import Database
from hydrod.metrics import Metrics

HW, UID = "esp32-a1b2c3d4e5f6", "nd-ph-a1b2c3d4e5f6"
BIND = {"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"}


@pytest.fixture
def make_configs(migrated):
    with psycopg.connect(migrated) as conn, conn.cursor() as cur:
        store.register_node(cur, hardware_id=HW, node_type="ph", fw_version="1.0.0", capabilities=[],
                            hardware_revision=None, name=None, wanted_uid=None, base=UID, seen_at=time.time())
    opened = []

    def make(dsn=migrated, ack_timeout_s=60.0):
        metrics, log, link = Metrics(), RecordingLog(), []
        db = Database("config_publisher", dsn, (1, 1), metrics=metrics, log=log, timeout=2)
        opened.append(db)
        configs = Configs(db, publish=lambda topic, payload, acked: link.append((topic, payload, acked)),
                          metrics=metrics, log=log, ack_timeout_s=ack_timeout_s)
        return SimpleNamespace(configs=configs, link=link, log=log, metrics=metrics)

    yield make
    for db in opened:
        db.close()


def rows(dsn):
    return query(dsn, "SELECT version, status, sent_at IS NOT NULL FROM node_configs ORDER BY version")


def test_a_push_while_the_link_is_down_is_queued_and_goes_out_when_it_comes_up(make_configs, migrated):
    t = make_configs()
    result = t.configs.push(UID, BIND, deadline=time.monotonic() + 5)
    assert (result.status, result.version, result.topic) == ("queued", 1, f"hydro/gh-temp/zn-temp/{HW}/config")
    assert t.link == [] and rows(migrated) == [(1, "queued", False)]
    t.configs.link_changed(True)
    [(topic, payload, acked)] = t.link
    assert topic == result.topic and acked == Acked(acked.config_id, UID, 1, topic)
    assert rows(migrated) == [(1, "queued", True)]  # sent: a report may acknowledge it now
    t.configs.acked(acked)
    assert rows(migrated) == [(1, "published", True)]
    assert t.log.events("config_published", node_uid=UID, version=1)


def test_a_push_while_the_link_is_up_is_published_at_once_and_not_sent_twice(make_configs, migrated):
    t = make_configs()
    t.configs.link_changed(True)
    assert t.configs.push(UID, BIND, deadline=time.monotonic() + 5).status == "published"
    assert len(t.link) == 1 and rows(migrated) == [(1, "queued", True)]
    t.configs.expire()  # on its way: the expiry round does not send it again
    assert len(t.link) == 1


def test_a_push_past_its_deadline_is_refused_and_not_made(make_configs, migrated):
    t = make_configs()
    with pytest.raises(PushRefused) as refused:
        t.configs.push(UID, BIND, deadline=time.monotonic())
    assert refused.value.status == 503 and rows(migrated) == []
    with pytest.raises(PushRefused) as refused:
        t.configs.push("nd-nobody", BIND, deadline=time.monotonic() + 5)
    assert refused.value.status == 404


def test_a_published_config_never_acknowledged_times_out(make_configs, migrated):
    t = make_configs(ack_timeout_s=0.0)
    t.configs.link_changed(True)
    t.configs.push(UID, BIND, deadline=time.monotonic() + 5)
    t.configs.acked(t.link[0][2])
    wait_until(lambda: (t.configs.expire(), rows(migrated))[1] == [(1, "timeout", True)], what="the timeout")
    assert t.log.events("config_timeout", node_uid=UID, version=1)
    assert t.metrics.config_timeouts._value.get() == 1


def test_a_resend_goes_out_only_while_the_link_is_up(make_configs):
    t = make_configs()
    resend = ResendConfig(UID, 3, f"hydro/gh-temp/zn-temp/{HW}/config", b'{"version":3}')
    t.configs.resend(resend)
    assert t.link == [] and t.log.events("config_resend_skipped", node_uid=UID, reason="broker link down")
    t.configs.link_changed(True)
    t.configs.resend(resend)
    assert t.link == [(resend.topic, resend.payload, None)]
    assert t.metrics.configs_resent._value.get() == 1


def test_the_config_publishers_database_outage_shows_in_hydrod_db_up(make_configs, make_proxy, migrated, pg_server):
    proxy = make_proxy(pg_server.port, pg_server.host)
    t = make_configs(dsn=migrated.replace(f":{pg_server.port}/", f":{proxy.port}/"))
    t.configs.expire()
    assert t.metrics.db_up.labels("config_publisher")._value.get() == 1
    proxy.cut()
    t.configs.expire()
    t.configs.expire()
    assert t.metrics.db_up.labels("config_publisher")._value.get() == 0
    assert [r["doing"] for r in t.log.events("db_unavailable")] == ["expire unacknowledged configs"]
    assert b'hydrod_db_up{actor="config_publisher"} 0.0' in t.metrics.exposition()
    proxy.restore()
    wait_until(lambda: (t.configs.expire(), t.metrics.db_up.labels("config_publisher")._value.get())[1] == 1,
               timeout=20, what="the publisher to see the database back")
    assert len(t.log.events("db_recovered")) == 1
