"""hydrod benchmark: one command, one JSON line per scenario on stdout.

    .venv/bin/python bench/run.py                      # every scenario, default sizes
    .venv/bin/python bench/run.py --messages 10000 --live-seconds 5 drain live

Each scenario starts its own Mosquitto (free port, persistence on, private
directory) and its own database on the local PostgreSQL, runs hydrod as a
subprocess with a config derived from the checkout's config.toml, and tears
everything down afterwards. Progress goes to stderr; results go to stdout and
to bench/results/<utc time>.jsonl. See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from datetime import UTC, datetime
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness import Daemon, Mosquitto, PgServer, free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TELEMETRY_FILTER = "hydro/+/+/+/+/telemetry"
GH, ZONE, CHANNEL = "gh-1", "zn-1", "ph"
MB = 1024 * 1024

TARGETS = {
    "drain": "rate_per_s >= 10000 and ratio >= 0.2 and peak_rss_mb <= 150",
    "live": "ratio (p99 during the hello burst / p99 without it) <= 2 and ratio_to_before <= 2, "
            "before_steady, no telemetry or hello lost, rate >= 0.95 of --live-rate, peak_rss_mb <= 150",
    "live_steady": "p99_ms <= 100 at 1000 msg/s, lost == 0, peak_rss_mb <= 150",
    "startup": "none set",
    "hello_burst": "peak_rss_mb <= 150",
    "refused": "every phase drains at least half as fast as the valid one",
    "history_query": "step=auto for 30 days p50 <= 50 ms, step=raw for one day p50 <= 200 ms",
    "commands": "every command DONE, received once by its node, none refused (no latency target set)",
    "prune": "30 days of raw samples dropped in < 1 s, the writer never seen waiting on a lock meanwhile",
}


def say(*parts: Any) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- environment --

@dataclass(frozen=True)
class Code:
    """The hydrod a scenario runs: the checkout's (its .venv's editable install), or a
    reference commit's, installed into a directory put first on the PYTHONPATH."""

    label: str  # "checkout" or "reference"
    root: Path  # the source tree: its config.toml gives the daemon's keys
    commit: str | None
    env: dict[str, str] = field(default_factory=dict)


