"""Commands end to end (SPEC §7): hydrod as a process, the real broker, the real
database, and a node double that checks every command as the firmware does."""

import json
import subprocess
import sys
import time

from harness import bind_node, metric_value, publish, query, register_node, wait_until
from node_double import NodeDouble

HW = "esp32-a1b2c3d4e5f6"
FAST = {"sweep_interval_s": 0.1}


def ready_node(daemon, broker, database, hardware_id=HW):
    """A registered node bound to gh-1/zn-1, online, with a node_secret: (uid, secret)."""
    uid = register_node(broker.port, database, hardware_id)
    bind_node(daemon, broker.port, database, uid)
    return uid, query(database, "SELECT node_secret FROM nodes WHERE uid = %s", (uid,))[0][0]


def command(daemon, uid, **body):
    body = {"channel": "pump_acid", "cmd": "dose", "params": {"ml": 2.5}, **body}
    status, answer = daemon.http("POST", f"/api/nodes/{uid}/commands", json=body)
    assert status == 202, (status, answer)
    return answer["cmd_id"]


def final(daemon, cmd_id, want=None, timeout=15.0):
    """The command once its status is `want` (or any final status)."""
    finals = ("DONE", "NO_EFFECT", "ERROR", "INVALID", "BUSY", "TIMEOUT", "EXPIRED")

    def check():
        status, got = daemon.http("GET", f"/api/commands/{cmd_id}")
        if status == 503:  # the read pool's connection was lost with the database: the next one is new
            return None
        assert status == 200, (status, got)
        return got if (got["status"] == want if want else got["status"] in finals) else None

    return wait_until(check, timeout, f"command {cmd_id} {want or 'final'}")


def test_a_signed_command_reaches_done_and_the_api_shows_every_transition(make_daemon, broker, database):
    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)
    with NodeDouble(broker.port, secret, uid) as node:
        cmd_id = command(daemon, uid, params={"ml": 2.5, "note": "pH↓ 1e20", "big": 1e20, "tiny": 1e-7})
        [got] = node.wait_for(1)
        got_done = final(daemon, cmd_id, "DONE")
    assert got.ok, got.verdict  # the firmware's own check passed
    assert got.topic == f"hydro/gh-1/zn-1/{uid}/pump_acid/command"
    assert b'"big":1e+20' in got.payload and b'"tiny":1e-07' in got.payload and "pH↓".encode() in got.payload
    assert [t["status"] for t in got_done["transitions"]] == ["QUEUED", "SENT", "ACK", "DONE"]
    assert got_done["payload"] == json.loads(got.payload) and got_done["details"] == {"ok": True}
    assert secret not in json.dumps(got_done)
    # Kept as node events too.
    events = wait_until(lambda: query(database, "SELECT payload->>'status' FROM node_events"
                                                " WHERE kind = 'command_response' ORDER BY id"), what="events")
    assert [e[0] for e in events] == ["ACK", "DONE"]
    for event in ("command_queued", "command_sent", "command_acked"):
        daemon.wait_for(event, cmd_id=cmd_id)
    daemon.wait_for("command_finished", cmd_id=cmd_id, status="DONE")
    metrics = daemon.http("GET", "/metrics")[1]
    assert metric_value(metrics, "hydrod_commands_total", status="DONE") == 1.0
    assert metric_value(metrics, "hydrod_commands_total", status="QUEUED") == 1.0


def test_a_command_made_while_the_broker_is_cut_is_signed_when_it_goes_out(make_daemon, make_proxy, broker,
                                                                           database):
    proxy = make_proxy(broker.port)
    daemon = make_daemon(commands=FAST, mqtt={"port": proxy.port})
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)
    with NodeDouble(broker.port, secret, uid) as node:
        mark = daemon.mark()
        proxy.cut()
        daemon.wait_for("mqtt_disconnected", since=mark)
        created = time.time()
        cmd_id = command(daemon, uid)
        assert daemon.http("GET", f"/api/commands/{cmd_id}")[1]["status"] == "QUEUED"
        # Whole seconds later, the link comes back: the command is signed then, not when it was made.
        wait_until(lambda: int(time.time()) >= int(created) + 2, 5, "two seconds on")
        restored = time.time()
        proxy.restore()
        [got] = node.wait_for(1, timeout=20)
        assert final(daemon, cmd_id)["status"] == "DONE"
    assert got.ok, got.verdict
    assert json.loads(got.payload)["ts"] >= int(restored) > int(created) + 1


