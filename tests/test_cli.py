"""The command line (SPEC §5): migrate, nodes, and fatal errors as one clear line."""

import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time

import pytest

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


def test_nodes_before_any_migration_says_to_run_migrate(tmp_path, database):
    config = write_config(tmp_path, database={"dsn": database})
    result = hydrod("nodes", "--config", config)
    assert result.returncode == 1
    assert result.stderr.strip() == "hydrod: the database has no hydrod schema yet: run `hydrod migrate` first"


def test_an_unreachable_database_at_start_is_one_clear_line_and_exit_3(tmp_path):
    config = write_config(tmp_path, database={"startup_timeout_s": 1.0})
    result = hydrod("run", "--config", config)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0
    assert "PostgreSQL unreachable" in result.stderr
    failed = [json.loads(line) for line in result.stdout.splitlines() if '"daemon_failed"' in line]
    assert failed and failed[0]["exit_code"] == 3


def fatal_line(result):
    """The daemon_failed record: there must be exactly one."""
    [failed] = [json.loads(line) for line in result.stdout.splitlines() if '"daemon_failed"' in line]
    return failed


def test_a_taken_http_port_is_a_clear_start_up_error_naming_the_cause(tmp_path, broker, database):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, database={"dsn": database}, mqtt={"port": broker.port},
                              http={"port": port})
        result = hydrod("run", "--config", config)
    assert result.returncode == 4
    failed = fatal_line(result)
    assert failed["exit_code"] == 4
    assert "http_api did not start" in failed["error"]
    assert f"cannot listen on 127.0.0.1:{port}: address in use" in failed["error"]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("hydrod: ")
    assert f"cannot listen on 127.0.0.1:{port}: address in use" in result.stderr


BREAKS_AT_START = textwrap.dedent("""
    import sys
    from hydrod import cli, store

    def broken(conn):
        raise KeyError("injected bug")

    store.migrate = broken
    sys.exit(cli.main(["--config", sys.argv[1], "run"]))
""")


def test_an_unexpected_exception_at_start_is_one_json_line_with_the_traceback_and_one_stderr_line(
        tmp_path, database):
    config = write_config(tmp_path, database={"dsn": database})
    result = subprocess.run([sys.executable, "-c", BREAKS_AT_START, config], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert all(line.startswith("{") for line in result.stdout.splitlines()), result.stdout
    failed = fatal_line(result)
    assert failed["exit_code"] == 1 and "KeyError" in failed["error"] and "injected bug" in failed["error"]
    assert "Traceback" in failed["exception"] and "in broken" in failed["exception"]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("hydrod: ") and "injected bug" in result.stderr


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


@pytest.mark.parametrize("option", ["sslmode=bogus", "keepalives=x", "target_session_attrs=bogus"])
def test_a_dsn_option_libpq_refuses_is_a_config_error_at_once_that_does_not_show_the_password(
        tmp_path, pg_server, option):
    dsn = f"postgresql://hydrod:s3cretpw@{pg_server.host}:{pg_server.port}/postgres?{option}"
    config = write_config(tmp_path, database={"dsn": dsn, "startup_timeout_s": 30.0})
    started = time.monotonic()
    result = hydrod("run", "--config", config)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 10, "retried as if PostgreSQL were away"
    name = option.split("=")[0]
    assert result.stderr.startswith("hydrod: `database.dsn`: ") and name in result.stderr
    assert fatal_line(result)["exit_code"] == 2
    assert "s3cretpw" not in result.stdout + result.stderr
    assert '"db_unavailable"' not in result.stdout


def test_migrate_and_nodes_refuse_a_bad_dsn_option_as_a_config_error_too(tmp_path, pg_server):
    dsn = f"postgresql://{pg_server.host}:{pg_server.port}/postgres?sslmode=bogus"
    config = write_config(tmp_path, database={"dsn": dsn, "startup_timeout_s": 30.0})
    for command in ("migrate", "nodes"):
        result = hydrod(command, "--config", config)
        assert result.returncode == 2, (command, result.stderr)
        assert 'invalid sslmode value: "bogus"' in result.stderr


@pytest.fixture
def sql_ascii_database(pg_server):
    """A database such as a cluster made without LANG holds: SQL_ASCII, no encoding at all."""
    name = f"hydrod_test_ascii_{secrets.token_hex(4)}"
    query(pg_server.admin_dsn, f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0 "
                               "LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


def test_a_database_that_is_not_utf8_is_refused_with_one_clear_line_by_run_migrate_and_nodes(
        tmp_path, broker, sql_ascii_database):
    config = write_config(tmp_path, database={"dsn": sql_ascii_database}, mqtt={"port": broker.port})
    for command in ("run", "migrate", "nodes"):
        result = hydrod(command, "--config", config)
        assert result.returncode == 2, (command, result.stdout[-2000:], result.stderr)
        assert result.stderr.strip().count("\n") == 0, (command, result.stderr)
        assert "SQL_ASCII" in result.stderr and "UTF8" in result.stderr, (command, result.stderr)
        assert fatal_line(result)["exit_code"] == 2
    assert query(sql_ascii_database, "SELECT to_regclass('schema_migrations')") == [(None,)]


def test_the_tests_own_databases_are_utf8(database):
    assert query(database, "SHOW server_encoding") == [("UTF8",)]


def test_run_without_config_reads_hydrod_config_else_the_config_toml_where_it_runs(make_daemon):
    from harness import _hydrod_argv

    # ./config.toml: the daemon runs in its own directory, beside the one it wrote.
    here = make_daemon(command=[*_hydrod_argv(), "run"])
    here.wait_ready()
    assert here.http("GET", "/healthz")[0] == 200
    assert here.terminate() == 0

    # $HYDROD_CONFIG wins over ./config.toml, which is made unreadable as a config.
    there = make_daemon(start=False, command=[*_hydrod_argv(), "run"])
    elsewhere = there.dir / "elsewhere.toml"
    there.config_path.rename(elsewhere)
    there.config_path.write_text("[mqtt]\nhots = 'wrong file'\n")
    there.extra_env = {"HYDROD_CONFIG": str(elsewhere)}
    there.start().wait_ready()
    assert there.http("GET", "/healthz")[0] == 200
    assert there.terminate() == 0


def test_output_read_by_a_reader_that_goes_away_ends_quietly_with_exit_0(tmp_path):
    # `hydrod check-config | head -1`: head exits after its line. Here the reader is
    # gone before hydrod writes at all, so every write meets a closed pipe.
    config = write_config(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "hydrod", "check-config", "--config", str(config)],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
