"""History over months (SPEC §8) against a real PostgreSQL: day partitions made on
demand, rollups equal to SQL over the raw rows, and the upgrade of a schema-4
database. Two connections stand for two hydrod instances."""

import json
import random
import threading
from datetime import datetime, timedelta, timezone

import psycopg
from harness import metric_value, publish, query, wait_until
import pytest

from hydrod import store
from hydrod.core.partitions import HistoryKeeper
from hydrod.settings import HistorySettings

DAY = 86400
NOW = datetime.now(timezone.utc).timestamp()
NODES = ("esp32-000000000001", "esp32-000000000002")


@pytest.fixture
def connect(database):
    with psycopg.connect(database) as conn:
        store.migrate(conn)
        for hardware_id in NODES:
            with conn.transaction(), conn.cursor() as cur:
                store.register_node(cur, hardware_id=hardware_id, node_type="ph", fw_version="1",
                                    capabilities=[], hardware_revision=None, name=None, wanted_uid=None,
                                    base=hardware_id, seen_at=NOW)
    opened = []

    def open_one():
        conn = psycopg.connect(database)
        store.prepare_connection(conn)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


def sample(seq, ts, value, node=NODES[0], channel="ph", metric="PH"):
    """A staged telemetry row (store.STAGE_COLUMNS) as DbWriter makes it."""
    return (seq, "telemetry", node, "gh-1", "zn-1", channel, metric, value, ts, NOW, True, None, None, None,
            None, json.dumps({"metric_type": metric, "value": value, "ts": ts}), None, None, False)


def write(conn, rows):
    with conn.transaction(), conn.cursor() as cur:
        return store.write_history(cur, rows)


