"""core/commands.py, synchronously, against a real PostgreSQL: the state machine, the
queue per node, TTL expiry, the response timeout, and answers out of order, twice,
late or unknown (SPEC §7). The actor, the broker and the node are in test_commands.py."""

import json
import time

import psycopg
import pytest
import structlog
from psycopg_pool import ConnectionPool

from harness import query, wait_until
from hydrod import signing, store
from hydrod.core.commands import Answer, CommandRefused, Commands, check_body, step
from hydrod.metrics import Metrics

SECRET = "ab" * 32
NOW = 1_764_460_800


@pytest.fixture
def db(database):
    with psycopg.connect(database) as conn:
        store.migrate(conn)
    return database


def make_node(dsn, hardware_id="esp32-a1b2c3d4e5f6", bound=True, online=True, secret=SECRET, topic_key=None):
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        created = store.register_node(cur, hardware_id=hardware_id, node_type="ph", fw_version="1", capabilities=[],
                                      hardware_revision=None, name=None, wanted_uid=None,
                                      base=f"nd-ph-{hardware_id[-12:]}", seen_at=time.time())
        cur.execute("UPDATE nodes SET gh_uid = %s, zone_uid = %s, node_secret = %s, status = %s, topic_key = %s"
                    " WHERE uid = %s", ("gh-1" if bound else None, "zn-1" if bound else None, secret,
                                        "online" if online else "offline", topic_key, created.uid))
    return created.uid


@pytest.fixture
def commands(db):
    pool = ConnectionPool(db, min_size=1, max_size=2, open=True)
    core = Commands(pool, default_ttl_s=60, response_timeout_s=30, metrics=Metrics(),
                    log=structlog.get_logger("test"), clock=lambda: NOW)
    yield core
    pool.close()


def status(dsn, cmd_id):
    return query(dsn, "SELECT status FROM commands WHERE cmd_id = %s", (cmd_id,))[0][0]


def answer(core, cmd_id, answer_status, node_key="nd-ph-a1b2c3d4e5f6", **extra):
    return core.answer(Answer(node_key, json.dumps({"cmd_id": cmd_id, "status": answer_status, "ts": NOW * 1000,
                                                    **extra}).encode(), time.time()))


def sent(core, dsn, uid, cmd_id, params=None):
    """Create, claim and PUBACK one command; return what was published."""
    core.create(uid, {"channel": "pump_acid", "cmd": "dose", "params": params or {"ml": 2.5}, "cmd_id": cmd_id})
    out = [o for o in core.claim() if o.cmd_id == cmd_id]
    assert len(out) == 1, out
    core.published([out[0].id])
    assert status(dsn, cmd_id) == "SENT"
    return out[0]


