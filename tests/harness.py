"""Test harness: real Mosquitto, real PostgreSQL, a cuttable TCP proxy, hydrod as a
subprocess, and MQTT helpers. Everything waits on a condition with a deadline.

The fixtures wrapping these live in conftest.py.
"""

from __future__ import annotations

import glob
import importlib.util
import json as jsonlib
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

# The firmware's own messages (docs/SPEC.md's `fixtures/`), kept in the repository.
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"

POLL_S = 0.02


# ------------------------------------------------------------------ waiting --

def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = POLL_S) -> Any:
    """Re-check `predicate` until it returns something truthy; return that value.
    Raise AssertionError naming `what` when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # a poll: the condition is re-checked, with a deadline


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port the kernel chose (bind to
    0) comes from that range, where any process's next outgoing connection can take it
    between this check and the server's bind: with several suites running at once,
    that happened."""
    low = _ephemeral_low()
    for _ in range(200):
        port = secrets.choice(range(10_000, max(low, 10_001)))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range below is crowded: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(lines: Iterable[Any], n: int = 50) -> str:
    return "\n".join(line if isinstance(line, str) else jsonlib.dumps(line)
                     for line in list(lines)[-n:])


# ---------------------------------------------------------------- mosquitto --

@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate it signed (for 127.0.0.1 and localhost), and a
    second CA that signed nothing here: trusting it is trusting the wrong one."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path


def make_certificates(directory: Path) -> Certificates:
    """Made with the openssl command line (Debian's `openssl`), EC keys: quick."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"

    for name in ("ca", "other-ca"):
        openssl("req", "-x509", *key, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"),
                "-days", "2", "-subj", f"/CN=hydrod test {name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    openssl("req", *key, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "2", "-extfile", str(d / "server.ext"), "-out", str(d / "server.crt"))
    return Certificates(d / "ca.crt", d / "server.crt", d / "server.key", d / "other-ca.crt")


class Mosquitto:
    """A private broker on a free 127.0.0.1 port, with its own config and
    persistence directory, so restart() keeps sessions and queued messages.

    `tls`: a second listener, on `tls_port`, serving that server certificate.
    `passwords`: {user: password} in a password file; a client that names a user
    must give its password (anonymous clients, the tests' own, still connect).
    `acl_file`: that ACL, and then only clients with a login connect."""

    def __init__(self, directory: Path, port: int | None = None, autosave_interval: int = 1,
                 extra_config: str = "", tls: Certificates | None = None,
                 passwords: dict[str, str] | None = None, acl_file: Path | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.config = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        lines = [
            f"listener {self.port} 127.0.0.1",
            # With an ACL, logins are required (as in production).
            f"allow_anonymous {'false' if acl_file else 'true'}",
            *([f"acl_file {acl_file}"] if acl_file else []),
            "persistence true",
            f"persistence_location {self.dir}/",
            # Saved on a clean stop anyway; the autosave keeps kill() honest.
            f"autosave_interval {autosave_interval}",
            "max_queued_messages 1000000",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, who can't write self.dir
        if passwords:
            password_file = self.dir / "passwords"
            password_file.write_text("")
            for user, password in passwords.items():
                done = subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password],
                                      capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, f"mosquitto_passwd: {done.stderr}"
            lines.append(f"password_file {password_file}")
        if tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}"]
        self.config.write_text("\n".join(lines) + "\n" + extra_config)

    def start(self, timeout: float = 10.0) -> Mosquitto:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)

        def up_or_dead() -> bool:  # "running" is logged once its listeners are open
            started = b" running" in self.log.read_bytes()[offset:]
            return ((started and port_open(self.port) and (self.tls_port is None or port_open(self.tls_port)))
                    or self.proc.poll() is not None)

        try:
            wait_until(up_or_dead, timeout, f"mosquitto on port {self.port}")
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}")
        except AssertionError as error:
            self.kill()
            raise RuntimeError(f"{error}:\n{self.log_text()[-3000:]}") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: mosquitto saves its persistence file on the way out."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
                raise RuntimeError("mosquitto ignored SIGTERM") from None

    def kill(self) -> None:
        """SIGKILL: whatever was not autosaved is lost, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout: float = 10.0) -> Mosquitto:
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""