def partitions(conn):
    return [row[0] for row in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'telemetry_samples'::regclass ORDER BY 1")]


def utc_day(ts):
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y%m%d")


def test_a_sample_far_in_the_past_or_future_gets_a_day_partition_made_for_it(connect):
    conn = connect()
    old, future = NOW - 400 * DAY, NOW + 2 * DAY
    done = write(conn, [sample(1, old, 6.0), sample(2, future, 6.1), sample(3, NOW, 6.2)])
    assert done.refused == [] and done.written == {"telemetry": 3}
    assert partitions(conn) == sorted(f"telemetry_samples_{utc_day(ts)}" for ts in (old, future, NOW))
    # Each row is in its own day's partition, which covers exactly that UTC day.
    rows = conn.execute("SELECT s.tableoid::regclass::text, value, ts,"
                        " pg_get_expr(c.relpartbound, c.oid) FROM telemetry_samples s"
                        " JOIN pg_class c ON c.oid = s.tableoid ORDER BY ts").fetchall()
    for (table, _, ts, bound), expected in zip(rows, (old, NOW, future)):
        start = ts.replace(hour=0, minute=0, second=0, microsecond=0)
        assert table == f"telemetry_samples_{utc_day(expected)}"
        assert bound == (f"FOR VALUES FROM ('{start:%Y-%m-%d} 00:00:00+00') TO "
                         f"('{start + timedelta(days=1):%Y-%m-%d} 00:00:00+00')")


def test_two_instances_needing_the_same_new_day_both_store_their_samples(connect):
    first, second = connect(), connect()
    day = NOW - 100 * DAY
    outcome = []
    with first.transaction(), first.cursor() as cur:
        store.write_history(cur, [sample(1, day, 1.0)])

        def other():
            outcome.append(write(second, [sample(1, day + 60, 2.0, node=NODES[1])]))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # it waits for the first to commit the partition, not fails
    thread.join(10)
    assert outcome[0].refused == [] and outcome[0].written == {"telemetry": 1}
    assert partitions(first) == [f"telemetry_samples_{utc_day(day)}"]
    assert first.execute("SELECT count(*) FROM telemetry_samples").fetchone()[0] == 2


def test_a_sample_for_a_day_left_detached_by_an_interrupted_pruning_attaches_that_day_again(connect):
    conn = connect()
    day = NOW - 40 * DAY
    write(conn, [sample(1, day, 1.0)])
    conn.execute(f"ALTER TABLE telemetry_samples DETACH PARTITION telemetry_samples_{utc_day(day)}")
    conn.commit()
    assert conn.execute("SELECT count(*) FROM telemetry_samples").fetchone()[0] == 0
    assert write(conn, [sample(1, day + 60, 2.0)]).written == {"telemetry": 1}
    assert conn.execute("SELECT value FROM telemetry_samples ORDER BY ts").fetchall() == [(1.0,), (2.0,)]


def test_a_redelivered_sample_is_stored_once_and_counted_once_in_every_rollup(connect):
    conn = connect()
    write(conn, [sample(1, NOW, 6.0), sample(2, NOW, 6.0)])
    done = write(conn, [sample(1, NOW, 6.0)])
    assert done.written == {}
    assert conn.execute("SELECT count(*) FROM telemetry_samples").fetchone()[0] == 1
    for table in ("telemetry_1m", "telemetry_1h", "telemetry_1d"):
        assert conn.execute(f"SELECT count, min, max, avg, last FROM {table}").fetchall() == [(1, 6.0, 6.0, 6.0, 6.0)]


ROLLUPS = {"telemetry_1m": "minute", "telemetry_1h": "hour", "telemetry_1d": "day"}


def rollup_mismatches(conn):
    """Every bucket where a rollup differs from what SQL computes over the raw rows."""
    wrong = []
    for table, unit in ROLLUPS.items():
        expected = conn.execute(
            "SELECT node_id, channel, metric_type, date_trunc(%s, ts, 'UTC'), count(*), min(value), max(value),"
            " avg(value), (array_agg(value ORDER BY ts DESC))[1], max(ts) FROM telemetry_samples"
            " GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4", (unit,)).fetchall()
        kept = conn.execute(f"SELECT node_id, channel, metric_type, bucket, count, min, max, avg, last, last_ts"
                            f" FROM {table} ORDER BY 1, 2, 3, 4").fetchall()
        assert len(expected) > 0
        if len(kept) != len(expected):
            wrong.append((table, len(kept), len(expected)))
        for got, want in zip(kept, expected):
            # avg is a float sum over another order of additions: equal to within rounding.
            if got[:7] + got[8:] != want[:7] + want[8:] or got[7] != pytest.approx(want[7], rel=1e-12):
                wrong.append((table, got, want))
    return wrong


def test_rollups_equal_sql_over_the_raw_rows_with_late_samples_and_redeliveries(connect):
    """Two instances write interleaved batches of three series over three days, in
    no time order: late samples, samples redelivered within a batch, in a later
    batch and to the other instance."""
    rng = random.Random(10)
    start = NOW - 2 * DAY
    sent = [sample(0, start + rng.uniform(0, 3 * DAY), round(rng.uniform(4, 8), 3), node=rng.choice(NODES),
                   channel=rng.choice(("ph", "ph2"))) for _ in range(3000)]
    # Same series and ts as an earlier sample is the same sample (a redelivery).
    batches = [[]]
    for row in sent:
        batches[-1].append(row)
        if rng.random() < 0.3:
            batches[rng.randrange(len(batches))].append(row)
        if len(batches[-1]) >= 200:
            batches.append([])
    batches = [[(seq, *row[1:]) for seq, row in enumerate(batch)] for batch in batches]
    failures = []

    def instance(conn, mine):
        try:
            for batch in mine:
                write(conn, batch)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=instance, args=(connect(), batches[parity::2])) for parity in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    conn = connect()
    stored = conn.execute("SELECT count(*) FROM telemetry_samples").fetchone()[0]
    assert stored == len({(row[2], row[5], row[8]) for row in sent})
    assert rollup_mismatches(conn) == []


def migration_files(upto):
    return [(version, name, sql) for version, name, sql in store.migrations() if version <= upto]