# --- the body ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "names"), [
    ([], "body must be a JSON object"),
    ({"channel": "p", "cmd": "x", "param": {}}, "unknown field `param`"),
    ({"cmd": "x"}, "`channel`"),
    ({"channel": "pump acid", "cmd": "x"}, "`channel`"),
    ({"channel": "p" * 65, "cmd": "x"}, "`channel`"),
    ({"channel": "p"}, "`cmd`"),
    ({"channel": "p", "cmd": ""}, "`cmd`"),
    ({"channel": "p", "cmd": "x" * 65}, "`cmd`"),
    ({"channel": "p", "cmd": "x", "params": [1]}, "`params` must be a JSON object"),
    ({"channel": "p", "cmd": "x", "cmd_id": "a b"}, "`cmd_id`"),
    ({"channel": "p", "cmd": "x", "cmd_id": "a" * 129}, "`cmd_id`"),
    ({"channel": "p", "cmd": "x", "ttl_s": 0}, "`ttl_s`"),
    ({"channel": "p", "cmd": "x", "ttl_s": True}, "`ttl_s`"),
    ({"channel": "p", "cmd": "x", "ttl_s": 86401}, "`ttl_s`"),
    ({"channel": "p", "cmd": "x", "params": {"ml": 0}}, "unsafe parameter `params.ml` = 0"),
    ({"channel": "p", "cmd": "x", "params": {"ml": 500.5}}, "unsafe parameter `params.ml`"),
    ({"channel": "p", "cmd": "x", "params": {"ml": "5"}}, "unsafe parameter `params.ml`"),
    ({"channel": "p", "cmd": "x", "params": {"duration_ms": 300001}}, "unsafe parameter `params.duration_ms`"),
    ({"channel": "p", "cmd": "x", "params": {"duration_ms": -1}}, "unsafe parameter `params.duration_ms`"),
    ({"channel": "p", "cmd": "x", "params": {"steps": [{"position_pct": 101}]}},
     "unsafe parameter `params.steps[0].position_pct`"),
    ({"channel": "p", "cmd": "x", "params": {"position_pct": -0.5}}, "unsafe parameter `params.position_pct`"),
    ({"channel": "p", "cmd": "x", "params": {"big": 10**400}}, "params.big is beyond the range of a double"),
    ({"channel": "p", "cmd": "x", "params": {"s": "\ud800"}}, "params.s holds a lone surrogate"),
])
def test_a_bad_body_or_an_unsafe_parameter_is_refused_with_400_naming_the_field(body, names):
    with pytest.raises(CommandRefused) as refused:
        check_body(body)
    assert refused.value.status == 400 and names in refused.value.message


def test_params_may_nest_sixteen_deep_but_not_seventeen():
    def nested(depth):
        params = {}
        for _ in range(depth - 1):
            params = {"a": params}
        return params
    assert check_body({"channel": "p", "cmd": "x", "params": nested(16)}).params == nested(16)
    with pytest.raises(CommandRefused, match="nested more than 16 deep"):
        check_body({"channel": "p", "cmd": "x", "params": nested(17)})


def test_the_edges_of_the_safe_ranges_are_allowed():
    params = {"ml": 500, "duration_ms": 300000, "position_pct": 0, "other": {"ml": 0.001, "position_pct": 100}}
    assert check_body({"channel": "p", "cmd": "x", "params": params}).params == params


# --- the state machine ----------------------------------------------------------------


@pytest.mark.parametrize(("now", "handed", "answer", "then"), [
    ("SENT", True, "ACK", ("ACK", False)),
    ("QUEUED", True, "ACK", ("ACK", False)),  # the PUBACK not recorded yet
    ("SENT", True, "DONE", ("DONE", False)),  # a final answer without an ACK
    ("ACK", True, "ERROR", ("ERROR", False)),
    ("ACK", True, "BUSY", ("BUSY", False)),
    ("TIMEOUT", True, "DONE", ("DONE", True)),  # late: the node did act
    ("ACK", True, "ACK", None),
    ("DONE", True, "DONE", None),
    ("DONE", True, "ACK", None),
    ("ERROR", True, "DONE", None),
    ("TIMEOUT", True, "ACK", None),
    ("QUEUED", False, "DONE", None),  # never handed to the link: the node cannot have it
    ("EXPIRED", False, "DONE", None),
])
def test_an_answer_moves_a_command_forward_only(now, handed, answer, then):
    assert step(now, handed, answer) == then


# --- creating ------------------------------------------------------------------------


def test_a_command_is_queued_with_a_generated_cmd_id_and_its_transition_kept(commands, db):
    uid = make_node(db)
    summary, created = commands.create(uid, {"channel": "pump_acid", "cmd": "dose", "params": {"ml": 2}})
    assert created and summary["status"] == "QUEUED" and summary["cmd_id"].startswith("cmd-")
    got = commands.get(summary["cmd_id"])
    assert [t["status"] for t in got["transitions"]] == ["QUEUED"]
    assert got["payload"] is None and got["handed_at"] is None