@contextmanager
def running_broker(folder: Path, **options: Any) -> Iterator[Mosquitto]:
    """A private Mosquitto (options as harness.Mosquitto takes them), always stopped after."""
    server = Mosquitto(folder, **options).start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.kill()


# --------------------------------------------------------------- postgresql --

@dataclass
class PgServer:
    """A PostgreSQL server the tests may create databases on."""
    host: str
    port: int
    user: str
    private_dir: Path | None = None  # set when the harness started its own cluster
    _run_as: str | None = None
    _pg_ctl: str = "pg_ctl"

    def dsn(self, dbname: str = "postgres") -> str:
        user = f"{self.user}@" if self.user else ""
        return f"postgresql://{user}{self.host}:{self.port}/{dbname}"

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def create_database(self) -> str:
        name = f"hydrod_test_{secrets.token_hex(6)}"
        # UTF-8 whatever the cluster's default (SQL_ASCII when initdb ran without LANG);
        # the C locale exists everywhere and goes with any encoding.
        query(self.admin_dsn, f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                              "TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        query(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @classmethod
    def find_or_start(cls) -> PgServer:
        """The machine's server on 127.0.0.1:5432 when it lets us in, else a private
        cluster. HYDROD_TEST_PG=private forces the latter; HYDROD_TEST_PG_DSN names
        another server (as postgresql://user@host:port/db)."""
        if os.environ.get("HYDROD_TEST_PG") != "private":
            candidates = [os.environ.get("HYDROD_TEST_PG_DSN", ""),
                          "postgresql://postgres@127.0.0.1:5432/postgres",
                          # the role scripts/setup makes for the OS user (~/.pgpass)
                          "postgresql://127.0.0.1:5432/postgres"]
            for dsn in filter(None, candidates):
                try:
                    with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
                        info = conn.info
                        can_create = conn.execute(
                            "select rolsuper or rolcreatedb from pg_roles where rolname = current_user"
                        ).fetchone()[0]
                        if can_create:
                            return cls(info.host, info.port, info.user)
                except psycopg.Error:
                    continue
        return cls.start_private()

    @classmethod
    def start_private(cls) -> PgServer:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]))
        initdb = bins[-1] if bins else shutil.which("initdb")
        if not initdb:
            raise RuntimeError("no PostgreSQL on 127.0.0.1:5432 and no initdb to start a private one")
        pg_ctl = str(Path(initdb).with_name("pg_ctl"))
        directory = Path(tempfile.mkdtemp(prefix="hydrod-pg-"))
        run_as = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            run_as = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(run_as)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        port = free_port()
        data = directory / "data"
        server = cls("127.0.0.1", port, "postgres", private_dir=directory, _run_as=run_as,
                     _pg_ctl=pg_ctl)
        server._run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                     "--no-sync", "-E", "UTF8", "--locale=C"])
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={directory} "
                   "-c fsync=off -c full_page_writes=off -c synchronous_commit=off "
                   "-c max_connections=200")
        server._run([pg_ctl, "-D", str(data), "-l", str(directory / "server.log"),
                     "-o", options, "-w", "-t", "60", "start"])
        return server

    def stop_private(self) -> None:
        if self.private_dir is None:
            return
        try:
            self._run([self._pg_ctl, "-D", str(self.private_dir / "data"), "-m", "fast", "-w", "stop"])
        finally:
            shutil.rmtree(self.private_dir, ignore_errors=True)

    def _run(self, argv: list[str]) -> None:
        if self._run_as:
            argv = ["runuser", "-u", self._run_as, "--", *argv]
        done = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def query(dsn: str, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit; return its rows ([] when it has none)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


# ------------------------------------------------------------------- proxy --

class TcpProxy:
    """Forwards 127.0.0.1:`port` to (host, target_port). cut() resets every open
    connection at once and then refuses new ones (accept + reset), or with
    mode="blackhole" holds them silent, until restore()."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._held: list[socket.socket] = []
        self._mode: str | None = None  # None = forwarding
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self, mode: str = "reset") -> None:
        assert mode in ("reset", "blackhole"), mode
        with self._lock:
            self._mode = mode
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def restore(self) -> None:
        with self._lock:
            self._mode = None
            held, self._held = self._held, []
        for sock in held:
            _reset(sock)

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.restore()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                mode = self._mode
                if mode == "blackhole":
                    self._held.append(client)
                    continue
            if mode == "reset" or self._closed:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pair = (client, upstream)
            with self._lock:
                forwarding = self._mode is None
                if forwarding:
                    self._pairs.add(pair)
            if not forwarding:  # cut while we were connecting upstream
                _reset(client)
                _reset(upstream)
                continue
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True,
                                 name=f"proxy-{self.port}-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket,
              pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            mine = pair in self._pairs
            self._pairs.discard(pair)
        if mine:  # an ordinary close from one side: pass it on
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST, waking any thread blocked in recv() on it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


# -------------------------------------------------------------------- mqtt --

def encode_payload(payload: bytes | str | dict[str, Any] | list[Any] | None) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return jsonlib.dumps(payload, separators=(",", ":")).encode()


def _connect(client: mqtt.Client, port: int, host: str, timeout: float,
             properties: Properties | None = None, **kwargs: Any) -> None:
    connected = threading.Event()
    result: list[Any] = []

    def on_connect(_c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        result.append(reason_code)
        connected.set()

    client.on_connect = on_connect
    rc = client.connect(host, port, keepalive=30, properties=properties, **kwargs)
    if rc != mqtt.MQTT_ERR_SUCCESS:
        raise RuntimeError(f"MQTT connect to {host}:{port} failed: {mqtt.error_string(rc)}")
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise AssertionError(f"no CONNACK from {host}:{port} within {timeout}s")
    if result[0].is_failure:
        client.loop_stop()
        raise RuntimeError(f"MQTT connect to {host}:{port} refused: {result[0]}")


Message = tuple[str, Any] | tuple[str, Any, bool]


def publish(port: int, messages: Iterable[Message], qos: int = 1, host: str = "127.0.0.1",
            timeout: float = 10.0, client_id: str = "",
            protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
            username: str | None = None, password: str | None = None) -> None:
    """Publish (topic, payload[, retain]) messages and wait for every PUBACK.
    A dict/list payload is sent as compact JSON, a str as UTF-8, None as empty."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol)
    if username is not None:
        client.username_pw_set(username, password)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    _connect(client, port, host, timeout)
    try:
        infos = []
        for message in messages:
            topic, payload, *rest = message
            info = client.publish(topic, encode_payload(payload), qos=qos,
                                  retain=bool(rest and rest[0]))
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            infos.append((topic, info))
        deadline = time.monotonic() + timeout
        for topic, info in infos:
            info.wait_for_publish(max(0.001, deadline - time.monotonic()))
            if not info.is_published():
                raise AssertionError(f"no PUBACK for {topic} within {timeout}s")
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    def json(self) -> Any:
        return jsonlib.loads(self.payload)


class Subscriber:
    """Subscribes to `topic` (waits for SUBACK) and collects what arrives.

        with Subscriber(broker.port, "hydro/time/response") as sub:
            publish(...)
            [msg] = sub.wait_for(1)

    client_id + clean_start=False + session_expiry (MQTT 5) give a persistent
    session: the broker queues QoS 1 messages while this client is away."""

    def __init__(self, port: int, topic: str, qos: int = 1, host: str = "127.0.0.1",
                 client_id: str = "", clean_start: bool = True, session_expiry: int | None = None,
                 timeout: float = 10.0, username: str | None = None,
                 password: str | None = None) -> None:
        self.port, self.host, self.topic, self.qos, self.timeout = port, host, topic, qos, timeout
        self.client_id = client_id or f"test-sub-{secrets.token_hex(4)}"
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        if username is not None:
            self.client.username_pw_set(username, password)

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def __enter__(self) -> Subscriber:
        props = None
        if self.session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        _connect(self.client, self.port, self.host, self.timeout, properties=props,
                 clean_start=self.clean_start)
        subscribed = threading.Event()
        granted: list[Any] = []

        def on_subscribe(_c: Any, _u: Any, _mid: Any, reason_codes: Any, _p: Any) -> None:
            granted.extend(reason_codes)
            subscribed.set()

        self.client.on_subscribe = on_subscribe
        rc, _mid = self.client.subscribe(self.topic, qos=self.qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self.__exit__()
            raise RuntimeError(f"subscribe to {self.topic} failed: {mqtt.error_string(rc)}")
        if not subscribed.wait(self.timeout) or granted[0].is_failure:
            self.__exit__()
            raise AssertionError(f"no successful SUBACK for {self.topic}: {granted}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, what: int | Callable[[Received], bool] = 1,
                 timeout: float = 10.0) -> Any:
        """An int n: wait until n messages arrived and return them all (a copy).
        A predicate: return the first message it accepts."""
        def check() -> Any:
            if isinstance(what, int):
                return list(self.messages) if len(self.messages) >= what else None
            return next((m for m in self.messages if what(m)), None)

        deadline = time.monotonic() + timeout
        with self._cond:
            while (found := check()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.topic}: timed out after {timeout}s waiting for {what!r}; got "
                        f"{[(m.topic, m.payload[:200]) for m in self.messages[-20:]]}")
                self._cond.wait(remaining)
            return found


# -------------------------------------------------------------------- data --

@dataclass(frozen=True)
class FirmwareFixtures:
    messages: list[dict[str, Any]]  # {"topic", "payload", "note"}, payload parsed JSON
    raw: list[tuple[str, str]]      # (topic, payload) whose payload is not JSON


def fixtures(directory: Path = FIXTURES_DIR) -> FirmwareFixtures:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no fixtures")
    messages = [jsonlib.loads(line) for line in
                (directory / "firmware.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    raw = [tuple(line.split("\t", 1)) for line in
           (directory / "firmware_raw.txt").read_text(encoding="utf-8").splitlines() if "\t" in line]
    return FirmwareFixtures(messages, raw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ daemon --

def fast_config(mqtt_port: int, dsn: str, http_port: int) -> dict[str, dict[str, Any]]:
    """Defaults that make hydrod quick to react in tests."""
    return {
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port,
                 "client_id": f"hydrod-test-{secrets.token_hex(4)}",
                 "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "database": {"dsn": dsn, "startup_timeout_s": 20.0,
                     "retry_min_s": 0.05, "retry_max_s": 0.5},
        "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
        "supervisor": {"backoff_min_s": 0.05, "backoff_max_s": 0.2, "shutdown_timeout_s": 15.0},
        "logging": {"format": "json", "level": "info", "stats_interval_s": 1.0},
        # Tests send samples with fixed timestamps (late 2025): retention would drop
        # them at start-up. The retention tests set raw_days themselves.
        "history": {"raw_days": 0},
    }


def merge_sections(base: dict[str, dict[str, Any]],
                   overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return jsonlib.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        out.append("")
    return "\n".join(out)


def _hydrod_argv() -> list[str]:
    if importlib.util.find_spec("hydrod.__main__") is not None:
        return [sys.executable, "-m", "hydrod"]
    # No hydrod/__main__.py (yet): call the console script's entry point.
    return [sys.executable, "-c", "import sys; from hydrod.cli import main; sys.exit(main())"]


class Daemon:
    """hydrod as a subprocess with a config written from `sections` merged over
    fast_config(). stdout is parsed as JSON lines into `lines` (non-JSON lines
    stay as str); stderr lines go to `stderr`. It runs in `directory`, beside its
    config.toml, as `hydrod run --config config.toml ARGS`, or as `command` when given."""

    def __init__(self, directory: Path, mqtt_port: int, dsn: str,
                 sections: dict[str, dict[str, Any]] | None = None,
                 env: dict[str, str] | None = None, args: Iterable[str] = (),
                 command: list[str] | None = None, known_sections: Iterable[str] | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = merge_sections(fast_config(mqtt_port, dsn, free_port()), sections or {})
        if known_sections is not None:  # an older hydrod (bench --reference) refuses newer sections
            known = set(known_sections)
            self.config = {name: keys for name, keys in self.config.items() if name in known}
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(to_toml(self.config))
        self.extra_env = env or {}
        self.args = list(args)
        self.command = command or [*_hydrod_argv(), "run", "--config", str(self.config_path), *self.args]
        # The open-file limit (soft and hard) hydrod runs under; None keeps the test's.
        self.nofile: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any] | str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._readers: list[threading.Thread] = []
        self._open_streams = 0

    # -- process ---------------------------------------------------------------
    def start(self) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYDROD_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", **self.extra_env)
        self.proc = subprocess.Popen(
            self.command, cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=self._limits if self.nofile is not None else None)
        self._open_streams = 2
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True),
                             name="daemon-stdout", daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False),
                             name="daemon-stderr", daemon=True)]
        for reader in self._readers:
            reader.start()
        return self

    def _limits(self) -> None:
        """In the child, before exec."""
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _read(self, stream: Any, into: list[Any], parse: bool) -> None:
        try:
            for raw in stream:
                text = raw.decode("utf-8", "replace").rstrip("\n")
                item: Any = text
                if parse:
                    try:
                        parsed = jsonlib.loads(text)
                        item = parsed if isinstance(parsed, dict) else text
                    except ValueError:
                        pass
                with self._cond:
                    into.append(item)
                    self._cond.notify_all()
        finally:
            stream.close()
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code. Raises (after SIGKILL) when it does not exit."""
        return self._stop(signal.SIGTERM, timeout)

    def interrupt(self, timeout: float = 30.0) -> int:
        return self._stop(signal.SIGINT, timeout)

    def kill9(self) -> int:
        return self._stop(signal.SIGKILL, 10.0)

    def _stop(self, sig: int, timeout: float) -> int:
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"hydrod did not exit within {timeout}s of {sig!r}; last lines:\n"
                                 + self.tail()) from None
        self._join_readers()
        return code

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(5)

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._join_readers()

    # -- logs ------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.lines if isinstance(line, dict)]

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.records() if _matches(r, name, fields)]

    def mark(self) -> int:
        """Position in `lines` now: pass it as since= to wait for a later event."""
        with self._cond:
            return len(self.lines)

    def wait_for(self, event: str, timeout: float = 15.0, since: int = 0,
                 **fields: Any) -> dict[str, Any]:
        """The first record (from `since` on) with this event whose fields equal
        `fields` (a callable field value is a predicate). Fails fast, with the last
        50 lines, when the deadline passes or hydrod exits without it."""
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if isinstance(line, dict) and _matches(line, event, fields):
                        return line
                seen = max(seen, len(self.lines))
                remaining = deadline - time.monotonic()
                exited = self._open_streams == 0 and self.proc is not None
                if remaining <= 0 or exited:
                    why = (f"hydrod exited ({self.proc.poll() if self.proc else None})"
                           if exited else f"timed out after {timeout}s")
                    raise AssertionError(
                        f"{why} waiting for event {event!r} {fields or ''}; last lines:\n"
                        + self.tail())
                self._cond.wait(remaining)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for("mqtt_subscribed", timeout=timeout)

    def tail(self, n: int = 50) -> str:
        with self._cond:
            out = _tail(self.lines, n)
            if self.stderr:
                out += "\n--- stderr ---\n" + _tail(self.stderr, n)
        return out

    # -- http --------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.config['http']['host']}:{self.config['http']['port']}"

    def http(self, method: str, path: str, json: Any = None, token: str | None = None,
             timeout: float = 10.0, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON or text). `body` sends raw bytes instead of `json`;
        `headers` are added to (or replace) the usual ones."""
        sent = {"Accept": "application/json"}
        data = body
        if json is not None:
            data = jsonlib.dumps(json).encode()
        if data is not None:
            sent["Content-Type"] = "application/json"
        if token:
            sent["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method.upper(),
                                         headers={**sent, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw, ctype = response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            status, raw, ctype = error.code, error.read(), error.headers.get_content_type()
        text = raw.decode("utf-8", "replace")
        if ctype == "application/json" or text[:1] in ("{", "["):
            try:
                return status, jsonlib.loads(text)
            except ValueError:
                pass
        return status, text


def _matches(record: dict[str, Any], event: str, fields: dict[str, Any]) -> bool:
    if record.get("event") != event:
        return False
    for key, want in fields.items():
        if key not in record:
            return False
        got = record[key]
        if callable(want) and not want(got):
            return False
        if not callable(want) and got != want:
            return False
    return True


# ------------------------------------------------------------ test helpers --
# Small conveniences shared by the actor and fault tests.

def metric_value(exposition: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text (`name{labels} value`), None when absent."""
    for line in exposition.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        if all(found.get(key) == jsonlib.dumps(want) for key, want in labels.items()):
            return float(value)
    return None


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads for pid {pid}")


def accounts_at_stop(daemon: Daemon) -> dict[str, int]:
    """The `messages` of the last daemon_stopped, checked: every message received was
    committed, skipped as a duplicate, answered (a time request) or rejected, and none
    is left pending."""
    stopped = daemon.events("daemon_stopped")
    assert stopped, "no daemon_stopped line"
    accounts = stopped[-1]["messages"]
    assert accounts["pending"] == 0, accounts
    assert accounts["received"] == sum(accounts[k] for k in ("committed", "duplicate", "answered", "rejected")), \
        accounts
    return accounts


def vmrss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def hello(hardware_id: str, node_type: str = "ph", fw_version: str = "1.0.0") -> Message:
    """A node_hello message as firmware sends it."""
    return ("hydro/node_hello", {"message_type": "node_hello", "hardware_id": hardware_id,
                                 "node_type": node_type, "fw_version": fw_version,
                                 "capabilities": [node_type]})


def register_node(port: int, dsn: str, hardware_id: str, node_type: str = "ph",
                  timeout: float = 10.0) -> str:
    """Publish a node_hello and wait for its `nodes` row; return the node's uid."""
    publish(port, [hello(hardware_id, node_type)])
    rows = wait_until(lambda: query(dsn, "SELECT uid FROM nodes WHERE hardware_id = %s", (hardware_id,)),
                      timeout, f"node {hardware_id} registered")
    return rows[0][0]


def bind_node(daemon: Daemon, port: int, dsn: str, uid: str, gh: str = "gh-1", zone: str = "zn-1",
              timeout: float = 10.0, token: str | None = None) -> None:
    """Push a config naming gh/zone over HTTP, answer as the node would (config_report
    from its new namespace) and wait until the node is bound there."""
    status, body = daemon.http("POST", f"/api/nodes/{uid}/config",
                               json={"channels": [], "gh_uid": gh, "zone_uid": zone}, token=token)
    assert status == 202, (status, body)
    report = {"node_id": uid, "version": body["version"], "type": "ph", "channels": [],
              "gh_uid": gh, "zone_uid": zone, "mqtt": {"configured": True}}
    publish(port, [(f"hydro/{gh}/{zone}/{uid}/config_report", report)])
    wait_until(lambda: query(dsn, "SELECT 1 FROM nodes WHERE uid = %s AND gh_uid = %s AND zone_uid = %s",
                             (uid, gh, zone)), timeout, f"node {uid} bound to {gh}/{zone}")


class BackgroundPublish:
    """publish() on its own thread, for senders that keep going while a test acts:

        sender = BackgroundPublish(broker.port, messages)
        ...            # kill, cut, restart
        sender.join()  # re-raises whatever publish() raised
    """

    def __init__(self, port: int, messages: Iterable[Message], timeout: float = 120.0,
                 **kwargs: Any) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(port, list(messages), timeout, kwargs),
                                        name="background-publish", daemon=True)
        self._thread.start()

    def _run(self, port: int, messages: list[Message], timeout: float, kwargs: dict[str, Any]) -> None:
        try:
            publish(port, messages, timeout=timeout, **kwargs)
        except BaseException as error:  # handed to join()
            self.error = error

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float = 120.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"publisher still running after {timeout}s")
        if self.error is not None:
            raise self.error


# ------------------------------------------------------- plain classes (core/) --

class RecordingLog:
    """A stand-in for an actor's structlog logger, for the plain classes in core/:
    keeps each line as a dict with its `event` and `level`."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def _line(self, level: str, event: str, **fields: Any) -> None:
        self.records.append({"event": event, "level": level, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._line("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._line("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._line("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._line("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._line("error", event, exception=True, **fields)

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if _matches(r, name, fields)]


class Later:
    """A stand-in for a timer: keeps the delays asked for; the test fires them itself."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def routed(seq: int, topic: str, payload: Any, received_at: float | None = None, mid: int = 0, dup: bool = False):
    """A received message as MqttIo hands it to a consumer: classified by its topic (protocol.classify)."""
    from hydrod import protocol
    return protocol.classify(seq, topic, encode_payload(payload), time.time() if received_at is None else received_at,
                             mid=mid, dup=dup)


# ------------------------------------------------------------------ history --

ROLLUPS = {"telemetry_1m": "minute", "telemetry_1h": "hour", "telemetry_1d": "day"}


def make_partitions(conn: psycopg.Connection, start: Any, end: Any) -> None:
    """The day partitions of telemetry_samples from `start` to `end` (timestamptz), when
    the schema has them (migration 005), for samples written with SQL rather than
    through hydrod."""
    if conn.execute("SELECT to_regproc('hydrod_telemetry_partitions')").fetchone()[0] is not None:
        conn.execute("SELECT hydrod_telemetry_partitions(array_agg(d::date)) FROM generate_series("
                     "(%s::timestamptz AT TIME ZONE 'UTC')::date, (%s::timestamptz AT TIME ZONE 'UTC')::date,"
                     " interval '1 day') AS d", (start, end))


def fill_rollups(dsn: str) -> None:
    """Fill the rollup tables (SPEC §8) from the raw samples with plain SQL, the same
    as migration 005 does for the rows it copies: each bucket's count, min, max, avg,
    last, last_ts (and sum, where the schema keeps it) over its raw rows, buckets in
    UTC. For samples written with SQL: hydrod keeps the rollups in its own write
    transaction. Makes the tables when the schema does not have them yet."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, unit in ROLLUPS.items():
            conn.execute(f"""CREATE TABLE IF NOT EXISTS {table} (
                node_id bigint NOT NULL, channel text NOT NULL, metric_type text NOT NULL,
                bucket timestamptz NOT NULL, count bigint NOT NULL, min double precision NOT NULL,
                max double precision NOT NULL, avg double precision NOT NULL, last double precision NOT NULL,
                last_ts timestamptz NOT NULL, PRIMARY KEY (node_id, channel, metric_type, bucket))""")
            has_sum = conn.execute("SELECT 1 FROM information_schema.columns WHERE table_name = %s"
                                   " AND column_name = 'sum'", (table,)).fetchone() is not None
            conn.execute(f"""INSERT INTO {table} AS r
                (node_id, channel, metric_type, bucket, count, min, max, avg, last, last_ts{", sum" * has_sum})
                SELECT node_id, channel, metric_type, date_trunc('{unit}', ts, 'UTC'), count(*), min(value),
                       max(value), avg(value), (array_agg(value ORDER BY ts DESC))[1], max(ts){", sum(value)" * has_sum}
                FROM telemetry_samples GROUP BY 1, 2, 3, 4
                ON CONFLICT (node_id, channel, metric_type, bucket) DO UPDATE SET count = excluded.count,
                    min = excluded.min, max = excluded.max, avg = excluded.avg, last = excluded.last,
                    last_ts = excluded.last_ts{", sum = excluded.sum" * has_sum}""")
