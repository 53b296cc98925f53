"""The `hydrod` command line (SPEC §5). Parsing only: the daemon lives in supervisor.py."""

from __future__ import annotations

import argparse
import csv
import faulthandler
import json
import os
import signal
import sys
import time
import urllib.parse
from pathlib import Path

import psycopg
import structlog

from . import logs, settings as settings_module, store
from .client import ApiClient, node_path
from .errors import ConfigError, HydrodError, unexpected


def main(argv: list[str] | None = None, fault_hook=None) -> int:
    """The console script. `fault_hook` is for tests that make actors fail on purpose."""
    parser = argparse.ArgumentParser(prog="hydrod", description="MQTT backbone of a hydroponics greenhouse.")
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: $HYDROD_CONFIG, else ./config.toml)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    commands.add_parser("migrate", help="apply database migrations and exit")
    commands.add_parser("check-config", help="validate the config file and print it, secrets masked")
    nodes = commands.add_parser("nodes", help="list registered nodes")
    nodes.add_argument("--json", action="store_true", help="one JSON object per node")
    push = commands.add_parser("push-config", help="push a NodeConfig (JSON file, - for stdin) to a node")
    push.add_argument("uid")
    push.add_argument("file")
    _simulate_arguments(commands.add_parser(
        "simulate", help="run virtual firmware nodes against the broker (SPEC §9)",
        description="Virtual firmware nodes, each on its own MQTT connection, until --duration "
                    "or Ctrl-C; then a summary. Broker settings come from [mqtt] unless given here."))
    history = commands.add_parser("history", help="a node's telemetry over a range, from the daemon's HTTP API")
    history.add_argument("uid")
    history.add_argument("metric", help="metric type, e.g. PH")
    history.add_argument("--channel", help="needed when the node has the metric on several channels")
    history.add_argument("--from", dest="start", metavar="T",
                         help="ISO 8601 or Unix seconds (default: a day before --to)")
    history.add_argument("--to", dest="end", metavar="T", help="ISO 8601 or Unix seconds (default: now)")
    history.add_argument("--step", default="auto", help="raw, 1m, 1h, 1d or auto (default: the finest with "
                                                        "at most 2,000 points)")
    history.add_argument("--csv", action="store_true", help="CSV with a header, instead of a table")
    command = commands.add_parser("command", help="send a node a signed command and wait for its final state "
                                                  "(exit 0 only on DONE)")
    command.add_argument("uid")
    command.add_argument("channel")
    command.add_argument("cmd")
    command.add_argument("params", nargs="?", default="{}", help="a JSON object (default {})")
    command.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                         help="how long to wait for a final state (default: commands.default_ttl_s"
                              " + commands.response_timeout_s, the longest a command can take)")
    command.add_argument("--cmd-id", default=None, help="the command's id (default: generated); the same id "
                                                        "again does not make a second command")
    command.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                         help="how long it may wait to be sent (default: commands.default_ttl_s)")
    for sub in commands.choices.values():
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    logs.configure()  # JSON from the first line, a config error included
    try:
        config = _load(args)
        logs.configure(config.logging.level, config.logging.format)
        if args.command == "run":
            return run(config, args, fault_hook)
        code = COMMANDS[args.command](config, args)
        sys.stdout.flush()  # inside the try: a reader that went away is met here
        return code
    except BrokenPipeError:
        # The reader of our output went away (`hydrod nodes | head`): nothing went
        # wrong. Point stdout at /dev/null so that the exit's own flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except HydrodError as exc:
        _fatal(str(exc), exc.exit_code, exc.__cause__)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line each, never a bare traceback
        _fatal(f"unexpected error: {type(exc).__name__}: {exc}", UNEXPECTED, exc)
        return UNEXPECTED


UNEXPECTED = 1  # the exit code of an unexpected exception, as of any other fatal error


def _fatal(error: str, code: int, cause: BaseException | None = None) -> None:
    """One clear line, on stdout as JSON for the journal and on stderr for a person.

    The traceback of an unexpected cause goes in the JSON line's `exception` field."""
    structlog.get_logger("hydrod").bind(actor="daemon").error(
        "daemon_failed", error=error, exit_code=code, exc_info=unexpected(cause))
    print(f"hydrod: {error}", file=sys.stderr)


def run(config, args, fault_hook=None) -> int:
    from .supervisor import Daemon

    daemon = Daemon(config, fault_hook=fault_hook)
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop("SIGINT"))
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # dump thread tracebacks
    try:
        daemon.start()
    except Exception:
        daemon.shutdown()
        raise
    daemon.wait()
    daemon.shutdown()
    if daemon.failure is not None:
        raise daemon.failure
    return 0


def _load(args):
    """The config; `hydrod simulate` also runs where there is no ./config.toml (defaults)."""
    if args.command == "simulate" and args.config is None and not settings_module.default_path().exists():
        return settings_module.from_dict({}, environ=os.environ)
    return settings_module.load(args.config)