def test_the_same_cmd_id_with_the_same_content_returns_the_command_and_other_content_is_409(commands, db):
    uid = make_node(db)
    body = {"channel": "pump_acid", "cmd": "dose", "params": {"ml": 2}, "cmd_id": "c-1"}
    first, created = commands.create(uid, body)
    again, created_again = commands.create(uid, dict(body))
    assert created and not created_again and again == first
    for other in ({"params": {"ml": 3}}, {"cmd": "stop"}, {"channel": "pump_base"}, {"ttl_s": 5}):
        with pytest.raises(CommandRefused) as refused:
            commands.create(uid, {**body, **other})
        assert refused.value.status == 409 and "cmd_id c-1 names another command" in refused.value.message
    assert query(db, "SELECT count(*) FROM commands") == [(1,)]


def test_a_command_for_an_unknown_unbound_decommissioned_or_secretless_node_is_refused(commands, db):
    body = {"channel": "p", "cmd": "x"}
    with pytest.raises(CommandRefused, match="no node with uid nd-nobody") as refused:
        commands.create("nd-nobody", body)
    assert refused.value.status == 404
    unbound = make_node(db, "esp32-000000000001", bound=False)
    secretless = make_node(db, "esp32-000000000002", secret=None)
    retired = make_node(db, "esp32-000000000003")
    query(db, "UPDATE nodes SET lifecycle_state = 'DECOMMISSIONED' WHERE uid = %s RETURNING 1", (retired,))
    for uid, why in ((unbound, "not bound to a zone"), (secretless, "no node_secret"), (retired, "decommissioned")):
        with pytest.raises(CommandRefused, match=why) as refused:
            commands.create(uid, body)
        assert refused.value.status == 409
    assert query(db, "SELECT count(*) FROM commands") == [(0,)]


# --- sending ----------------------------------------------------------------------------


def test_a_claimed_command_is_signed_at_claim_time_on_the_node_s_own_topic_segment(commands, db):
    by_uid = make_node(db, "esp32-000000000001")
    by_hw = make_node(db, "esp32-000000000002", topic_key="esp32-000000000002")
    commands.create(by_uid, {"channel": "pump_acid", "cmd": "dose", "params": {"ml": 1.0}, "cmd_id": "a"})
    commands.create(by_hw, {"channel": "relay1", "cmd": "on", "cmd_id": "b"})
    out = {o.cmd_id: o for o in commands.claim()}
    assert out["a"].topic == f"hydro/gh-1/zn-1/{by_uid}/pump_acid/command"
    assert out["b"].topic == "hydro/gh-1/zn-1/esp32-000000000002/relay1/command"
    checked = signing.check(out["a"].payload, SECRET, NOW)
    assert checked["ts"] == NOW and checked["params"] == {"ml": 1}
    assert out["a"].payload == (b'{"cmd":"dose","cmd_id":"a","params":{"ml":1},"sig":"'
                                + checked["sig"].encode() + b'","ts":1764460800}')
    stored = query(db, "SELECT payload, topic, handed_at IS NOT NULL, status FROM commands WHERE cmd_id = 'a'")[0]
    assert stored == (json.loads(out["a"].payload), out["a"].topic, True, "QUEUED")


def test_per_node_one_command_goes_at_a_time_in_creation_order(commands, db):
    uid = make_node(db)
    for n in range(3):
        commands.create(uid, {"channel": "pump_acid", "cmd": "dose", "params": {"ml": 1}, "cmd_id": f"c{n}"})
    first = commands.claim()
    assert [o.cmd_id for o in first] == ["c0"]
    assert commands.claim() == []  # c0 is between hand-over and PUBACK
    commands.published([first[0].id])
    assert [o.cmd_id for o in commands.claim()] == ["c1"]


def test_a_publish_the_link_refused_goes_again_first_in_line(commands, db):
    uid = make_node(db)
    for n in range(2):
        commands.create(uid, {"channel": "p", "cmd": "x", "cmd_id": f"c{n}"})
    [first] = commands.claim()
    commands.not_published(first.id)
    assert query(db, "SELECT handed_at, payload FROM commands WHERE cmd_id = 'c0'") == [(None, None)]
    assert [o.cmd_id for o in commands.claim()] == ["c0"]