def test_upgrading_a_schema_4_database_keeps_every_sample_and_rolls_it_up(database):
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for version, name, sql in migration_files(4):
            conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
        node = conn.execute("INSERT INTO nodes (uid, hardware_id) VALUES ('nd-1', 'esp32-1') RETURNING id")
        node_id = node.fetchone()[0]
        conn.execute("INSERT INTO telemetry_samples (node_id, channel, metric_type, value, ts, received_at)"
                     " SELECT %s, 'ph', 'PH', i / 10.0, to_timestamp(%s + i * 997), now()"
                     " FROM generate_series(1, 500) i", (node_id, NOW - 5 * DAY))
        before = conn.execute("SELECT id, node_id, channel, metric_type, value, ts, received_at, metadata"
                              " FROM telemetry_samples ORDER BY id").fetchall()
        assert "005_history.sql" in store.migrate(conn)
        after = conn.execute("SELECT id, node_id, channel, metric_type, value, ts, received_at, metadata"
                             " FROM telemetry_samples ORDER BY id").fetchall()
        assert after == before
        assert partitions(conn) == sorted({f"telemetry_samples_{row[5].astimezone(timezone.utc):%Y%m%d}"
                                           for row in before})
        assert rollup_mismatches(conn) == []
        # New ids follow the old ones.
        store.prepare_connection(conn)
        with conn.transaction(), conn.cursor() as cur:
            store.write_history(cur, [sample(1, NOW, 7.0, node="esp32-1")])
        assert conn.execute("SELECT max(id) FROM telemetry_samples").fetchone()[0] == before[-1][0] + 1


# --- retention ---------------------------------------------------------------------

def keeper_connection(database):
    conn = psycopg.connect(database, autocommit=True)
    conn.execute("SET lock_timeout = 2000")
    return conn


def one_sample_a_day(conn, days):
    """Samples d days and a minute old, for d in 0..days-1; their unix times."""
    now = datetime.now(timezone.utc).timestamp()
    times = [now - day * DAY - 60 for day in range(days)]
    write(conn, [sample(day, ts, float(day)) for day, ts in enumerate(times)])
    return now, times


def day_ends_before(ts, horizon):
    """Whether the UTC day of ts ends at or before horizon (both unix times)."""
    return (ts // DAY + 1) * DAY <= horizon


def test_retention_drops_whole_days_older_than_raw_days_and_rollup_buckets_older_than_theirs(connect, database):
    writer = connect()
    now, times = one_sample_a_day(writer, 40)
    settings = HistorySettings(raw_days=30, rollup_1m_days=35, rollup_1h_days=0, rollup_1d_days=38)
    with keeper_connection(database) as conn:
        done = HistoryKeeper(settings).run(conn)
        gone = [ts for ts in times if day_ends_before(ts, now - 30 * DAY)]
        assert 9 <= len(gone) <= 10
        assert sorted(done.partitions_dropped) == sorted(f"telemetry_samples_{utc_day(ts)}" for ts in gone)
        assert done.partitions_made == 3  # today is there; the next three days were not
        assert conn.execute("SELECT min(value), max(value), count(*) FROM telemetry_samples").fetchone() \
            == (0.0, 39.0 - len(gone), 40 - len(gone))
        # A 1m bucket of a sample d days and a minute old began more than d days ago;
        # its 1d bucket began d days and the time of day since midnight ago.
        assert done.rollup_rows_deleted == {"telemetry_1m": 5, "telemetry_1d": 2}
        assert [conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ROLLUPS] == [35, 40, 38]
        again = HistoryKeeper(settings).run(conn)
        assert (again.partitions_made, again.partitions_dropped, again.rollup_rows_deleted) == \
            (0, (), {"telemetry_1m": 0, "telemetry_1d": 0})


def test_a_pruning_stopped_half_way_is_finished_by_the_next_round(connect, database):
    writer = connect()
    now, times = one_sample_a_day(writer, 34)
    gone = [ts for ts in times if day_ends_before(ts, now - 30 * DAY)]
    assert len(gone) >= 3
    settings = HistorySettings(raw_days=30)
    reader = connect()
    with keeper_connection(database) as conn:
        # A long reader holds the table: DETACH ... CONCURRENTLY waits for it, and gives up
        # at the lock timeout with the day marked "detach pending".
        with reader.transaction():
            reader.execute("SELECT count(*) FROM telemetry_samples").fetchone()
            conn.execute("SET lock_timeout = 300")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                HistoryKeeper(settings).run(conn)
            # Today's samples are written meanwhile.
            assert write(writer, [sample(1, NOW, 1.0, node=NODES[1])]).written == {"telemetry": 1}
        assert conn.execute("SELECT count(*) FROM pg_inherits WHERE inhdetachpending").fetchone()[0] == 1
        # Another old day detached and not dropped (as by a crash between the two steps).
        conn.execute(f"ALTER TABLE telemetry_samples DETACH PARTITION telemetry_samples_{utc_day(gone[0])}")
        conn.execute("SET lock_timeout = 2000")
        done = HistoryKeeper(settings).run(conn)
        assert sorted(done.partitions_dropped) == sorted(f"telemetry_samples_{utc_day(ts)}" for ts in gone)
        assert conn.execute("SELECT count(*) FROM telemetry_samples").fetchone()[0] == 34 - len(gone) + 1
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname ~ '^telemetry_samples_[0-9]{8}$'"
                            ).fetchone()[0] == 34 - len(gone) + 3