def test_an_offline_node_s_commands_wait_expire_after_their_ttl_and_the_rest_go_when_it_is_back(
        make_daemon, broker, database):
    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)
    other, other_secret = ready_node(daemon, broker, database, "esp32-0000000000b2")
    publish(broker.port, [(f"hydro/gh-1/zn-1/{uid}/status", {"status": "OFFLINE", "ts": int(time.time())})])
    wait_until(lambda: query(database, "SELECT status FROM nodes WHERE uid = %s", (uid,))[0][0] == "offline",
               what="node offline")
    with NodeDouble(broker.port, secret, uid) as node, NodeDouble(broker.port, other_secret, other) as online:
        first = command(daemon, uid, cmd_id="first")
        short = command(daemon, uid, cmd_id="short", ttl_s=0.5)
        last = command(daemon, uid, cmd_id="last")
        # A command to an online node goes through the same claims: once it is DONE, they were passed over.
        final(daemon, command(daemon, other), "DONE")
        assert final(daemon, short, "EXPIRED")["sent_at"] is None
        assert node.got == [] and online.wait_for(1)
        publish(broker.port, [(f"hydro/gh-1/zn-1/{uid}/status", {"status": "ONLINE", "ts": int(time.time())})])
        final(daemon, last, "DONE")
        got = node.wait_for(2)
    assert [json.loads(g.payload)["cmd_id"] for g in got] == [first, last]  # in creation order, never `short`
    daemon.wait_for("command_expired", cmd_id=short)


def test_no_final_answer_is_timeout_and_a_late_done_is_applied_and_marked_late(make_daemon, broker, database):
    daemon = make_daemon(commands={**FAST, "response_timeout_s": 0.5})
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)
    with NodeDouble(broker.port, secret, uid, answer="silent") as node:
        cmd_id = command(daemon, uid)
        node.wait_for(1)
        assert final(daemon, cmd_id)["status"] == "TIMEOUT"
        daemon.wait_for("command_timeout", cmd_id=cmd_id)
        node.reply(f"hydro/gh-1/zn-1/{uid}/pump_acid/command_response", cmd_id, "done")
        got = final(daemon, cmd_id, "DONE")
    assert got["late"] is True
    assert [(t["status"], t["late"]) for t in got["transitions"]] == [
        ("QUEUED", False), ("SENT", False), ("TIMEOUT", False), ("DONE", True)]


def test_duplicate_out_of_order_and_unknown_answers_are_kept_but_move_nothing(make_daemon, broker, database):
    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)
    with NodeDouble(broker.port, secret, uid, answer="error") as node:
        cmd_id = command(daemon, uid)
        assert final(daemon, cmd_id)["status"] == "ERROR"
        topic = f"hydro/gh-1/zn-1/{uid}/pump_acid/command_response"
        node.reply(topic, cmd_id, "ERROR", error_code="pump_jammed")
        node.reply(topic, cmd_id, "ACK")
        node.reply(topic, cmd_id, "DONE")
        node.reply(topic, "never-made", "DONE")
        daemon.wait_for("command_response_unknown", cmd_id="never-made", node_key=uid)
        wait_until(lambda: len(daemon.events("command_response_ignored", cmd_id=cmd_id)) == 3, what="3 ignored")
    got = daemon.http("GET", f"/api/commands/{cmd_id}")[1]
    assert (got["status"], got["error_code"]) == ("ERROR", "pump_jammed")
    assert [t["status"] for t in got["transitions"]] == ["QUEUED", "SENT", "ACK", "ERROR"]
    events = wait_until(lambda: (rows := query(database, "SELECT payload->>'cmd_id' FROM node_events"
                                                          " WHERE kind = 'command_response'")) and len(rows) == 6
                        and rows, what="six events")
    assert sorted(e[0] for e in events).count("never-made") == 1
    metrics = daemon.http("GET", "/metrics")[1]
    assert metric_value(metrics, "hydrod_command_responses_total", outcome="unknown") == 1.0
    assert metric_value(metrics, "hydrod_command_responses_total", outcome="ignored") == 3.0


