"""store.py against a real PostgreSQL: the decisions that must hold across
several hydrod instances, with two connections standing for two instances."""

import json
import threading
import time

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


# --- liveness order (STATUS_TIME) ---------------------------------------------------

NOW = 1_764_000_000.0


def liveness_row(seq, kind, online, received_at, ts=None, node_key="nd-ph-a1b2c3d4e5f6"):
    """A staged status / lwt / heartbeat row (store.STAGE_COLUMNS) as DbWriter makes it."""
    payload = {"status": "ONLINE" if online else "OFFLINE"} if kind == "status" else {}
    return (seq, kind, node_key, "gh-1", "zone-1", None, None, None,
            received_at if ts is None else ts, received_at, online, None, None, None, None,
            json.dumps(payload), None, None, False)


def history_writer(connect):
    conn = connect()
    store.prepare_connection(conn)
    return conn


def register_ph_node(cur, seen_at: float) -> None:
    """The fixtures' pH node, esp32-a1b2c3d4e5f6, says hello at `seen_at`."""
    store.register_node(cur, hardware_id="esp32-a1b2c3d4e5f6", node_type="ph", fw_version="1",
                        capabilities=[], hardware_revision=None, name=None, wanted_uid=None,
                        base="nd-ph-a1b2c3d4e5f6", seen_at=seen_at)


def status_of(conn, uid="nd-ph-a1b2c3d4e5f6"):
    with conn.cursor() as cur:
        cur.execute("SELECT status FROM nodes WHERE uid = %s", (uid,))
        return cur.fetchone()[0]


@pytest.mark.parametrize("newer_online", [True, False])
def test_the_newer_liveness_message_wins_whichever_instance_commits_last(connect, newer_online):
    """Two instances in a shared group: the newer message commits first, the older one
    (blocked on the node's row meanwhile) last; the newer one decides the status."""
    newer, older = history_writer(connect), history_writer(connect)
    with newer.transaction(), newer.cursor() as cur:
        register(cur)
    done = []
    with newer.transaction(), newer.cursor() as cur:
        store.write_history(cur, [liveness_row(2, "status", newer_online, NOW + 10)])

        def write_older():
            with older.transaction(), older.cursor() as other:
                store.write_history(other, [liveness_row(1, "status" if newer_online else "heartbeat",
                                                         not newer_online, NOW + 5)])
            done.append(True)

        thread = threading.Thread(target=write_older)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting on the node's row: it commits after the newer one
    thread.join(10)
    assert done
    assert status_of(newer) == ("online" if newer_online else "offline")


def test_a_status_is_ordered_by_its_receipt_not_by_the_whole_seconds_of_its_own_ts(connect):
    conn = history_writer(connect)
    with conn.transaction(), conn.cursor() as cur:
        register_ph_node(cur, seen_at=NOW + 0.5)
        # Sent just after the hello, stamped with the node's whole second: it is the newer one.
        store.write_history(cur, [liveness_row(1, "status", False, NOW + 0.7, ts=NOW)])
    assert status_of(conn) == "offline"


def test_a_hello_or_a_report_older_than_the_status_does_not_bring_a_node_back(connect):
    conn = history_writer(connect)
    with conn.transaction(), conn.cursor() as cur:
        register(cur)  # seen at NOW
        store.write_history(cur, [liveness_row(1, "lwt", False, NOW + 100)])
        # Received before the last will by another instance, committed after it.
        register_ph_node(cur, seen_at=NOW + 90)
        store.store_config_report(cur, node_key="esp32-a1b2c3d4e5f6", gh="gh-temp", zone="zn-temp", temp=True,
                                  topic="hydro/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config_report",
                                  config=REPORT, received_at=NOW + 95)
    assert status_of(conn) == "offline"
    with conn.transaction(), conn.cursor() as cur:
        store.store_config_report(cur, node_key="esp32-a1b2c3d4e5f6", gh="gh-temp", zone="zn-temp", temp=True,
                                  topic="hydro/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config_report",
                                  config=REPORT, received_at=NOW + 101)
    assert status_of(conn) == "online"