def old_day_and_today(database):
    """A schema-5 database holding a sample 60 days old and one of today."""
    with psycopg.connect(database) as conn:
        store.migrate(conn)
        with conn.transaction(), conn.cursor() as cur:
            store.register_node(cur, hardware_id=NODES[0], node_type="ph", fw_version="1", capabilities=[],
                                hardware_revision=None, name=None, wanted_uid=None, base=NODES[0], seen_at=NOW)
        store.prepare_connection(conn)
        old = NOW - 60 * DAY
        write(conn, [sample(1, old, 5.0), sample(2, NOW, 6.0)])
    return f"telemetry_samples_{utc_day(old)}"


def test_hydrod_prunes_at_start_up_and_logs_and_counts_it(make_daemon, database):
    old_day = old_day_and_today(database)
    hydrod = make_daemon(history={"raw_days": 30})
    pruned = hydrod.wait_for("history_pruned")
    assert pruned["partitions_dropped"] == [old_day] and pruned["raw_days"] == 30
    assert pruned["partitions_made"] >= 3
    metrics = hydrod.http("GET", "/metrics")[1]
    assert metric_value(metrics, "hydrod_history_prunings_total") == 1
    assert metric_value(metrics, "hydrod_history_partitions_dropped_total") == 1
    assert query(database, "SELECT value FROM telemetry_samples") == [(6.0,)]


def test_a_failed_pruning_round_is_logged_and_counted_and_hydrod_goes_on(make_daemon, broker, database):
    old_day = old_day_and_today(database)
    # Something of the operator's depends on the old day: PostgreSQL refuses to drop it.
    query(database, f"CREATE VIEW kept_by_hand AS SELECT * FROM {old_day}")
    hydrod = make_daemon(history={"raw_days": 30})
    failed = hydrod.wait_for("history_prune_failed")
    assert "kept_by_hand" in failed["error"] or "depend" in failed["error"]
    assert failed["level"] == "error"
    assert metric_value(hydrod.http("GET", "/metrics")[1], "hydrod_history_prune_failures_total") == 1
    assert hydrod.http("GET", "/healthz")[0] == 200
    hydrod.wait_ready()
    publish(broker.port, [(f"hydro/gh-1/zn-1/{NODES[0]}/ph/telemetry",
                           {"metric_type": "PH", "value": 7.0, "ts": int(NOW) + 5})])
    wait_until(lambda: query(database, "SELECT count(*) FROM telemetry_samples")[0][0] == 2, what="stored")