def test_queued_commands_survive_a_restart_and_go_out_in_creation_order(make_daemon, broker, database):
    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)
    publish(broker.port, [(f"hydro/gh-1/zn-1/{uid}/lwt", "offline")])
    wait_until(lambda: query(database, "SELECT status FROM nodes WHERE uid = %s", (uid,))[0][0] == "offline",
               what="node offline")
    made = [command(daemon, uid, cmd_id=f"c{n}", params={"ml": n + 1}) for n in range(3)]
    assert daemon.terminate() == 0
    daemon.start()
    daemon.wait_ready()
    with NodeDouble(broker.port, secret, uid) as node:
        publish(broker.port, [(f"hydro/gh-1/zn-1/{uid}/heartbeat", {"uptime": 5, "free_heap": 1, "rssi": -50})])
        got = node.wait_for(3)
        for cmd_id in made:
            final(daemon, cmd_id, "DONE")
    assert [json.loads(g.payload)["cmd_id"] for g in got] == made
    assert all(g.ok for g in got)


def test_a_node_that_keeps_its_hardware_id_in_topics_gets_commands_there(make_daemon, broker, database):
    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    uid = register_node(broker.port, database, HW)
    status, pushed = daemon.http("POST", f"/api/nodes/{uid}/config",
                                 json={"channels": [], "gh_uid": "gh-1", "zone_uid": "zn-1"})
    assert status == 202
    publish(broker.port, [(f"hydro/gh-1/zn-1/{HW}/config_report",
                           {"node_id": uid, "version": pushed["version"], "type": "ph", "channels": [],
                            "gh_uid": "gh-1", "zone_uid": "zn-1", "mqtt": {"configured": True}})])
    daemon.wait_for("node_bound", node_uid=uid)
    secret = query(database, "SELECT node_secret FROM nodes WHERE uid = %s", (uid,))[0][0]
    with NodeDouble(broker.port, secret, HW) as node:
        cmd_id = command(daemon, uid, channel="relay1", cmd="on", params={})
        [got] = node.wait_for(1)
        assert final(daemon, cmd_id)["status"] == "DONE"
    assert got.topic == f"hydro/gh-1/zn-1/{HW}/relay1/command" and got.ok