def test_a_node_swept_offline_for_silence_comes_back_only_with_a_message_after_its_last_one(connect):
    conn = history_writer(connect)
    last_seen = time.time() - 200
    with conn.transaction(), conn.cursor() as cur:
        register_ph_node(cur, seen_at=last_seen)
        assert store.mark_silent_offline(cur, 120.0) == ["nd-ph-a1b2c3d4e5f6"]
    assert status_of(conn) == "offline"
    with conn.transaction(), conn.cursor() as cur:
        # A heartbeat older than the last sign of life, committed late: the node is still silent.
        store.write_history(cur, [liveness_row(1, "heartbeat", True, last_seen - 5)])
    assert status_of(conn) == "offline"
    with conn.transaction(), conn.cursor() as cur:
        # One received after it (even before the sweep ran) brings it back.
        store.write_history(cur, [liveness_row(2, "heartbeat", True, last_seen + 1)])
    assert status_of(conn) == "online"


def test_going_offline_for_silence_is_kept_in_the_history_like_an_offline_status(connect):
    conn = history_writer(connect)
    last_seen = time.time() - 200
    with conn.transaction(), conn.cursor() as cur:
        register_ph_node(cur, seen_at=last_seen)
        store.mark_silent_offline(cur, 120.0)
        store.mark_silent_offline(cur, 120.0)  # already offline: no second event
        cur.execute("SELECT n.uid, e.node_key, e.kind, e.payload, extract(epoch FROM e.ts)"
                    " FROM node_events e JOIN nodes n ON n.id = e.node_id")
        [(uid, key, kind, payload, ts)] = cur.fetchall()
    assert (uid, key, kind) == ("nd-ph-a1b2c3d4e5f6", "nd-ph-a1b2c3d4e5f6", "status")
    assert payload == {"status": "OFFLINE", "reason": "silent", "after_s": 120.0}
    assert float(ts) == pytest.approx(last_seen + 120, abs=0.001)  # when the silence began to count


# --- history rows PostgreSQL refuses (issue 7) ---------------------------------------

def stage_row(seq, **fields):
    """A staging row (store.STAGE_COLUMNS), unset columns NULL."""
    fields = dict(seq=seq, node_key="nd-ph-a1b2c3d4e5f6", gh="gh-1", zone="zn-1", received_at=1_764_000_000.0,
                  online=True, **fields)
    return tuple(fields.get(column) for column in store.STAGE_COLUMNS)


def sample_row(seq):
    return stage_row(seq, kind="telemetry", channel="ph", metric="PH", value=6.0, ts=1_764_000_000.0 + seq,
                     payload='{"metric_type":"PH","value":6.0}')


def test_rows_postgresql_refuses_are_left_out_and_named_and_the_rest_of_the_batch_is_stored(connect):
    # What validation keeps out, forced in: each is refused by PostgreSQL (or psycopg)
    # while the batch is copied, and only that row is left out.
    conn = connect()
    store.prepare_connection(conn)
    with conn.transaction(), conn.cursor() as cur:
        register(cur)
    beyond = {
        3: stage_row(3, kind="heartbeat", rssi=3_000_000_000, payload='{"rssi":3000000000,"mark":"do-not-echo"}'),
        7: stage_row(7, kind="heartbeat", free_heap=2 ** 64 - 1, payload='{"mark":"do-not-echo"}'),
        8: stage_row(8, kind="event", payload='{"note":1e1000000,"mark":"do-not-echo"}'),
        12: stage_row(12, kind="telemetry", channel="ph", metric="P\x00H", value=6.0, ts=1_764_000_012.0,
                      payload='{"metric_type":"PH","value":6.0}'),
        19: stage_row(19, kind="event", payload='{"mark":"do-not-echo \\u0000"}'),
    }
    rows = [beyond.get(seq) or sample_row(seq) for seq in range(20)]
    with conn.transaction(), conn.cursor() as cur:
        refused = store.write_history(cur, rows).refused
    assert sorted(seq for seq, _, _ in refused) == sorted(beyond)
    assert {reason for _, reason, _ in refused} == {"store_refused"}
    details = {seq: detail for seq, _, detail in refused}
    assert "22003" in details[3] and "integer" in details[3]
    assert "22003" in details[7] and "numeric" in details[8]
    assert "NUL" in details[12] and "22P05" in details[19]
    # PostgreSQL's primary message and SQLSTATE, never its context, which quotes the row.
    assert not [d for d in details.values() if "do-not-echo" in d or "COPY" in d]
    stored = conn.execute("SELECT extract(epoch FROM ts)::int - 1764000000 FROM telemetry_samples ORDER BY ts")
    assert [row[0] for row in stored] == [seq for seq in range(20) if seq not in beyond]


