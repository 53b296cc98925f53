"""The command line (SPEC §5): migrate, nodes, and fatal errors as one clear line."""

import json
import subprocess
import sys

from harness import fast_config, free_port, merge_sections, publish, query, to_toml, wait_until
from hydrod import store


def hydrod(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "hydrod", *args], capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp_path, **sections):
    path = tmp_path / "config.toml"
    path.write_text(to_toml(merge_sections(fast_config(1883, "postgresql://127.0.0.1:1/none", free_port()),
                                           sections)))
    return str(path)


def test_migrate_creates_the_schema_once(tmp_path, database):
    config = write_config(tmp_path, database={"dsn": database})
    first = hydrod("migrate", "--config", config)
    assert first.returncode == 0, first.stderr
    tables = {row[0] for row in query(database, "SELECT table_name FROM information_schema.tables "
                                                "WHERE table_schema = 'public'")}
    assert {"nodes", "node_configs", "telemetry_samples", "telemetry_last", "node_events",
            "dead_letters", "schema_migrations"} <= tables
    second = hydrod("migrate", "--config", config)
    assert second.returncode == 0, second.stderr
    assert query(database, "SELECT count(*) FROM schema_migrations")[0][0] == len(store.migrations())


def test_nodes_lists_the_registry(make_daemon, broker, database):
    daemon = make_daemon()
    daemon.wait_ready()
    publish(broker.port, [("hydro/node_hello", {"message_type": "node_hello", "hardware_id": "esp32-a1b2c3d4e5f6",
                                                "node_type": "ph"})])
    wait_until(lambda: query(database, "SELECT 1 FROM nodes"), what="node")
    table = hydrod("nodes", "--config", str(daemon.config_path))
    assert table.returncode == 0, table.stderr
    assert "nd-ph-a1b2c3d4e5f6" in table.stdout and "1 node(s)" in table.stdout
    as_json = hydrod("nodes", "--json", "--config", str(daemon.config_path))
    assert json.loads(as_json.stdout.splitlines()[0])["hardware_id"] == "esp32-a1b2c3d4e5f6"


def test_an_unreachable_database_at_start_is_one_clear_line_and_exit_3(tmp_path):
    config = write_config(tmp_path, database={"startup_timeout_s": 1.0})
    result = hydrod("run", "--config", config)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0
    assert "PostgreSQL unreachable" in result.stderr
    failed = [json.loads(line) for line in result.stdout.splitlines() if '"daemon_failed"' in line]
    assert failed and failed[0]["exit_code"] == 3


def test_a_taken_http_port_is_a_clear_start_up_error(tmp_path, broker, database):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, database={"dsn": database}, mqtt={"port": broker.port},
                              http={"port": taken.getsockname()[1]})
        port = taken.getsockname()[1]
        result = hydrod("run", "--config", config)
    assert result.returncode == 4
    assert "http_api did not start" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address in use" in result.stdout


def test_a_bad_config_stops_before_anything_starts(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[mqtt]\nport = 0\n")
    result = hydrod("run", "--config", str(path))
    assert result.returncode == 2 and "`mqtt.port`" in result.stderr
    assert '"actor_started"' not in result.stdout


def test_sigterm_while_waiting_for_the_database_exits_0_at_once(make_daemon):
    daemon = make_daemon(database={"dsn": "postgresql://127.0.0.1:1/none", "startup_timeout_s": 60.0})
    daemon.wait_for("db_unavailable", doing="migrate")
    assert daemon.terminate(timeout=10) == 0
    assert daemon.events("migrations_abandoned") and daemon.events("daemon_stopped")