def test_hydrod_command_exits_0_only_on_done_and_prints_the_final_state(make_daemon, broker, database):
    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hydrod", "command", *args, "--config", str(daemon.config_path)],
                              capture_output=True, text=True, timeout=60)

    with NodeDouble(broker.port, secret, uid) as node:
        done = cli(uid, "pump_acid", "dose", '{"ml": 1.5}', "--wait", "20")
        node.answer = "error"
        failed = cli(uid, "pump_acid", "dose", '{"ml": 1.5}', "--wait", "20", "--cmd-id", "cli-2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "DONE"
    # stdout: the final state, then (a fatal error) the daemon_failed line.
    assert failed.returncode == 1 and json.JSONDecoder().raw_decode(failed.stdout)[0]["status"] == "ERROR"
    assert "command cli-2 ended ERROR (pump_jammed)" in failed.stderr
    refused = cli(uid, "pump_acid", "dose", '{"ml": 900}')
    assert refused.returncode == 1 and "400" in refused.stderr and "params.ml" in refused.stderr
    unknown = cli("nd-nobody", "pump_acid", "dose")
    assert unknown.returncode == 1 and "404" in unknown.stderr


def test_every_refusal_of_the_commands_api_names_the_problem(make_daemon, broker, database):
    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    uid, _ = ready_node(daemon, broker, database)
    unbound = register_node(broker.port, database, "esp32-0000000000b2")
    ok = {"channel": "pump_acid", "cmd": "dose", "params": {"ml": 1}}
    path = f"/api/nodes/{uid}/commands"
    cases = [
        (dict(body=b"{nope"), 400, "body is not JSON"),
        (dict(json={**ok, "channel": "a/b"}), 400, "`channel`"),
        (dict(json={**ok, "params": {"duration_ms": 0}}), 400, "params.duration_ms"),
        (dict(json={**ok, "ttl_s": -1}), 400, "`ttl_s`"),
        (dict(json={**ok, "extra": 1}), 400, "unknown field `extra`"),
        (dict(json=ok, headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
        (dict(json=ok, headers={"Origin": "http://evil.example"}), 403, "cross-origin"),
    ]
    for request, want, says in cases:
        status, answer = daemon.http("POST", path, **request)
        assert (status, says in answer["error"]) == (want, True), (request, status, answer)
    assert daemon.http("POST", "/api/nodes/nd-nobody/commands", json=ok)[0] == 404
    status, answer = daemon.http("POST", f"/api/nodes/{unbound}/commands", json=ok)
    assert status == 409 and "not bound" in answer["error"]
    assert daemon.http("POST", path, json={**ok, "cmd_id": "same"})[0] == 202
    status, again = daemon.http("POST", path, json={**ok, "cmd_id": "same"})
    assert status == 200 and again.pop("status") in ("QUEUED", "SENT")  # it may have gone out meanwhile
    assert again == {"cmd_id": "same", "node_uid": uid, "channel": "pump_acid", "cmd": "dose"}
    status, answer = daemon.http("POST", path, json={**ok, "cmd_id": "same", "params": {"ml": 2}})
    assert status == 409 and "cmd_id same names another command" in answer["error"]
    assert daemon.http("GET", "/api/commands/nope")[0] == 404
    assert daemon.http("GET", "/api/nodes/nd-nobody/commands")[0] == 404
    assert daemon.http("GET", f"{path}?limit=0")[0] == 400
    status, listed = daemon.http("GET", path)
    assert status == 200 and [c["cmd_id"] for c in listed] == ["same"]


def test_answers_that_come_during_a_database_outage_move_their_command_once_it_is_back(
        make_daemon, make_proxy, broker, database, pg_server):
    proxy = make_proxy(pg_server.port, pg_server.host)
    via_proxy = database.replace(f"{pg_server.host}:{pg_server.port}", f"127.0.0.1:{proxy.port}")
    daemon = make_daemon(commands=FAST, database={"dsn": via_proxy})
    daemon.wait_ready()
    uid, secret = ready_node(daemon, broker, database)
    with NodeDouble(broker.port, secret, uid, answer="ack") as node:
        cmd_id = command(daemon, uid)
        node.wait_for(1)
        final(daemon, cmd_id, "ACK")
        mark = daemon.mark()
        proxy.cut()
        node.reply(f"hydro/gh-1/zn-1/{uid}/pump_acid/command_response", cmd_id, "DONE")
        daemon.wait_for("db_unavailable", since=mark, timeout=20, actor="commands")
        assert query(database, "SELECT status FROM commands WHERE cmd_id = %s", (cmd_id,)) == [("ACK",)]
        proxy.restore()
        got = final(daemon, cmd_id, "DONE", timeout=30)
    assert [t["status"] for t in got["transitions"]] == ["QUEUED", "SENT", "ACK", "DONE"]
    daemon.wait_for("db_recovered", since=mark, actor="commands")


def test_a_command_through_hydrod_to_a_simulated_node_reaches_done(make_daemon, broker, database):
    from test_simulate import node_rows, push, simulating

    daemon = make_daemon(commands=FAST)
    daemon.wait_ready()
    with simulating(nodes=1, rate=5, port=broker.port, prefix="esp32-cmdsim") as sim:
        wait_until(lambda: node_rows(database, "esp32-cmdsim"), what="node registered")
        uid = node_rows(database, "esp32-cmdsim")[0][0]
        push(daemon, uid, gh_uid="gh-1", zone_uid="zn-1")
        wait_until(lambda: node_rows(database, "esp32-cmdsim")[0][3] == "gh-1", what="node bound")
        cmd_id = command(daemon, uid, params={"ml": 1.0, "rate": 0.1, "big": 1e20})
        got = final(daemon, cmd_id)
    assert got["status"] == "DONE", got
    assert sim.result["commands"]["done"] == 1