def test_an_offline_or_unbound_node_s_commands_wait(commands, db):
    uid = make_node(db, online=False)
    commands.create(uid, {"channel": "p", "cmd": "x", "cmd_id": "c0"})
    assert commands.claim() == []
    query(db, "UPDATE nodes SET status = 'online' WHERE uid = %s RETURNING 1", (uid,))
    assert [o.cmd_id for o in commands.claim()] == ["c0"]


def test_a_command_not_sent_within_its_ttl_expires_and_is_never_sent(commands, db):
    uid = make_node(db, online=False)
    commands.create(uid, {"channel": "p", "cmd": "x", "cmd_id": "short", "ttl_s": 0.2})
    commands.create(uid, {"channel": "p", "cmd": "x", "cmd_id": "long", "ttl_s": 60})
    wait_until(lambda: commands.sweep() or status(db, "short") == "EXPIRED", 5, "expiry")
    query(db, "UPDATE nodes SET status = 'online' WHERE uid = %s RETURNING 1", (uid,))
    assert [o.cmd_id for o in commands.claim()] == ["long"]
    got = commands.get("short")
    assert [t["status"] for t in got["transitions"]] == ["QUEUED", "EXPIRED"]
    assert got["handed_at"] is None and got["finished_at"] is not None


def test_a_command_handed_over_without_a_puback_is_never_handed_over_again_and_times_out(db):
    pool = ConnectionPool(db, min_size=1, max_size=2, open=True)
    core = Commands(pool, default_ttl_s=60, response_timeout_s=0.3, metrics=Metrics(),
                    log=structlog.get_logger("test"))
    try:
        uid = make_node(db)
        core.create(uid, {"channel": "p", "cmd": "x", "cmd_id": "doubt"})
        core.create(uid, {"channel": "p", "cmd": "x", "cmd_id": "next"})
        assert [o.cmd_id for o in core.claim()] == ["doubt"]
        # The link dropped, or hydrod died, before the PUBACK: a new claimer (a restart) sends nothing.
        restarted = Commands(pool, default_ttl_s=60, response_timeout_s=0.3, metrics=Metrics(),
                             log=structlog.get_logger("test"))
        assert restarted.claim() == []
        wait_until(lambda: restarted.sweep() or status(db, "doubt") == "TIMEOUT", 5, "timeout")
        assert query(db, "SELECT error_code FROM commands WHERE cmd_id = 'doubt'") == [("no_puback",)]
        assert [o.cmd_id for o in restarted.claim()] == ["next"]  # never "doubt" again
        # It may have reached the node: its late DONE is applied, and marked late.
        assert answer(restarted, "doubt", "DONE", node_key=uid) == "applied"
        got = restarted.get("doubt")
        assert got["status"] == "DONE" and got["late"] is True
        assert [t["status"] for t in got["transitions"]] == ["QUEUED", "TIMEOUT", "DONE"]
    finally:
        pool.close()


# --- answers ----------------------------------------------------------------------------


def test_ack_then_done_moves_a_sent_command_and_keeps_every_transition(commands, db):
    uid = make_node(db)
    sent(commands, db, uid, "c-1")
    assert answer(commands, "c-1", "ack", node_key=uid) == "applied"  # status in any case
    assert answer(commands, "c-1", "DONE", node_key=uid, details={"dosed_ml": 2.5}) == "applied"
    got = commands.get("c-1")
    assert got["status"] == "DONE" and got["details"] == {"dosed_ml": 2.5} and got["acked_at"] and got["finished_at"]
    assert [t["status"] for t in got["transitions"]] == ["QUEUED", "SENT", "ACK", "DONE"]