# --- acknowledging config pushes ------------------------------------------------------


def test_a_report_acknowledges_a_config_only_once_it_was_handed_to_the_link(connect):
    """A queued config cannot have been applied; one handed to the link can, even
    when the node's report beats the broker's PUBACK."""
    conn = connect()
    uid = "nd-ph-a1b2c3d4e5f6"
    bound = {"version": 1, "gh_uid": "gh-1", "zone_uid": "zn-1", "channels": []}

    def report():
        return store.store_config_report(cur, node_key=uid, gh="gh-1", zone="zn-1", temp=False,
                                         topic=f"hydro/gh-1/zn-1/{uid}/config_report", config=bound,
                                         received_at=time.time())

    def config_status():
        cur.execute("SELECT status FROM node_configs")
        return cur.fetchone()[0]

    with conn.transaction(), conn.cursor() as cur:
        register(cur)
        node = store.node_for_push(cur, uid)
        config_id = store.record_config(cur, node_id=node["id"], version=1, payload=json.dumps(bound).encode(),
                                        topic="hydro/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config")
        # Queued, never sent: a report naming it (another push, a replay) acknowledges nothing.
        assert report().applied_versions == () and config_status() == "queued"
        store.mark_sent(cur, [config_id])
        outcome = report()  # before the PUBACK
        assert outcome.applied_versions == (1,) and outcome.bound_to == ("gh-1", "zn-1")
        store.mark_published(cur, config_id, "hydro/gh-temp/zn-temp/esp32-a1b2c3d4e5f6/config")  # the PUBACK
        assert config_status() == "applied"


class CountingCursor:
    """A real cursor that counts the COPY statements and rows store sends through it."""

    def __init__(self, cur):
        self.cur, self.connection, self.copies, self.rows = cur, cur.connection, 0, 0

    def copy(self, statement):
        self.copies += 1
        counter = self

        class Counted:
            def __enter__(self):
                self.manager = counter.cur.copy(statement)
                self.copy = self.manager.__enter__()
                return self

            def __exit__(self, *exc):
                return self.manager.__exit__(*exc)

            def write_row(self, row):
                counter.rows += 1
                self.copy.write_row(row)

        return Counted()

    def __getattr__(self, name):
        return getattr(self.cur, name)


@pytest.mark.parametrize("refused_every", [1, 10, 250])
def test_cutting_out_refused_rows_sends_each_row_a_few_times_not_the_batch_once_per_refusal(connect, refused_every):
    conn = connect()
    store.prepare_connection(conn)
    with conn.transaction(), conn.cursor() as cur:
        register(cur)
    n = 1000
    rows = [stage_row(seq, kind="heartbeat", rssi=3_000_000_000, payload="{}") if seq % refused_every == 0
            else sample_row(seq) for seq in range(n)]
    with conn.transaction(), conn.cursor() as cur:
        counting = CountingCursor(cur)
        refused = store.write_history(counting, rows).refused
    assert len(refused) == n // refused_every
    assert conn.execute("SELECT count(*) FROM telemetry_samples").fetchone()[0] == n - n // refused_every
    # Cutting out each refused row by COPYing the rest again would send ~n²/2 rows.
    assert counting.rows <= 4 * n, counting.rows
    assert counting.copies <= 10 * (n // refused_every) + 20, counting.copies


def test_a_key_names_the_node_with_that_uid_before_the_one_with_that_hardware_id(connect):
    conn = connect()
    with conn.transaction(), conn.cursor() as cur:
        register(cur)  # uid nd-ph-a1b2c3d4e5f6
        store.register_node(cur, hardware_id="nd-ph-a1b2c3d4e5f6", node_type="ec", fw_version="1", capabilities=[],
                            hardware_revision=None, name=None, wanted_uid=None, base="nd-ec-other",
                            seen_at=1_764_000_000.0)
        assert store.find_node(cur, "nd-ph-a1b2c3d4e5f6")["hardware_id"] == "esp32-a1b2c3d4e5f6"
        assert store.find_node(cur, "nd-ec-other", lock=True)["uid"] == "nd-ec-other"
        assert store.find_node(cur, "nd-nobody") is None