def git(*argv: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    return done.stdout.rstrip("\n") if done.returncode == 0 else ""


@contextmanager
def reference_code(commit: str) -> Iterator[Code]:
    """COMMIT's hydrod, without touching the repository: `git archive` exports its
    tree to a temporary directory, and this venv's pip builds and installs it there
    (`--target`, no dependencies: the venv's are used). hydrod runs as `python -m
    hydrod` with that directory first on PYTHONPATH, ahead of the editable install of
    the checkout, which Python finds only through site-packages. Removed afterwards."""
    sha = git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if not sha:
        raise SystemExit(f"bench: --reference {commit}: not a commit of {ROOT}")
    tmp = Path(tempfile.mkdtemp(prefix="hydrod-bench-ref-"))
    try:
        src, site = tmp / "src", tmp / "site"
        src.mkdir()
        archive = subprocess.Popen(["git", "archive", sha], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True, timeout=120)
        if archive.wait(60) != 0:
            raise RuntimeError(f"git archive {sha} failed")
        say(f"reference: installing {sha[:7]} into {site} ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
                       check=True, timeout=600, stdout=subprocess.DEVNULL)
        code = Code("reference", src, sha[:7], {"PYTHONPATH": str(site)})
        # The daemon must import the reference, not the checkout: check, do not assume.
        where = subprocess.run([sys.executable, "-c", "import hydrod; print(hydrod.__file__)"],
                               cwd=tmp, env={**os.environ, **code.env}, capture_output=True, text=True,
                               check=True, timeout=60).stdout.strip()
        if not Path(where).resolve().is_relative_to(site.resolve()):
            raise RuntimeError(f"reference: hydrod imports from {where}, not from {site}")
        yield code
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkout_code() -> Code:
    return Code("checkout", ROOT, git("rev-parse", "--short", "HEAD") or None)


class Bench:
    """One scenario's private broker, database and scratch directory."""

    def __init__(self, pg: PgServer, name: str, keep: bool = False, code: Code | None = None) -> None:
        self.pg = pg
        self.name = name
        self.keep = keep
        self.code = code or checkout_code()
        self.dir = Path(tempfile.mkdtemp(prefix=f"hydrod-bench-{name}-"))
        # autosave 60 s as in deploy/mosquitto.conf: a 1 s autosave would rewrite a
        # 100k-message store every second and bill the broker's CPU to the drain.
        self.broker = Mosquitto(self.dir / "broker", autosave_interval=60, extra_config="set_tcp_nodelay true\n")
        self.db = f"hydrod_bench_{name}_{secrets.token_hex(4)}"
        self.dsn = pg.dsn(self.db)
        self._daemons: list[Daemon] = []
        self.cleanups: list[Any] = []  # called on exit, before the daemons are cleaned up

    def __enter__(self) -> Bench:
        with psycopg.connect(self.pg.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for cleanup in self.cleanups:
            cleanup()
        for daemon in self._daemons:
            daemon.cleanup()
        self.broker.stop()
        with psycopg.connect(self.pg.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        if self.keep:
            say(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def daemon(self, tag: str = "hydrod", client_id: str | None = None) -> Daemon:
        """hydrod with config.toml's keys, pointed at this broker and database."""
        sections = tomllib.loads((self.code.root / "config.toml").read_text())
        sections["mqtt"].update(host="127.0.0.1", port=self.broker.port,
                                client_id=client_id or f"hydrod-bench-{secrets.token_hex(4)}")
        sections["database"]["dsn"] = self.dsn
        sections["http"].update(host="127.0.0.1", port=free_port())
        sections["logging"].update(level="info", format="json")
        daemon = Daemon(self.dir / tag, self.broker.port, self.dsn, sections=sections, env=self.code.env,
                        known_sections=sections)
        self._daemons.append(daemon)
        return daemon

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, application_name="hydrod-bench")

    def daemon_backend_cpu(self, conn: psycopg.Connection) -> float | None:
        """CPU seconds of the PostgreSQL backends serving hydrod (this host's server
        only: read from /proc), i.e. everything on this database but the bench's own."""
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name <> 'hydrod-bench'").fetchall()]
        try:
            return round(sum(proc_status(pid)["cpu_s"] for pid in pids), 2)
        except OSError:
            return None


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS in kB and CPU seconds (user+system) of a live process."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user+system) per native thread id of a live process."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def poll(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def batch_stats(daemon: Daemon) -> dict[str, Any]:
    """hydrod's own hydrod_batch_seconds histogram (GET /metrics), per actor."""
    try:
        status, text = daemon.http("GET", "/metrics", timeout=5)
    except OSError:
        return {}
    out: dict[str, Any] = {}
    for line in str(text).splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith("hydrod_batch_seconds" + suffix + "{"):
                actor = line.split('actor="', 1)[1].split('"', 1)[0]
                out.setdefault(actor, {})[suffix[1:]] = float(line.rsplit(" ", 1)[1])
    return {actor: {"batches": int(v.get("count", 0)), "busy_s": round(v.get("sum", 0.0), 3),
                    "mean_ms": round(1000 * v["sum"] / v["count"], 1) if v.get("count") else None}
            for actor, v in out.items()}


def percentiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [float("nan")] * 99
    return statistics.quantiles(values, n=100, method="inclusive")


def count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ---------------------------------------------------------------------- payloads --

def hello(hardware_id: str, node_type: str = "ph") -> bytes:
    return json.dumps({"message_type": "node_hello", "hardware_id": hardware_id,
                       "node_type": node_type, "fw_version": "1.0.0",
                       "capabilities": ["ph", "temperature"]}, separators=(",", ":")).encode()


def telemetry(value: float, ts: float, raw: int) -> bytes:
    """Firmware shape (tests/fixtures/firmware.jsonl)."""
    return (b'{"metric_type":"PH","value":%.2f,"ts":%s,"unit":"pH","raw":%d,"stable":false}'
            % (value, repr(ts).encode(), raw))


def telemetry_topic(uid: str) -> str:
    return f"hydro/{GH}/{ZONE}/{uid}/{CHANNEL}/telemetry"


def refused_message(uid: str, i: int, ts: float) -> tuple[str, bytes]:
    """Valid JSON of the right shape that PostgreSQL refuses when it reaches it
    (issue 7): an rssi beyond `integer`, a free_heap beyond `bigint`, or
    metadata beyond jsonb's `numeric`."""
    match i % 3:
        case 0:
            return (f"hydro/{GH}/{ZONE}/{uid}/heartbeat",
                    b'{"uptime":%d,"free_heap":102000,"rssi":3000000000,"fw_version":"1.0.0"}' % i)
        case 1:
            return (f"hydro/{GH}/{ZONE}/{uid}/heartbeat",
                    b'{"uptime":%d,"free_heap":18446744073709551615,"rssi":-62,"fw_version":"1.0.0"}' % i)
        case _:
            return (telemetry_topic(uid),
                    b'{"metric_type":"PH","value":5.86,"ts":%s,"unit":"pH","note":1e1000000}' % repr(ts).encode())


# ------------------------------------------------------------------------ publisher --

class Publisher:
    """A paho QoS 1 publisher that counts PUBACKs: up to `inflight` on the wire and
    at most `window` unacknowledged in all (paho's packet ids are 16-bit)."""

    def __init__(self, port: int, inflight: int = 1000, window: int = 20000) -> None:
        self.window = window
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-pub-{secrets.token_hex(4)}", protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self.sent = 0
        self.acked = 0
        self._cond = threading.Condition()
        self.client.on_publish = self._on_publish
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("publisher: no CONNACK")

    def _on_publish(self, *_: Any) -> None:
        with self._cond:
            self.acked += 1
            if self.acked >= self.sent or self.sent - self.acked == self.window - 1:
                self._cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        with self._cond:
            while self.sent - self.acked >= self.window:
                if not self._cond.wait(30):
                    raise TimeoutError(f"publisher: {self.sent - self.acked} PUBACKs outstanding for 30 s")
            self.sent += 1
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")

    def wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.acked < self.sent:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    if self.acked < self.sent:
                        raise TimeoutError(f"{self.sent - self.acked} of {self.sent} PUBACKs missing")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class PahoDrain:
    """The MQTT library's own ceiling: a bare paho MQTT 5 client with hydrod's session
    settings (clean start off, session expiry, Receive Maximum 20000, manual acks)
    that acknowledges each message in on_message and does nothing else."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client_id = f"bench-paho-{secrets.token_hex(4)}"

    def _client(self) -> mqtt.Client:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 604800
        props.ReceiveMaximum = 20000
        client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        return client

    def create_session(self) -> None:
        client = self._client()
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_connect = lambda c, *_: c.subscribe(TELEMETRY_FILTER, qos=1)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("paho reference: no SUBACK")
        client.disconnect()
        client.loop_stop()

    def drain(self, n: int, timeout: float) -> float:
        """Seconds from connect until n messages were received and acknowledged."""
        got = 0
        done = threading.Event()

        def on_message(client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            nonlocal got
            client.ack(msg.mid, msg.qos)
            got += 1
            if got >= n:
                done.set()
        t0 = time.monotonic()
        client = self._client()
        client.on_message = on_message
        client.loop_start()
        finished = done.wait(timeout)
        seconds = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
        if not finished:
            raise TimeoutError(f"paho reference: {got} of {n} messages")
        return seconds


def register_nodes(bench: Bench, conn: psycopg.Connection, n: int, prefix: str = "b") -> list[str]:
    """Publish n node_hello (ph nodes) to a running hydrod; return their uids."""
    pub = Publisher(bench.broker.port)
    hardware_ids = [f"esp32-{prefix}{i:011x}" for i in range(n)]
    for hw in hardware_ids:
        pub.publish("hydro/node_hello", hello(hw))
    pub.wait_acked(30)
    pub.close()
    poll(lambda: count(conn, "nodes") >= n, 60, f"{n} nodes registered")
    rows = conn.execute("SELECT uid FROM nodes WHERE hardware_id = ANY(%s) ORDER BY hardware_id",
                        (hardware_ids,)).fetchall()
    return [r[0] for r in rows]


# ------------------------------------------------------------------------- profiler --

def start_profiler(daemon: Daemon, path: Path) -> tuple[subprocess.Popen, Path]:
    """py-spy on a freshly started hydrod (attached once it logs its first line)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    poll(lambda: daemon.lines or not daemon.running, 30, "hydrod's first log line", 0.005)
    proc = subprocess.Popen([spy, "record", "--pid", str(daemon.pid), "--format", "raw", "--function",
                             "--threads", "--gil", "--rate", "250", "--nonblocking", "-o", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, path


def stop_profiler(profiler: tuple[subprocess.Popen, Path], cpu_by_thread: dict[int, float],
                  top: int = 15) -> dict[str, Any]:
    """Stop py-spy; summarise its folded stacks (samples of the thread holding the
    GIL): own time (leaf frame) per function and samples per thread, as shares of
    all samples; plus each named thread's CPU seconds from /proc."""
    proc, path = profiler
    proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if not path.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    own: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "?")
        leaf = frames[-1]
        total += samples
        own[leaf] = own.get(leaf, 0) + samples
        threads[thread] = threads.get(thread, 0) + samples
    share = lambda d: [[k, round(100 * v / total, 1)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])]
    names = {}
    for label in threads:  # "thread (1234): MqttIo-5"
        tid, _, name = label.removeprefix("thread (").partition("): ")
        if tid.isdigit():
            names[int(tid)] = name
    cpu = {names.get(tid, str(tid)): round(seconds, 2)
           for tid, seconds in sorted(cpu_by_thread.items(), key=lambda kv: -kv[1]) if seconds >= 0.05}
    return {"samples": total, "file": str(path), "gil_own_pct": share(own)[:top],
            "gil_thread_pct": share(threads)[:8], "thread_cpu_s": cpu}


# ----------------------------------------------------------------------- scenarios --

def scenario_drain(pg: PgServer, args: argparse.Namespace, code: Code | None = None) -> dict[str, Any]:
    n, nodes = args.messages, args.nodes
    with Bench(pg, "drain", args.keep, code) as bench, bench.connect() as conn:
        client_id = f"hydrod-bench-{secrets.token_hex(4)}"
        daemon = bench.daemon("hydrod-1", client_id)
        daemon.start()
        daemon.wait_ready(60)
        uids = register_nodes(bench, conn, nodes)
        rc = daemon.terminate()
        if rc != 0:
            raise RuntimeError(f"hydrod exited {rc} on SIGTERM:\n{daemon.tail()}")
        say(f"drain: {nodes} nodes registered; hydrod stopped, its session stays in the broker")

        # The reference's persistent session, created before publishing: the broker
        # queues the same messages for both.
        ref_id = f"bench-ref-{secrets.token_hex(4)}"
        ref_argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(bench.broker.port), "-V", "mqttv5",
                    "-c", "-i", ref_id, "-x", "604800", "-q", "1", "-t", TELEMETRY_FILTER,
                    "-D", "connect", "receive-maximum", str(20000)]
        subprocess.run([*ref_argv, "-E"], check=True, timeout=30)
        paho_ref = PahoDrain(bench.broker.port)
        paho_ref.create_session()

        per_node = -(-n // nodes)
        base = int(time.time()) - per_node - 600  # every ts in the past, distinct per node
        say(f"drain: publishing {n} telemetry messages at QoS 1 ...")
        started = time.perf_counter()
        pub = Publisher(bench.broker.port)
        for i in range(n):
            node, k = i % nodes, i // nodes
            pub.publish(telemetry_topic(uids[node]), telemetry(5.0 + (i % 300) / 100, base + k, 1000 + i % 1000))
        pub.wait_acked(600)
        pub.close()
        say(f"drain: broker holds {n} messages for each session "
            f"(published at {n / (time.perf_counter() - started):.0f} msg/s)")

        # hydrod drains its queue.
        daemon = bench.daemon("hydrod-2", client_id)
        t0 = time.monotonic()
        daemon.start()
        profiler = start_profiler(daemon, args.profile) if args.profile else None
        first_row = None
        rss_peak = 0
        last = 0
        deadline = time.monotonic() + max(120.0, n / 500)
        while True:
            stored = count(conn, "telemetry_samples")
            if stored and first_row is None:
                first_row = time.monotonic() - t0
            if stored >= n:
                break
            if not daemon.running:
                raise RuntimeError(f"hydrod exited during the drain:\n{daemon.tail()}")
            if time.monotonic() > deadline:
                break
            rss_peak = max(rss_peak, proc_status(daemon.pid)["VmRSS"])
            if stored - last >= n // 10:
                say(f"drain: {stored} rows after {time.monotonic() - t0:.1f}s")
                last = stored
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        status = proc_status(daemon.pid)
        cpu_by_thread = thread_cpu(daemon.pid)
        db_cpu = bench.daemon_backend_cpu(conn)
        profile = stop_profiler(profiler, cpu_by_thread) if profiler else None
        batches = batch_stats(daemon)
        stored = count(conn, "telemetry_samples")
        dead = count(conn, "dead_letters")
        rc = daemon.terminate()

        # Reference: mosquitto_sub | psql COPY over the same queued messages.
        conn.execute("CREATE TABLE ref_raw (payload jsonb)")
        say("drain: reference mosquitto_sub | psql COPY ...")
        r0 = time.monotonic()
        sub = subprocess.Popen([*ref_argv, "-F", "%p", "-C", str(n)], stdout=subprocess.PIPE)
        psql = subprocess.Popen(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", bench.dsn, "-c",
             r"COPY ref_raw (payload) FROM STDIN (FORMAT csv, QUOTE e'\x01', DELIMITER e'\x02')"],
            stdin=sub.stdout, stdout=subprocess.DEVNULL)
        sub.stdout.close()
        psql_rc = psql.wait(600)
        ref_seconds = time.monotonic() - r0
        sub.wait(30)
        ref_rows = count(conn, "ref_raw")
        if psql_rc != 0 or ref_rows != n:
            raise RuntimeError(f"reference failed: psql exited {psql_rc}, {ref_rows} of {n} rows")
        say("drain: paho MQTT 5 receive-and-ack only ...")
        paho_seconds = paho_ref.drain(n, max(120.0, n / 500))

        rate = n / seconds if stored >= n else stored / seconds
        ref_rate = n / ref_seconds
        result = {
            "scenario": "drain", "messages": n, "nodes": nodes,
            "seconds": round(seconds, 3), "rate_per_s": round(rate),
            "reference_rate_per_s": round(ref_rate), "reference_seconds": round(ref_seconds, 3),
            "ratio": round(rate / ref_rate, 3),
            "paho_v5_receive_only_rate_per_s": round(n / paho_seconds),
            "ratio_to_paho": round(rate / (n / paho_seconds), 3),
            "p50_ms": None, "p99_ms": None,
            "peak_rss_mb": round(max(status["VmHWM"], rss_peak) / 1024, 1),
            "lost": n - stored, "dead_letters": dead, "stored": stored,
            # start-up excluded: from the first committed row seen (50 ms polls) to the last
            "first_row_s": None if first_row is None else round(first_row, 3),
            "rate_after_first_row_per_s": (round(stored / (seconds - first_row))
                                           if first_row is not None and seconds > first_row else None),
            "daemon_cpu_s": round(status["cpu_s"], 2), "exit_code": rc,
            "write_batches": batches, "db_backend_cpu_s": db_cpu,
            **({"profile": profile} if profile else {}),
            "target": TARGETS["drain"],
            "target_met": bool(rate >= 10000 and rate / ref_rate >= 0.2
                               and status["VmHWM"] / 1024 <= 150 and stored == n),
        }
        return result


def burst_publisher(port: int, messages: list[tuple[str, bytes]], pipe: Any) -> None:
    """In a process of its own (its own GIL, so the steady publisher keeps its
    schedule): connect, say "ready", wait for "go", publish every message as fast
    as paho goes, and send back the wall-clock times of the first and the last
    publish and of the last PUBACK."""
    pub = Publisher(port)
    pipe.send("ready")
    if pipe.recv() != "go":
        pub.close()
        return
    first = time.time()
    for topic, payload in messages:
        pub.publish(topic, payload)
    last = time.time()
    pub.wait_acked(120)
    pipe.send((first, last, time.time()))
    pub.close()


def window_stats(lat: list[float], span: float | None) -> dict[str, Any]:
    """Latency percentiles of one window, and the rate its messages were published at."""
    if not lat:
        return {"messages": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "publish_rate_per_s": None}
    values = sorted(lat)
    q = percentiles(values)
    return {"messages": len(values), "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1),
            "max_ms": round(values[-1], 1),
            "publish_rate_per_s": round(len(values) / span, 1) if span else None}


def scenario_live(pg: PgServer, args: argparse.Namespace, reference: float | None,
                  code: Code | None = None) -> dict[str, Any]:
    """A steady `--live-rate` of telemetry from `--nodes` bound nodes for
    `--live-seconds`, and in the middle a burst of `--burst-hellos` node_hello
    from new hardware ids on the temp namespace (issue 8): telemetry latency
    during the burst against before and after it, in the same run."""
    rate, duration, nodes, hellos = args.live_rate, args.live_seconds, args.nodes, args.burst_hellos
    planned = int(rate * duration)
    # With a burst, the load goes on until half of --live-seconds has passed since every
    # burst node was registered (so there is an after window), up to 3x --live-seconds.
    cap = 3 * planned if hellos else planned
    with Bench(pg, "live", args.keep, code) as bench, bench.connect() as conn:
        daemon = bench.daemon()
        daemon.start()
        daemon.wait_ready(60)
        uids = register_nodes(bench, conn, nodes)
        profiler = (start_profiler(daemon, args.profile.with_name(args.profile.name + ".live"))
                    if args.profile else None)

        burst_proc = burst_pipe = None
        if hellos:
            # New hardware ids, each saying hello from the temp namespace as firmware does
            # (tests/fixtures/firmware.jsonl): hydro/gh-temp/zn-temp/<hardware id>/node_hello.
            seed = secrets.randbits(40) << 4
            hardware_ids = [f"esp32-{(seed + i) % (1 << 48):012x}" for i in range(hellos)]
            messages = [(f"hydro/gh-temp/zn-temp/{hw}/node_hello", hello(hw)) for hw in hardware_ids]
            ctx = multiprocessing.get_context("spawn")
            burst_pipe, child_end = ctx.Pipe()
            burst_proc = ctx.Process(target=burst_publisher, args=(bench.broker.port, messages, child_end),
                                     name="bench-burst", daemon=True)
            burst_proc.start()
            bench.cleanups.append(lambda: burst_proc.kill() if burst_proc.is_alive() else None)
            if not burst_pipe.poll(60) or burst_pipe.recv() != "ready":
                raise RuntimeError("burst publisher did not connect")
        registered_at: list[float] = []  # when every burst node was seen in `nodes`

        # ts of message i is t0 + i ms: unique, and the key that finds its publish time.
        t0 = int(time.time()) - 120 - cap // 1000
        published: list[float] = []
        visible: dict[int, float] = {}
        received: dict[int, float] = {}  # hydrod's own received_at stamp (paho's on_message)
        stop = threading.Event()
        burst_go = threading.Event()

        def poller() -> None:
            # A row committed before this statement's snapshot was taken is visible to
            # it: commit time <= `asked`, and > the previous `asked` (it was not seen then).
            with bench.connect() as pconn:
                last_id = 0
                cur = pconn.cursor()
                while not stop.is_set():
                    asked = time.time()
                    cur.execute("SELECT id, round((extract(epoch FROM ts) - %s) * 1000)::bigint,"
                                " extract(epoch FROM received_at)::float8"
                                " FROM telemetry_samples WHERE id > %s ORDER BY id", (t0, last_id))
                    for row_id, key, received_at in cur.fetchall():
                        visible.setdefault(key, asked)
                        received[key] = received_at
                        last_id = row_id
                    time.sleep(args.poll_ms / 1000)

        def burst_watcher() -> None:
            # The same bound as the poller's: every burst node committed before `asked`.
            with bench.connect() as bconn:
                burst_go.wait()
                while not stop.is_set():
                    asked = time.time()
                    if count(bconn, "nodes") >= nodes + hellos:
                        registered_at.append(asked)
                        return
                    time.sleep(args.poll_ms / 1000)

        watcher = threading.Thread(target=poller, daemon=True)
        watcher.start()
        counter = threading.Thread(target=burst_watcher, daemon=True)
        if hellos:
            counter.start()
        pub = Publisher(bench.broker.port)
        burst_at = planned // 2
        say(f"live: {rate} msg/s for {duration}s ({planned} messages)"
            + (f", {hellos} node_hello after {burst_at / rate:.1f}s" if hellos else "") + " ...")
        start = time.perf_counter() + 0.05
        wall_start = time.time() + 0.05
        late_ms: list[float] = []  # how late the publisher was on its schedule, per message
        i = 0
        while i < planned or (i < cap and not (registered_at and time.time() - registered_at[0] >= duration / 2)):
            if i == burst_at and burst_pipe is not None:
                burst_go.set()
                burst_pipe.send("go")
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            late_ms.append((time.perf_counter() - due) * 1000)
            published.append(time.time())
            pub.publish(telemetry_topic(uids[i % nodes]), telemetry(6.0 + (i % 200) / 100, t0 + i / 1000, i % 4096))
            i += 1
        total = len(published)
        achieved = total / (published[-1] - published[0]) if total > 1 else float(total)
        pub.wait_acked(60)
        pub.close()
        burst_times = None
        if burst_pipe is not None:
            if burst_pipe.poll(120):
                burst_times = burst_pipe.recv()
            burst_proc.join(30)
        try:
            poll(lambda: len(visible) >= total, 60, "every live message visible", 0.05)
        except TimeoutError:
            pass
        if hellos:
            counter.join(max(5.0, hellos / 20))
        stop.set()
        watcher.join(5)
        status = proc_status(daemon.pid)
        batches = batch_stats(daemon)
        db_cpu = bench.daemon_backend_cpu(conn)
        profile = stop_profiler(profiler, thread_cpu(daemon.pid)) if profiler else None
        stored = count(conn, "telemetry_samples")
        dead = count(conn, "dead_letters")
        burst_nodes = count(conn, "nodes") - nodes
        daemon.terminate()

        seen = [i for i in range(total) if i in visible]
        latency = {i: (visible[i] - published[i]) * 1000 for i in seen}
        lat = sorted(latency.values())
        q = percentiles(lat)
        # The two legs, split at hydrod's received_at: publisher -> broker -> hydrod's
        # paho thread, and hydrod's queueing + batching + commit.
        q_in = percentiles(sorted((received[i] - published[i]) * 1000 for i in seen))
        q_store = percentiles(sorted((visible[i] - received[i]) * 1000 for i in seen))
        if os.environ.get("BENCH_DUMP_LIVE"):
            with open(os.environ["BENCH_DUMP_LIVE"], "w") as f:
                f.write("i,published,received_at,visible\n")
                for i in seen:
                    f.write(f"{i},{published[i]:.6f},{received[i]:.6f},{visible[i]:.6f}\n")
        late = percentiles(sorted(late_ms))
        result = {
            "scenario": "live", "messages": total, "planned_messages": planned, "nodes": nodes,
            "seconds": round(published[-1] - wall_start, 3), "rate_per_s": round(achieved, 1),
            "target_rate_per_s": rate,
            # how far behind its schedule the bench's own publisher was (sleep overshoot included)
            "publish_late_p50_ms": round(late[49], 1), "publish_late_p99_ms": round(late[98], 1),
            "publish_late_max_ms": round(max(late_ms), 1) if late_ms else None,
            "reference_rate_per_s": None if reference is None else round(reference),
            "reference_note": "no latency reference; this is the drain reference's throughput "
                              "(mosquitto_sub | psql COPY)" if reference else
                              "no latency reference; run drain in the same invocation for its throughput",
            "ratio": None,
            "p50_ms": round(q[49], 1), "p90_ms": round(q[89], 1), "p99_ms": round(q[98], 1),
            "max_ms": round(lat[-1], 1) if lat else None,
            "receive_leg_p50_ms": round(q_in[49], 1), "receive_leg_p99_ms": round(q_in[98], 1),
            "store_leg_p50_ms": round(q_store[49], 1), "store_leg_p99_ms": round(q_store[98], 1),
            "latency_resolution_ms": args.poll_ms,
            "peak_rss_mb": round(status["VmHWM"] / 1024, 1),
            "lost": total - stored, "dead_letters": dead, "unattributed": total - len(lat),
            "daemon_cpu_s": round(status["cpu_s"], 2), "write_batches": batches,
            "db_backend_cpu_s": db_cpu,
        }
        met = bool(lat and stored == total and status["VmHWM"] / 1024 <= 150 and achieved >= 0.95 * rate)
        if hellos:
            first, last, acked = burst_times or (None, None, None)
            done = registered_at[0] if registered_at else None
            end = published[-1]
            # Windows by publish time: before the first hello; from it until every burst
            # node is committed (to the end if that never happened); after that.
            during_from, during_to = first or end, done or end
            windows_lat: dict[str, list[float]] = {"before": [], "during": [], "after": []}
            for i in seen:
                at = published[i]
                name = "before" if at < during_from else "during" if at <= during_to else "after"
                windows_lat[name].append(latency[i])
            spans = {"before": during_from - wall_start, "during": during_to - during_from,
                     "after": end - during_to}
            windows = {name: window_stats(values, spans[name]) for name, values in windows_lat.items()}
            windows["without"] = window_stats(windows_lat["before"] + windows_lat["after"], None)
            during, without = windows["during"]["p99_ms"], windows["without"]["p99_ms"]
            ratio = round(during / without, 2) if during is not None and without else None
            # A ratio means something only if hydrod kept up with the steady load before the
            # burst: with a growing backlog, latency climbs with time and any later window
            # looks worse. Kept up: the second half of the before window has a median at
            # most 2x the first half's + 100 ms (a shared host's stalls move medians of a
            # few seconds by that much; a backlog grows by seconds).
            half = len(windows_lat["before"]) // 2
            p50_first = statistics.median(windows_lat["before"][:half]) if half else None
            p50_second = statistics.median(windows_lat["before"][half:]) if half else None
            steady = bool(half and p50_second <= 2 * p50_first + 100)
            # The after window starts when the last burst node is committed; if hydrod was
            # left with a backlog, it carries it, raises `without` and flatters `ratio`.
            before_p50, after_p50 = windows["before"]["p50_ms"], windows["after"]["p50_ms"]
            recovered = bool(before_p50 is not None and after_p50 is not None
                             and after_p50 <= 2 * before_p50 + 100)
            to_before = (round(during / windows["before"]["p99_ms"], 2)
                         if during is not None and windows["before"]["p99_ms"] else None)
            if not steady:
                note = ("NOT MEANINGFUL: hydrod fell behind the steady load before the burst "
                        "(before_steady false), so latency grows with time in every window")
            elif not recovered:
                note = ("the after window still carries what the burst left behind (after_recovered "
                        "false): read ratio_to_before")
            else:
                note = "telemetry p99 during the hello burst / p99 before and after it (issue 8: <= 2)"
            result.update({
                "ratio": ratio,
                "ratio_note": note,
                # the same against the before window alone
                "ratio_to_before": to_before,
                "before_steady": steady,
                "after_recovered": recovered,
                "before_halves_p50_ms": [None if p50_first is None else round(p50_first, 1),
                                         None if p50_second is None else round(p50_second, 1)],
                "windows": windows,
                "burst": {
                    "hellos": hellos, "topic": "hydro/gh-temp/zn-temp/<hardware id>/node_hello",
                    "registered": burst_nodes, "lost": hellos - burst_nodes,
                    "started_after_s": round(first - wall_start, 3) if first else None,
                    "publish_s": round(last - first, 3) if first else None,
                    "acked_s": round(acked - first, 3) if first else None,
                    # first hello published -> every burst node committed (an upper bound by one poll)
                    "drain_s": round(done - first, 3) if done and first else None,
                    "rate_per_s": round(hellos / (done - first), 1) if done and first else None,
                },
            })
            met = bool(met and steady and ratio is not None and ratio <= 2 and to_before is not None
                       and to_before <= 2 and burst_nodes == hellos)
        result.update({
            **({"profile": profile} if profile else {}),
            "target": TARGETS["live"] if hellos else TARGETS["live_steady"],
            "target_met": bool(met and q[98] <= 100) if not hellos else met,
        })
        return result


def scenario_refused(pg: PgServer, args: argparse.Namespace, code: Code | None = None) -> dict[str, Any]:
    """Four backlogs of `--refused-messages` each, drained by a fresh hydrod in
    turn: valid telemetry, messages PostgreSQL would refuse, valid telemetry with
    1 % of those mixed in, and valid telemetry with 1 % that a CHECK constraint
    refuses. Each rate is from spawn until every message is accounted for (a
    sample, or a dead letter)."""
    n, nodes = args.refused_messages, args.nodes
    with Bench(pg, "refused", args.keep, code) as bench, bench.connect() as conn:
        client_id = f"hydrod-bench-{secrets.token_hex(4)}"
        daemon = bench.daemon("hydrod-0", client_id)
        daemon.start()
        daemon.wait_ready(60)
        uids = register_nodes(bench, conn, nodes)
        daemon.terminate()
        base = int(time.time()) - 3 * n - 600

        def settled() -> int:
            return count(conn, "telemetry_samples") + count(conn, "dead_letters")

        def reasons() -> dict[str, int]:
            return dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall())

        phases: dict[str, Any] = {}
        for phase, bad_every in (("valid", 0), ("refused", 1), ("mix_1pct", 100), ("constraint_1pct", 100)):
            if phase == "constraint_1pct":
                # A rule hydrod cannot check before the database: an operator's constraint.
                conn.execute("ALTER TABLE telemetry_samples"
                             " ADD CONSTRAINT bench_no_99 CHECK (value <> 99.99) NOT VALID")
            pub = Publisher(bench.broker.port)
            for i in range(n):
                uid, ts = uids[i % nodes], base + i // nodes
                if bad_every and i % bad_every == 0 and phase == "constraint_1pct":
                    pub.publish(telemetry_topic(uid), telemetry(99.99, ts, 1000))
                elif bad_every and i % bad_every == 0:
                    pub.publish(*refused_message(uid, i // bad_every, ts))
                else:
                    pub.publish(telemetry_topic(uid), telemetry(5.0 + (i % 300) / 100, ts, 1000 + i % 1000))
            pub.wait_acked(120)
            pub.close()
            base += n // nodes + 1
            before, reasons_before = settled(), reasons()
            daemon = bench.daemon(f"hydrod-{phase}", client_id)
            say(f"refused: {phase}: draining {n} messages ...")
            t0 = time.monotonic()
            daemon.start()
            first = None
            deadline = time.monotonic() + max(120.0, n / 20)
            while (done := settled() - before) < n and time.monotonic() < deadline and daemon.running:
                if done and first is None:
                    first = time.monotonic() - t0
                time.sleep(0.05)
            seconds = time.monotonic() - t0
            batches = batch_stats(daemon)
            daemon.terminate()
            by_reason = {reason: k - reasons_before.get(reason, 0) for reason, k in reasons().items()
                         if k > reasons_before.get(reason, 0)}
            phases[phase] = {
                "messages": n, "settled": done, "seconds": round(seconds, 3), "rate_per_s": round(done / seconds),
                "rate_after_first_row_per_s": (round(done / (seconds - first))
                                               if first is not None and seconds > first else None),
                "write_batches": batches, "dead_letters_by_reason": by_reason,
            }
            say(f"refused: {phase}: {done} in {seconds:.2f}s ({done / seconds:.0f} msg/s)")
    valid = phases["valid"]["rate_per_s"]
    return {
        "scenario": "refused", "messages": len(phases) * n, "nodes": nodes,
        "seconds": round(sum(p["seconds"] for p in phases.values()), 3),
        "rate_per_s": None, "reference_rate_per_s": valid, "ratio": None,
        "p50_ms": None, "p99_ms": None, "phases": phases,
        "refused_to_valid": round(phases["refused"]["rate_per_s"] / valid, 3),
        "mix_to_valid": round(phases["mix_1pct"]["rate_per_s"] / valid, 3),
        "constraint_to_valid": round(phases["constraint_1pct"]["rate_per_s"] / valid, 3),
        "lost": sum(n - p["settled"] for p in phases.values()),
        "target": TARGETS["refused"],
        "target_met": all(p["rate_per_s"] * 2 >= valid and p["settled"] == n for p in phases.values()),
    }


def scenario_startup(pg: PgServer, args: argparse.Namespace, code: Code | None = None) -> dict[str, Any]:
    runs = []
    with Bench(pg, "startup", args.keep, code) as bench:
        client_id = f"hydrod-bench-{secrets.token_hex(4)}"
        for run in range(args.startup_runs):
            daemon = bench.daemon(f"hydrod-{run}", client_id)
            t0 = time.monotonic()
            daemon.start()
            daemon.wait_ready(60)
            runs.append(time.monotonic() - t0)
            rss = proc_status(daemon.pid)["VmHWM"]
            daemon.terminate()
            say(f"startup: run {run + 1}: {runs[-1]:.3f}s" + (" (applied migrations)" if run == 0 else ""))
    return {
        "scenario": "startup", "messages": 0, "seconds": round(statistics.median(runs), 3),
        "rate_per_s": None, "reference_rate_per_s": None, "ratio": None,
        "p50_ms": None, "p99_ms": None,
        "runs_s": [round(r, 3) for r in runs], "first_run_note": "the first run applies the migrations",
        "peak_rss_mb": round(rss / 1024, 1), "lost": None,
        "target": TARGETS["startup"], "target_met": None,
    }


def scenario_hello_burst(pg: PgServer, args: argparse.Namespace, code: Code | None = None) -> dict[str, Any]:
    n = args.hellos
    with Bench(pg, "hello", args.keep, code) as bench, bench.connect() as conn:
        daemon = bench.daemon()
        daemon.start()
        daemon.wait_ready(60)
        seed = secrets.randbits(40) << 4
        payloads = [hello(f"esp32-{(seed + i) % (1 << 48):012x}") for i in range(n)]
        pub = Publisher(bench.broker.port)
        say(f"hello_burst: {n} node_hello ...")
        t0 = time.monotonic()
        for payload in payloads:
            pub.publish("hydro/node_hello", payload)
        published_s = time.monotonic() - t0
        deadline = time.monotonic() + max(120.0, n / 20)
        while (stored := count(conn, "nodes")) < n and time.monotonic() < deadline and daemon.running:
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        pub.wait_acked(60)
        pub.close()
        status = proc_status(daemon.pid)
        dead = count(conn, "dead_letters")
        daemon.terminate()
    return {
        "scenario": "hello_burst", "messages": n, "seconds": round(seconds, 3),
        "rate_per_s": round(stored / seconds, 1), "reference_rate_per_s": None, "ratio": None,
        "p50_ms": None, "p99_ms": None, "publish_calls_s": round(published_s, 3),
        "peak_rss_mb": round(status["VmHWM"] / 1024, 1), "lost": n - stored, "dead_letters": dead,
        "daemon_cpu_s": round(status["cpu_s"], 2),
        "target": TARGETS["hello_burst"],
        "target_met": bool(status["VmHWM"] / 1024 <= 150 and stored == n),
    }


# -------------------------------------------------------------------- history_query --

HISTORY_DAYS, HISTORY_EVERY_S = 30, 10  # 259,200 samples of one metric


def load_history(conn: psycopg.Connection, uid: str, end: int) -> int:
    """30 days of PH at one sample per 10 s, up to `end`, with two decimals as the
    firmware sends them (`"value":5.86`), written by SQL (the drain is
    not what is measured here), with telemetry_last, and the rollups filled by the same
    SQL as migration 005's (hydrod keeps them in its write transaction, which samples
    written with SQL do not go through)."""
    from harness import fill_rollups, make_partitions

    start = end - HISTORY_DAYS * 86400
    make_partitions(conn, datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
    conn.execute(
        "INSERT INTO telemetry_samples (node_id, channel, metric_type, value, ts, received_at)"
        " SELECT n.id, %s, 'PH', round((5.9 + 0.3 * sin(s / 3600.0) + random() * 0.05)::numeric, 2), to_timestamp(s),"
        " to_timestamp(s)"
        " FROM nodes n, generate_series(%s::bigint, %s::bigint, %s::bigint) AS s WHERE n.uid = %s",
        (CHANNEL, start + HISTORY_EVERY_S, end, HISTORY_EVERY_S, uid))
    conn.execute(
        "INSERT INTO telemetry_last (node_id, channel, metric_type, value, ts, received_at)"
        " SELECT node_id, channel, metric_type, value, ts, received_at FROM telemetry_samples"
        " ORDER BY ts DESC LIMIT 1 ON CONFLICT (node_id, channel, metric_type) DO UPDATE"
        " SET value = excluded.value, ts = excluded.ts, received_at = excluded.received_at")
    fill_rollups(conn.info.dsn)
    conn.execute("VACUUM ANALYZE")
    return count(conn, "telemetry_samples")


def time_gets(port: int, paths: list[str], token: str | None = None) -> tuple[list[float], bytes]:
    """Each GET's time from sending it to the last byte of the answer, on one kept-alive
    connection; and the last answer."""
    import http.client

    client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    times, body = [], b""
    for path in paths:
        t0 = time.perf_counter()
        client.request("GET", path, headers=headers)
        answer = client.getresponse()
        body = answer.read()
        times.append((time.perf_counter() - t0) * 1000)
        if answer.status != 200:
            raise RuntimeError(f"GET {path}: {answer.status} {body[:300]!r}")
    client.close()
    return times, body


def summary(times: list[float]) -> dict[str, float]:
    cuts = percentiles(times)
    p50, p99 = cuts[49], cuts[98]
    return {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "requests": len(times)}


def scenario_history_query(pg: PgServer, args: argparse.Namespace, code: Code | None = None) -> dict[str, Any]:
    import random
    from urllib.parse import urlencode

    with Bench(pg, "history", args.keep, code) as bench, bench.connect() as conn:
        daemon = bench.daemon()
        daemon.start()
        daemon.wait_ready(60)
        [uid] = register_nodes(bench, conn, 1, prefix="h")
        end = int(time.time()) // 3600 * 3600
        t0 = time.monotonic()
        samples = load_history(conn, uid, end)
        say(f"history_query: {samples} samples and their rollups loaded in {time.monotonic() - t0:.1f}s")
        port = daemon.config["http"]["port"]
        base = f"/api/nodes/{uid}/telemetry?"
        month = base + urlencode({"metric": "PH", "from": end - HISTORY_DAYS * 86400, "to": end, "step": "auto"})
        days = [end - (d + 1) * 86400 for d in range(HISTORY_DAYS)]
        chosen = random.Random(7).choices(days, k=args.history_raw_queries)
        raw_days = [base + urlencode({"metric": "PH", "from": day, "to": day + 86400 - 1, "step": "raw"})
                    for day in chosen]
        time_gets(port, [month] * 5 + raw_days[:3])  # warm: the pool's connections, the page cache
        # The reference, in the same run: the API's cheapest read (one row by primary key).
        reference, _ = time_gets(port, [f"/api/nodes/{uid}/telemetry/last"] * args.history_queries)
        auto, auto_body = time_gets(port, [month] * args.history_queries)
        raw, raw_body = time_gets(port, raw_days)
        # What the month would cost without rollups: the same hourly points computed from
        # the raw rows by PostgreSQL alone (no HTTP, no JSON).
        without = []
        for _ in range(3):
            t1 = time.perf_counter()
            conn.execute("SELECT date_trunc('hour', ts), avg(value), min(value), max(value), count(*)"
                         " FROM telemetry_samples WHERE ts > to_timestamp(%s) AND ts <= to_timestamp(%s)"
                         " GROUP BY 1 ORDER BY 1", (end - HISTORY_DAYS * 86400, end)).fetchall()
            without.append((time.perf_counter() - t1) * 1000)
        # The same days' raw rows read by PostgreSQL alone (psycopg, no HTTP, no JSON).
        day_sql = []
        for day in chosen[:10]:
            t1 = time.perf_counter()
            conn.execute("SELECT ts, value FROM telemetry_samples WHERE node_id = (SELECT id FROM nodes WHERE uid = %s)"
                         " AND channel = %s AND metric_type = 'PH' AND ts >= to_timestamp(%s)"
                         " AND ts <= to_timestamp(%s) ORDER BY ts", (uid, CHANNEL, day, day + 86400 - 1)).fetchall()
            day_sql.append((time.perf_counter() - t1) * 1000)
        status = proc_status(daemon.pid)
        daemon.terminate()
    auto_answer, raw_answer = json.loads(auto_body), json.loads(raw_body)
    auto_s, raw_s, ref_s = summary(auto), summary(raw), summary(reference)
    return {
        "scenario": "history_query", "messages": samples, "seconds": None,
        "rate_per_s": None, "reference_rate_per_s": None, "ratio": None,
        "p50_ms": auto_s["p50_ms"], "p99_ms": auto_s["p99_ms"],
        "auto_month": {**auto_s, "step": auto_answer["step"], "points": len(auto_answer["points"]),
                       "ratio_p50_to_reference": round(auto_s["p50_ms"] / ref_s["p50_ms"], 2)},
        "raw_day": {**raw_s, "step": raw_answer["step"], "points": len(raw_answer["points"]),
                    "bytes": len(raw_body), "ratio_p50_to_reference": round(raw_s["p50_ms"] / ref_s["p50_ms"], 2),
                    "sql_only_p50_ms": round(statistics.median(day_sql), 2),
                    "ratio_p50_to_sql_only": round(raw_s["p50_ms"] / statistics.median(day_sql), 2)},
        "reference_telemetry_last": ref_s,
        "month_from_raw_sql_ms": round(statistics.median(without), 1),
        "peak_rss_mb": round(status["VmHWM"] / 1024, 1), "lost": None,
        "target": TARGETS["history_query"],
        "target_met": bool(auto_s["p50_ms"] <= 50 and raw_s["p50_ms"] <= 200),
    }


def scenario_prune(pg: PgServer, args: argparse.Namespace, code: Code | None = None) -> dict[str, Any]:
    """Retention (SPEC §8) with a writer running: 2 x raw_days days of raw samples, one
    per 10 s per series, and one round of hydrod's history keeper (core/partitions.py)
    dropping the older half while a writer stores a batch every 10 ms through the
    statement hydrod uses (store.write_history)."""
    if code is not None and code.label != "checkout":
        raise RuntimeError("prune runs the checkout's keeper in the bench process: no --reference")
    from hydrod import store
    from hydrod.core.partitions import HistoryKeeper
    from hydrod.settings import HistorySettings

    raw_days, series = 30, args.prune_series
    with Bench(pg, "prune", args.keep) as bench, bench.connect() as conn:
        store.migrate(conn)
        keys = [f"esp32-p{i:011x}" for i in range(series)]
        for key in keys:
            conn.execute("INSERT INTO nodes (uid, hardware_id) VALUES (%s, %s)", (key, key))
        conn.execute("SELECT hydrod_telemetry_partitions(array(SELECT (now() AT TIME ZONE 'UTC')::date - i"
                     " FROM generate_series(0, %s) AS i))", (2 * raw_days,))
        say(f"prune: writing {2 * raw_days} days of {series} series at one sample per 10 s ...")
        t0 = time.monotonic()
        conn.execute("INSERT INTO telemetry_samples (node_id, channel, metric_type, value, ts, received_at)"
                     " SELECT n.id, 'ph', 'PH', 6.0, t, t FROM nodes n, generate_series("
                     "   date_trunc('day', now() - make_interval(days => %s), 'UTC'), now() - interval '1 hour',"
                     "   interval '10 seconds') AS t", (2 * raw_days,))
        conn.execute("ANALYZE telemetry_samples")
        rows_before = count(conn, "telemetry_samples")
        say(f"prune: {rows_before} samples in {time.monotonic() - t0:.1f}s")

        writes: list[tuple[float, float]] = []  # (start, seconds) of each write transaction
        stop = threading.Event()
        failures: list[BaseException] = []

        def writer() -> None:
            with psycopg.connect(bench.dsn, application_name="hydrod-bench-writer") as wconn:
                store.prepare_connection(wconn)
                seq = 0
                while not stop.is_set():
                    now = time.time()
                    rows = [(seq + i, "telemetry", key, GH, ZONE, CHANNEL, "PH", 6.5, now, now, True, None,
                             None, None, None, "{}", None, None, False) for i, key in enumerate(keys)]
                    seq += len(rows)
                    started = time.perf_counter()
                    try:
                        with wconn.transaction(), wconn.cursor() as cur:
                            store.write_history(cur, rows)
                    except BaseException as exc:  # reported in the result
                        failures.append(exc)
                        return
                    writes.append((started, time.perf_counter() - started))
                    stop.wait(0.01)

        # Whether the writer ever waits on a lock: its backend's wait_event_type, polled.
        watching = threading.Event()
        seen = {"polls": 0, "lock_waits": 0}

        def watcher() -> None:
            with psycopg.connect(bench.dsn, autocommit=True, application_name="hydrod-bench") as wconn:
                while not stop.is_set():
                    if watching.is_set():
                        row = wconn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                                            " 'hydrod-bench-writer' AND wait_event_type = 'Lock'").fetchone()
                        seen["polls"] += 1
                        seen["lock_waits"] += row[0]
                    time.sleep(0.002)

        thread = threading.Thread(target=writer, name="bench-writer")
        thread.start()
        threading.Thread(target=watcher, name="bench-watcher", daemon=True).start()
        time.sleep(2)  # the writer's pace before the pruning
        # Control: the watcher sees the writer wait while a lock that does block it is held.
        watching.set()
        with psycopg.connect(bench.dsn, application_name="hydrod-bench") as lconn:
            lconn.execute("LOCK TABLE telemetry_samples IN ACCESS EXCLUSIVE MODE")
            time.sleep(0.3)
            lconn.rollback()
        watching.clear()
        control = dict(seen)
        seen.update(polls=0, lock_waits=0)
        time.sleep(1)
        with psycopg.connect(bench.dsn, autocommit=True, application_name="hydrod-bench") as kconn:
            kconn.execute("SET lock_timeout = 10000")  # as actors/history_keeper.py
            watching.set()
            p0 = time.perf_counter()
            done = HistoryKeeper(HistorySettings(raw_days=raw_days)).run(kconn)
            p1 = time.perf_counter()
            watching.clear()
        time.sleep(2)
        stop.set()
        thread.join(30)
        rows_after = count(conn, "telemetry_samples")
    before = [seconds for started, seconds in writes if p0 - 1 < started and started + seconds < p0]
    during = [seconds for started, seconds in writes if started < p1 and started + seconds > p0]
    ms = lambda values, q: round(1000 * percentiles(values)[q - 1], 2) if len(values) > 1 else None  # noqa: E731
    prune_s = round(p1 - p0, 3)
    max_during = round(1000 * max(during), 2) if during else None
    return {
        "scenario": "prune", "messages": rows_before - rows_after, "seconds": prune_s,
        "rate_per_s": None, "reference_rate_per_s": None, "ratio": None,
        "p50_ms": None, "p99_ms": None,
        "raw_days": raw_days, "series": series, "samples_before": rows_before, "samples_dropped":
        rows_before - rows_after, "partitions_dropped": len(done.partitions_dropped),
        "writer_error": repr(failures[0]) if failures else None,
        "writes_before": len(before), "write_p50_ms_before": ms(before, 50), "write_max_ms_before":
        round(1000 * max(before), 2) if before else None,
        "writes_during": len(during), "write_p50_ms_during": ms(during, 50), "write_max_ms_during": max_during,
        "writer_lock_waits_seen_during": seen["lock_waits"], "watcher_polls_during": seen["polls"],
        "control_lock_waits_seen": control["lock_waits"], "control_polls": control["polls"],
        "target": TARGETS["prune"],
        "target_met": bool(prune_s < 1 and not failures and during and seen["lock_waits"] == 0
                           and control["lock_waits"] > 0),
    }


# ----------------------------------------------------------------------------- main --


# ------------------------------------------------------------------ commands (SPEC §7) --
# Separate functions, kept apart from the other scenarios.

class CommandNodes:
    """Every bench node in one paho client: it checks each command as the firmware does
    (hydrod.signing.check), notes when it arrived, and answers ACK then DONE at once,
    noting when the DONE went out. A second copy of a cmd_id is counted, not answered."""

    def __init__(self, port: int, secrets_by_segment: dict[str, str]) -> None:
        from hydrod import signing
        self.check = signing.check
        self.secrets = secrets_by_segment
        self.received: dict[str, float] = {}
        self.done_at: dict[str, float] = {}
        self.refused: list[str] = []
        self.duplicates = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-nodes-{secrets.token_hex(4)}",
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        subscribed, connected = threading.Event(), threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("command nodes: no CONNACK")
        self.client.subscribe(f"hydro/{GH}/{ZONE}/+/+/command", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("command nodes: no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        at = time.time()
        segment = msg.topic.split("/")[3]
        verdict = self.check(bytes(msg.payload), self.secrets.get(segment, ""), at)
        if not isinstance(verdict, dict):
            with self._lock:
                self.refused.append(f"{msg.topic}: {verdict.error_code}")
            return
        cmd_id = verdict["cmd_id"]
        with self._lock:
            if cmd_id in self.received:
                self.duplicates += 1
                return
            self.received[cmd_id] = at
        respond = msg.topic.rsplit("/", 1)[0] + "/command_response"
        ms = int(at * 1000)
        self.client.publish(respond, b'{"cmd_id":"%s","status":"ACK","ts":%d}' % (cmd_id.encode(), ms), qos=1)
        self.done_at[cmd_id] = time.time()
        self.client.publish(respond, b'{"cmd_id":"%s","status":"DONE","ts":%d}' % (cmd_id.encode(), ms), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _commands_setup(bench: Bench, conn: psycopg.Connection, nodes: int) -> tuple[list[str], dict[str, str]]:
    """`nodes` registered nodes, made bound, online and given a secret in SQL (binding
    over MQTT is measured elsewhere): (uids, {uid: secret})."""
    uids = register_nodes(bench, conn, nodes, prefix="c")
    keys = {uid: secrets.token_hex(32) for uid in uids}
    for uid, secret in keys.items():
        conn.execute("UPDATE nodes SET gh_uid = %s, zone_uid = %s, node_secret = %s, status = 'online',"
                     " last_seen_at = now() WHERE uid = %s", (GH, ZONE, secret, uid))
    return uids, keys


def _post_command(daemon: Daemon, uid: str, cmd_id: str) -> None:
    status, body = daemon.http("POST", f"/api/nodes/{uid}/commands", timeout=30, json={
        "channel": "pump_acid", "cmd": "dose", "params": {"ml": 1.5, "speed": 0.75}, "cmd_id": cmd_id,
        "ttl_s": 600})
    if status != 202:
        raise RuntimeError(f"POST command {cmd_id}: {status} {body}")


def _paho_round_trip(port: int, uids: list[str], n: int, rate: float | None) -> tuple[list[float], float]:
    """Reference, same run: a bare paho client publishes n command-sized QoS 1 messages
    to the nodes' command topics, at `rate` per second (None: at once); (per-message
    publish-to-node ms, all n in seconds)."""
    got: dict[int, float] = {}
    done = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-ref-{secrets.token_hex(4)}",
                      protocol=mqtt.MQTTv311)

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got[int(json.loads(msg.payload)["cmd_id"])] = time.time()
        if len(got) >= n:
            done.set()
    sub.on_message = on_message
    ready = threading.Event()
    sub.on_subscribe = lambda *_: ready.set()
    sub.on_connect = lambda c, *_: c.subscribe(f"hydro/{GH}/{ZONE}/+/ref/command", qos=1)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    if not ready.wait(10):
        raise RuntimeError("reference: no SUBACK")
    pub = Publisher(port)
    sent: dict[int, float] = {}
    payload = '{"cmd":"dose","cmd_id":"%d","params":{"ml":1.5,"speed":0.75},"sig":"%s","ts":%d}'
    t0 = time.time()
    start = time.perf_counter()
    for i in range(n):
        wait = start + i / rate - time.perf_counter() if rate else 0
        if wait > 0:
            time.sleep(wait)
        sent[i] = time.time()
        pub.publish(f"hydro/{GH}/{ZONE}/{uids[i % len(uids)]}/ref/command",
                    (payload % (i, "0" * 64, int(t0))).encode())
    finished = done.wait(60)
    seconds = time.time() - t0
    pub.close()
    sub.disconnect()
    sub.loop_stop()
    if not finished:
        raise TimeoutError(f"reference: {len(got)} of {n} received")
    return sorted((got[i] - sent[i]) * 1000 for i in range(n)), seconds


def scenario_commands(pg: PgServer, args: argparse.Namespace, code: Code | None = None) -> dict[str, Any]:
    """Latency: --commands commands at --command-rate per second, one POST at a time,
    to --nodes nodes; throughput: as many again, POSTed by 8 threads at once."""
    n, nodes, rate = args.commands, args.nodes, args.command_rate
    with Bench(pg, "commands", args.keep, code) as bench, bench.connect() as conn:
        daemon = bench.daemon()
        daemon.start()
        daemon.wait_ready(60)
        uids, keys = _commands_setup(bench, conn, nodes)
        node_side = CommandNodes(bench.broker.port, keys)
        visible: dict[str, float] = {}
        stop = threading.Event()

        def poller() -> None:
            # What GET /api/commands/{cmd_id} reads: the committed row. Polled in SQL every
            # --poll-ms (the API per command would load hydrod with the measurement).
            with bench.connect() as pconn:
                cur = pconn.cursor()
                since = 0.0  # finished_at is the answer's arrival, before its commit: look 5 s back
                while not stop.is_set():
                    asked = time.time()
                    cur.execute("SELECT cmd_id, extract(epoch FROM finished_at)::float8 FROM commands"
                                " WHERE status = 'DONE' AND finished_at > to_timestamp(%s)", (since - 5,))
                    for cmd_id, finished in cur.fetchall():
                        visible.setdefault(cmd_id, asked)
                        since = max(since, finished)
                    time.sleep(args.poll_ms / 1000)

        watcher = threading.Thread(target=poller, daemon=True)
        watcher.start()
        try:
            # 1. latency, paced
            say(f"commands: {n} commands at {rate}/s to {nodes} nodes ...")
            posted: dict[str, float] = {}
            start = time.perf_counter()
            for i in range(n):
                wait = start + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                cmd_id = f"lat-{i}"
                posted[cmd_id] = time.time()
                _post_command(daemon, uids[i % nodes], cmd_id)
            paced_rate = n / (max(posted.values()) - min(posted.values()))  # POSTs wait for their answer
            poll(lambda: all(c in visible for c in posted), 120, "every paced command DONE", 0.05)
            to_node = sorted((node_side.received[c] - posted[c]) * 1000 for c in posted)
            done_to_api = sorted((visible[c] - node_side.done_at[c]) * 1000 for c in posted)

            # 2. throughput: 8 POSTing threads, as fast as hydrod takes them
            say(f"commands: {n} commands as fast as possible ...")
            burst = [f"tp-{i}" for i in range(n)]
            t0 = time.time()
            errors: list[str] = []

            def post_share(k: int) -> None:
                for i in range(k, n, 8):
                    try:
                        _post_command(daemon, uids[i % nodes], burst[i])
                    except Exception as exc:  # counted: a lost command fails the scenario
                        errors.append(repr(exc))
            threads = [threading.Thread(target=post_share, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            posted_s = time.time() - t0
            poll(lambda: all(c in visible for c in burst), 300, "every burst command DONE", 0.05)
            burst_s = max(visible[c] for c in burst) - t0
            stop.set()
            watcher.join(5)
            statuses = dict(conn.execute("SELECT status, count(*) FROM commands GROUP BY status").fetchall())
            events = count(conn, "node_events")
            status = proc_status(daemon.pid)
            daemon.terminate()
        finally:
            stop.set()
            node_side.close()
        ref_lat, _ = _paho_round_trip(bench.broker.port, uids, n, paced_rate)
        _, ref_s = _paho_round_trip(bench.broker.port, uids, n, None)
        q_node, q_api, q_ref = percentiles(to_node), percentiles(done_to_api), percentiles(ref_lat)
        accounted = (statuses.get("DONE", 0) == 2 * n and len(node_side.received) == 2 * n
                     and node_side.duplicates == 0 and not node_side.refused and not errors)
        return {
            "scenario": "commands", "messages": 2 * n, "nodes": nodes, "command_rate_per_s": rate,
            "achieved_rate_per_s": round(paced_rate, 1),
            "post_to_node_p50_ms": round(q_node[49], 1), "post_to_node_p99_ms": round(q_node[98], 1),
            "done_to_api_p50_ms": round(q_api[49], 1), "done_to_api_p99_ms": round(q_api[98], 1),
            "reference_note": "bare paho QoS 1 publishes of the same size to the same topics, paced at the"
                              " achieved rate (latency) and all at once (throughput), same broker, same run",
            "reference_publish_to_node_p50_ms": round(q_ref[49], 1),
            "reference_publish_to_node_p99_ms": round(q_ref[98], 1),
            "ratio_post_to_node_p50": round(q_node[49] / q_ref[49], 1) if q_ref[49] else None,
            "burst_commands_per_s": round(n / burst_s, 1), "burst_posted_per_s": round(n / posted_s, 1),
            "reference_messages_per_s": round(n / ref_s, 1),
            "ratio_burst": round((n / burst_s) / (n / ref_s), 3),
            "accounted": accounted, "statuses": statuses, "duplicates_at_node": node_side.duplicates,
            "refused_by_node": node_side.refused[:5], "post_errors": errors[:5],
            "command_response_events": events,
            "latency_resolution_ms": args.poll_ms, "peak_rss_mb": round(status["VmHWM"] / 1024, 1),
            "daemon_cpu_s": round(status["cpu_s"], 2),
            "target": TARGETS["commands"],
            "target_met": accounted,
        }


def checkout_state() -> dict[str, Any]:
    """The commit measured, and whether hydrod's files (bench/ aside) differ from it."""
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench")
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted": [line[3:] for line in changed.splitlines()]}


SCENARIOS = ("drain", "live", "startup", "hello_burst", "refused", "history_query", "commands", "prune")
# What --reference compares, per scenario: the figure, and whether higher is better.
COMPARED = {"drain": ("rate_per_s", True), "hello_burst": ("rate_per_s", True),
            "startup": ("seconds", False), "live": ("p99_ms", False)}


def run_scenario(name: str, pg: PgServer, args: argparse.Namespace, reference: float | None,
                 code: Code | None = None) -> dict[str, Any]:
    """One scenario's result, with the host's load average (1 min) before and after it."""
    before = os.getloadavg()[0]
    result = _run_scenario(name, pg, args, reference, code)
    return {**result, "load_avg_1m": [round(before, 2), round(os.getloadavg()[0], 2)]}


def _run_scenario(name: str, pg: PgServer, args: argparse.Namespace, reference: float | None,
                  code: Code | None) -> dict[str, Any]:
    try:
        if name == "drain":
            return scenario_drain(pg, args, code)
        if name == "live":
            return scenario_live(pg, args, reference, code)
        if name == "startup":
            return scenario_startup(pg, args, code)
        if name == "refused":
            return scenario_refused(pg, args, code)
        if name == "history_query":
            return scenario_history_query(pg, args, code)
        if name == "commands":
            return scenario_commands(pg, args, code)
        if name == "prune":
            return scenario_prune(pg, args, code)
        return scenario_hello_burst(pg, args, code)
    except Exception as exc:  # one scenario failing does not hide the others
        return {"scenario": name, "error": f"{type(exc).__name__}: {exc}"[:4000]}


def comparison(name: str, runs: list[dict[str, Any]], reference: Code, checkout: Code) -> dict[str, Any]:
    """The checkout against the reference, from runs made in turns in one invocation:
    each pair's ratio (checkout / reference), and the ratio of the means."""
    key, higher_better = COMPARED.get(name, ("rate_per_s", True))
    figures = {label: [r.get(key) for r in runs if r.get("code") == label] for label in ("reference", "checkout")}
    pairs = [(ref, new) for ref, new in zip(figures["reference"], figures["checkout"])
             if ref is not None and new is not None]
    ratio = None
    if pairs:
        ratio = round(statistics.mean(n for _, n in pairs) / statistics.mean(r for r, _ in pairs), 3)
    out = {
        "scenario": f"{name}_vs_reference", "figure": key, "higher_is_better": higher_better,
        "reference_commit": reference.commit, "checkout_commit": checkout.commit,
        "order": [r.get("code") for r in runs],
        "reference": figures["reference"], "checkout": figures["checkout"],
        "pair_ratios": [round(n / r, 3) for r, n in pairs if r],
        "ratio": ratio, "ratio_note": f"mean {key} of the checkout / mean of the reference, complete pairs only",
        "errors": [r["error"] for r in runs if "error" in r],
    }
    if name == "drain":
        out["lost"] = [r.get("lost") for r in runs]
        out["paho_v5_receive_only_rate_per_s"] = [r.get("paho_v5_receive_only_rate_per_s") for r in runs]
        # Each run's rate over the bare paho client's rate measured right after it, on the
        # same messages: a second view that cancels most of the load other jobs put on the host.
        to_paho = {label: [r.get("ratio_to_paho") for r in runs if r.get("code") == label]
                   for label in ("reference", "checkout")}
        out["ratio_to_paho"] = to_paho
        pairs_paho = [(r, n) for r, n in zip(to_paho["reference"], to_paho["checkout"]) if r and n]
        out["ratio_of_ratios_to_paho"] = (round(statistics.mean(n for _, n in pairs_paho)
                                                / statistics.mean(r for r, _ in pairs_paho), 3)
                                          if pairs_paho else None)
    if name == "live":
        out["burst_ratio"] = {label: [r.get("ratio") for r in runs if r.get("code") == label]
                              for label in ("reference", "checkout")}
    return out


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help=f"which to run (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--messages", type=int, default=int(env("BENCH_MESSAGES", 100_000)),
                        help="drain: telemetry messages queued while hydrod is down (100000)")
    parser.add_argument("--nodes", type=int, default=int(env("BENCH_NODES", 50)), help="nodes (50)")
    parser.add_argument("--live-seconds", type=float, default=float(env("BENCH_LIVE_SECONDS", 20)),
                        help="live: duration (20)")
    parser.add_argument("--live-rate", type=int, default=int(env("BENCH_LIVE_RATE", 2000)),
                        help="live: telemetry messages per second (2000)")
    parser.add_argument("--burst-hellos", type=int, default=int(env("BENCH_BURST_HELLOS", 2000)),
                        help="live: node_hello from new hardware ids in the middle of the run "
                             "(2000; 0: the steady load alone)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="live: visibility poll interval (5)")
    parser.add_argument("--hellos", type=int, default=int(env("BENCH_HELLOS", 5000)),
                        help="hello_burst: node_hello messages (5000)")
    parser.add_argument("--startup-runs", type=int, default=5, help="startup: runs (5)")
    parser.add_argument("--refused-messages", type=int, default=int(env("BENCH_REFUSED_MESSAGES", 5000)),
                        help="refused: messages in each of its three backlogs (5000)")
    parser.add_argument("--reference", metavar="COMMIT", default=None,
                        help="run each scenario against COMMIT's hydrod and the checkout's in turns "
                             "(reference, checkout, reference, checkout ...) and print the ratio")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--reference: runs of each (2)")
    parser.add_argument("--history-queries", type=int, default=200,
                        help="history_query: requests for the month (step=auto) and the reference (200)")
    parser.add_argument("--history-raw-queries", type=int, default=50,
                        help="history_query: requests for one day's raw samples (50)")
    parser.add_argument("--commands", type=int, default=int(env("BENCH_COMMANDS", 1000)),
                        help="commands: commands in each of its two phases (1000)")
    parser.add_argument("--command-rate", type=float, default=float(env("BENCH_COMMAND_RATE", 50)),
                        help="commands: POSTs per second in the latency phase (50)")
    parser.add_argument("--prune-series", type=int, default=int(env("BENCH_PRUNE_SERIES", 2)),
                        help="prune: series of one sample per 10 s over 60 days (2)")
    parser.add_argument("--profile", type=Path, default=None, metavar="RAW_FILE",
                        help="drain and live: record hydrod with py-spy (folded stacks to RAW_FILE, "
                             "RAW_FILE.live for live) and report the top functions by own time")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.jsonl")
    parser.add_argument("--keep", action="store_true", help="keep scratch directories (logs)")
    args = parser.parse_args(argv)
    chosen = args.scenarios or list(SCENARIOS)
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    out_path = None
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        out_path = RESULTS / time.strftime("%Y%m%dT%H%M%SZ.jsonl", time.gmtime())

    def emit(result: dict[str, Any]) -> None:
        line = json.dumps(result)
        print(line, flush=True)
        if out_path is not None:
            with open(out_path, "a") as f:
                f.write(line + "\n")

    host = {"cpus": os.cpu_count(), "python": platform.python_version(), **checkout_state()}
    failed = 0
    with reference_code(args.reference) if args.reference else nullcontext() as ref_code:
        pg = PgServer.find_or_start()
        say(f"PostgreSQL {pg.host}:{pg.port}, {os.cpu_count()} CPUs")
        reference = None
        try:
            for name in chosen:
                if ref_code is None:
                    result = run_scenario(name, pg, args, reference)
                    if name == "drain" and "error" not in result:
                        reference = result["reference_rate_per_s"]
                    failed += "error" in result
                    emit({**result, "host": host})
                    continue
                checkout = checkout_code()
                runs = []
                for round_ in range(args.rounds):
                    for code in (ref_code, checkout):  # in turns: drift of the machine hits both
                        say(f"{name}: round {round_ + 1} of {args.rounds}, {code.label} ({code.commit})")
                        result = {**run_scenario(name, pg, args, None, code),
                                  "code": code.label, "code_commit": code.commit}
                        failed += "error" in result
                        runs.append(result)
                        emit({**result, "host": host})
                emit({**comparison(name, runs, ref_code, checkout), "host": host})
        finally:
            pg.stop_private()
    if out_path is not None:
        say(f"saved {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