def test_duplicate_and_out_of_order_answers_never_move_a_command_backwards(commands, db):
    uid = make_node(db)
    sent(commands, db, uid, "c-1")
    assert answer(commands, "c-1", "ERROR", node_key=uid, error_code="pump_jammed", error_message="stuck") == "applied"
    assert answer(commands, "c-1", "ACK", node_key=uid) == "ignored"
    assert answer(commands, "c-1", "ERROR", node_key=uid) == "ignored"
    assert answer(commands, "c-1", "DONE", node_key=uid) == "ignored"
    got = commands.get("c-1")
    assert (got["status"], got["error_code"], got["error_message"]) == ("ERROR", "pump_jammed", "stuck")
    assert [t["status"] for t in got["transitions"]] == ["QUEUED", "SENT", "ERROR"]


def test_a_puback_after_the_node_s_answer_leaves_the_answer_in_place(commands, db):
    uid = make_node(db)
    commands.create(uid, {"channel": "p", "cmd": "x", "cmd_id": "fast"})
    [out] = commands.claim()
    assert answer(commands, "fast", "DONE", node_key=uid) == "applied"
    commands.published([out.id])
    got = commands.get("fast")
    assert got["status"] == "DONE" and got["sent_at"] is not None


def test_an_answer_for_an_unknown_cmd_id_or_from_another_node_is_unknown(commands, db):
    uid = make_node(db, "esp32-000000000001")
    other = make_node(db, "esp32-000000000002")
    sent(commands, db, uid, "c-1")
    assert answer(commands, "nobody-sent-this", "DONE", node_key=uid) == "unknown"
    assert answer(commands, "c-1", "DONE", node_key=other) == "unknown"
    assert status(db, "c-1") == "SENT"
    # The node's hardware id is its own too.
    assert answer(commands, "c-1", "DONE", node_key="esp32-000000000001") == "applied"


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"cmd_id":"c-1"}', b'{"cmd_id":"c-1","status":"MAYBE"}',
                                     b'{"cmd_id":7,"status":"DONE"}'])
def test_an_unreadable_answer_is_invalid_and_moves_nothing(commands, db, payload):
    uid = make_node(db)
    sent(commands, db, uid, "c-1")
    assert commands.answer(Answer(uid, payload, time.time())) == "invalid"
    assert status(db, "c-1") == "SENT"


def test_answers_the_history_kept_while_no_one_applied_them_are_applied_at_start(commands, db):
    uid = make_node(db)
    sent(commands, db, uid, "c-1")
    for n, answer_status in enumerate(("ACK", "DONE")):
        query(db, "INSERT INTO node_events (node_id, node_key, channel, kind, payload, ts, received_at)"
                  " SELECT id, uid, 'p', 'command_response', %s, now(), now() FROM nodes WHERE uid = %s RETURNING 1",
              (json.dumps({"cmd_id": "c-1", "status": answer_status, "ts": n}), uid))
    assert commands.recover() == 2
    assert [t["status"] for t in commands.get("c-1")["transitions"]] == ["QUEUED", "SENT", "ACK", "DONE"]
    assert commands.recover() == 0  # nothing open any more


def test_no_final_answer_within_the_response_timeout_is_timeout(db):
    pool = ConnectionPool(db, min_size=1, max_size=2, open=True)
    core = Commands(pool, default_ttl_s=60, response_timeout_s=0.3, metrics=Metrics(),
                    log=structlog.get_logger("test"))
    try:
        uid = make_node(db)
        sent(core, db, uid, "slow")
        answer(core, "slow", "ACK", node_key=uid)
        wait_until(lambda: core.sweep() or status(db, "slow") == "TIMEOUT", 5, "timeout")
        assert answer(core, "slow", "ACK", node_key=uid) == "ignored"
        assert answer(core, "slow", "NO_EFFECT", node_key=uid) == "applied"
        got = core.get("slow")
        assert got["status"] == "NO_EFFECT" and got["late"] is True
        assert [(t["status"], t["late"]) for t in got["transitions"]] == [
            ("QUEUED", False), ("SENT", False), ("ACK", False), ("TIMEOUT", False), ("NO_EFFECT", True)]
    finally:
        pool.close()