def _simulate_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    sub.add_argument("--rate", type=float, default=1.0, help="telemetry messages a second, all nodes together (default 1)")
    sub.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    sub.add_argument("--mqtt-host", default=None, help="broker host (default: [mqtt] host)")
    sub.add_argument("--mqtt-port", type=int, default=None, help="broker port (default: [mqtt] port)")
    sub.add_argument("--prefix", default="esp32-sim", help="hardware ids are PREFIX-0001, PREFIX-0002, ... (default esp32-sim)")
    sub.add_argument("--heartbeat", type=float, default=15.0, help="seconds between a node's heartbeats (default 15)")
    sub.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def simulate(config, args) -> int:
    from .simulate import Options, Simulator, format_summary, options_error

    m = config.mqtt
    options = Options(nodes=args.nodes, rate=args.rate, duration=args.duration,
                      host=args.mqtt_host or m.host, port=args.mqtt_port or m.port,
                      username=m.username, password=m.password.get_secret_value(), tls=m.tls, ca_file=m.ca_file,
                      keepalive=m.keepalive, prefix=args.prefix, heartbeat_s=args.heartbeat)
    if problem := options_error(options):
        raise ConfigError(f"hydrod simulate: {problem}")
    simulator = Simulator(options)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: simulator.stop())
    summary = simulator.run()
    print(json.dumps(summary) if args.json else format_summary(summary, options))
    if not summary["connected"]:
        raise HydrodError(f"no node could connect to the broker at {options.host}:{options.port}")
    return 0


def migrate(config, args) -> int:
    from .supervisor import Daemon

    Daemon(config).migrate()
    return 0


def check_config(config, args) -> int:
    print(json.dumps(settings_module.masked(config), indent=2))
    return 0


def nodes(config, args) -> int:
    try:
        with store.connect(config.database.dsn.get_secret_value()) as conn:
            rows = store.list_nodes(conn)
    except psycopg.errors.UndefinedTable:
        raise HydrodError("the database has no hydrod schema yet: run `hydrod migrate` first") from None
    except psycopg.Error as exc:
        from .errors import DatabaseUnavailable
        raise DatabaseUnavailable(f"cannot read nodes: {store.error_line(exc)}") from None
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    _table(("uid", "hardware_id", "type", "status", "lifecycle_state", "gh_uid", "zone_uid", "last_seen_at"), rows)
    print(f"{len(rows)} node(s)")
    return 0


def _table(columns: tuple[str, ...], rows: list[dict]) -> None:
    table = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())


def _cell(value) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return value.isoformat(timespec="seconds")
    return str(value)


def push_config(config, args) -> int:
    """Ask the running daemon to push: it owns the broker link and the push history."""
    raw = sys.stdin.buffer.read() if args.file == "-" else _read(Path(args.file))
    api = ApiClient(config.http, "push-config")
    print(api.request("POST", node_path(args.uid, "config"), body=raw, refused="push refused").decode())
    return 0


POINT_FIELDS = ("ts", "avg", "min", "max", "count")


def history(config, args) -> int:
    """Through the daemon's API, which owns the choice of table (SPEC §8)."""
    params = {"metric": args.metric, "step": args.step, "channel": args.channel, "from": args.start, "to": args.end}
    answer = ApiClient(config.http, "history").get_json(
        node_path(args.uid, "telemetry"), {k: v for k, v in params.items() if v is not None},
        refused="history refused")
    if args.csv:
        out = csv.DictWriter(sys.stdout, POINT_FIELDS, extrasaction="ignore", lineterminator="\n")
        out.writeheader()
        out.writerows(answer["points"])
        return 0
    _table(POINT_FIELDS, answer["points"])
    print(f"{len(answer['points'])} point(s), {args.metric} on channel {answer['channel'] or '-'}, "
          f"step {answer['step']}, {answer['from']} to {answer['to']}")
    return 0


FINAL_STATES = ("DONE", "NO_EFFECT", "ERROR", "INVALID", "BUSY", "TIMEOUT", "EXPIRED")


def command(config, args) -> int:
    """Ask the running daemon to send a command; wait for its final state and print it."""
    try:
        params = json.loads(args.params)
    except ValueError as exc:
        raise HydrodError(f"PARAMS_JSON is not JSON: {exc}") from None
    body = {"channel": args.channel, "cmd": args.cmd, "params": params}
    if args.cmd_id is not None:
        body["cmd_id"] = args.cmd_id
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    api = ApiClient(config.http, "command")
    made = json.loads(api.request("POST", node_path(args.uid, "commands"), body=json.dumps(body).encode(),
                                  refused="command refused"))
    wait = args.wait if args.wait is not None else config.commands.default_ttl_s + config.commands.response_timeout_s
    deadline = time.monotonic() + wait
    path = "/api/commands/" + urllib.parse.quote(made["cmd_id"], safe="")
    state = made
    while state["status"] not in FINAL_STATES and time.monotonic() < deadline:
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))  # polling the API: nothing to wait on
        state = api.get_json(path)
    print(json.dumps(state, indent=2))
    if state["status"] == "DONE":
        return 0
    if state["status"] not in FINAL_STATES:
        raise HydrodError(f"command {made['cmd_id']} is still {state['status']} after {wait:g} s")
    raise HydrodError(f"command {made['cmd_id']} ended {state['status']}"
                      + (f" ({state['error_code']})" if state.get("error_code") else ""))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise HydrodError(f"{path}: cannot read: {exc.strerror}") from None


COMMANDS = {"run": run, "migrate": migrate, "check-config": check_config, "nodes": nodes,
            "push-config": push_config, "simulate": simulate, "history": history, "command": command}
