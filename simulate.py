"""`hydrod simulate` (SPEC §9): virtual firmware nodes on a real broker.

`VirtualNode` is the firmware, as a plain class with no sockets: it says what to
publish on connect, on a time answer, a pushed config or a command, and when
asked for a heartbeat or a sample. `Simulator` connects one paho client per node
(each with its own last will) and drives all of them from one thread, one
selector: paho's external-loop API (`loop_read`, `loop_write`, `loop_misc` and
the socket callbacks), so 200 nodes cost 200 sockets and no extra threads.
`Pacer` spreads the telemetry evenly over time, R messages a second in total.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
import re
import selectors
import socket
import ssl
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog

from . import signing

log = structlog.get_logger("hydrod", actor="simulate")

TEMP_GH, TEMP_ZONE = "gh-temp", "zn-temp"
TIME_REQUEST, TIME_RESPONSE = "hydro/time/request", "hydro/time/response"
HELLO_TOPIC = "hydro/node_hello"
FW_VERSION = "1.0.0-sim"
HARDWARE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SEEN_CMD_IDS = 256  # the command ids a node remembers (a ring, as firmware keeps)

# What each simulated node type measures, as the firmware in the fixtures reports it:
# (channel, metric_type, unit, typical value, how far it drifts per sample).
SENSORS: dict[str, tuple[tuple[str, str, str, float, float], ...]] = {
    "ph": (("ph_sensor", "PH", "pH", 5.9, 0.02), ("solution_temp_c", "TEMPERATURE", "C", 21.5, 0.05)),
    "ec": (("ec_sensor", "EC", "mS/cm", 1.6, 0.01), ("solution_temp_c", "TEMPERATURE", "C", 21.5, 0.05)),
    "climate": (("air_temp_c", "TEMPERATURE", "C", 24.0, 0.05), ("air_humidity", "HUMIDITY", "%", 62.0, 0.2),
                ("co2_ppm", "CO2", "ppm", 800.0, 3.0)),
}
ACTUATORS = {"ph": ("pump_acid", "PERISTALTIC_PUMP"), "ec": ("pump_nutrient", "PERISTALTIC_PUMP"),
             "climate": ("fan", "RELAY")}
CAPABILITIES = {"ph": ["ph", "temperature"], "ec": ["ec", "temperature"],
                "climate": ["temperature", "humidity", "co2", "ventilation"]}
NODE_TYPES = tuple(SENSORS)


@dataclass(frozen=True)
class Out:
    """One PUBLISH a node makes (QoS 1)."""
    kind: str
    topic: str
    payload: bytes
    retain: bool = False


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class VirtualNode:
    """One node's firmware: its namespace, clock, config and command memory.

    `now` is wall-clock Unix seconds, passed in so that tests can drive it."""

    def __init__(self, hardware_id: str, node_type: str, booted_at: float, seed: int = 0) -> None:
        if not HARDWARE_ID.fullmatch(hardware_id):
            raise ValueError(f"hardware id {hardware_id!r}: 1-128 characters of A-Z a-z 0-9 . _ : -")
        self.hardware_id, self.node_type, self.booted_at = hardware_id, node_type, booted_at
        self.gh, self.zone, self.segment = TEMP_GH, TEMP_ZONE, hardware_id
        self.pending: tuple[str, str, str] | None = None  # a namespace to move to on reconnect
        self.clock_offset: float | None = None  # node clock minus `now`, once a time answer came
        self.secret: str | None = None
        self.config: dict[str, Any] = self._factory_config()
        self.sensors = list(SENSORS[node_type])
        self.seen: OrderedDict[str, None] = OrderedDict()
        self._random = random.Random(seed)
        self._values = {s[0]: s[3] for s in self.sensors}
        self._next_sensor = 0
        self._last_ms = 0

    def _factory_config(self) -> dict[str, Any]:
        """What a fresh node reports before any push (the fixture's first config_report)."""
        channels: list[dict[str, Any]] = [
            {"name": c, "channel": c, "type": "SENSOR", "metric": m, "unit": u, "poll_interval_ms": 3000}
            for c, m, u, _, _ in SENSORS[self.node_type]]
        name, kind = ACTUATORS[self.node_type]
        channels.append({"name": name, "channel": name, "type": "ACTUATOR", "actuator_type": kind,
                         "safe_limits": {"max_duration_ms": 5000, "min_off_ms": 5000}})
        return {"node_id": self.hardware_id, "version": 1, "type": self.node_type, "fw_version": FW_VERSION,
                "channels": channels, "mqtt": {"configured": True}}

    # -- where it lives --

    @property
    def base(self) -> str:
        return f"hydro/{self.gh}/{self.zone}/{self.segment}"

    def will(self) -> tuple[str, bytes]:
        return f"{self.base}/lwt", b"offline"

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(f"{self.base}/config", 1), (f"{self.base}/+/command", 1), (TIME_RESPONSE, 0)]

    @property
    def synced(self) -> bool:
        return self.clock_offset is not None

    def clock(self, now: float) -> float | None:
        return None if self.clock_offset is None else now + self.clock_offset

    def uptime(self, now: float) -> int:
        return max(0, int(now - self.booted_at))

    def move(self) -> None:
        """Take up the namespace of the applied config (called between connections)."""
        if self.pending:
            self.gh, self.zone, self.segment = self.pending
            self.pending = None

    # -- what it says --

    def on_connect(self, now: float) -> list[Out]:
        """Hello, retained status ONLINE (uptime as ts until the clock is set), the
        current config, and a time request while the clock is not set."""
        clock = self.clock(now)
        out = [Out("node_hello", HELLO_TOPIC, _json({
                   "message_type": "node_hello", "hardware_id": self.hardware_id, "node_type": self.node_type,
                   "fw_version": FW_VERSION, "capabilities": CAPABILITIES[self.node_type]})),
               Out("status", f"{self.base}/status",
                   _json({"status": "ONLINE", "ts": int(clock) if clock else self.uptime(now)}), retain=True),
               self.config_report()]
        if not self.synced:
            out.append(self.time_request(now))
        return out

    def time_request(self, now: float) -> Out:
        return Out("time_request", TIME_REQUEST, _json({"message_type": "time_request", "uptime": self.uptime(now)}))

    def config_report(self) -> Out:
        return Out("config_report", f"{self.base}/config_report", _json(self.config))

    def offline(self, now: float) -> Out:
        clock = self.clock(now)
        return Out("status", f"{self.base}/status",
                   _json({"status": "OFFLINE", "ts": int(clock) if clock else self.uptime(now)}), retain=True)

    def heartbeat(self, now: float) -> Out:
        return Out("heartbeat", f"{self.base}/heartbeat", _json({
            "uptime": self.uptime(now), "free_heap": 100_000 + self._random.randrange(0, 8_000),
            "rssi": -55 - self._random.randrange(0, 20), "fw_version": FW_VERSION}))

    def telemetry(self, now: float) -> Out | None:
        """The next sample, round-robin over the node's sensors; None before the clock is
        set. `ts` is in milliseconds and rises by at least 1 ms a sample, so several
        samples a second on one channel stay distinct rows."""
        clock = self.clock(now)
        if clock is None:
            return None
        channel, metric, unit, typical, drift = self.sensors[self._next_sensor % len(self.sensors)]
        self._next_sensor += 1
        value = self._values.get(channel, typical) + self._random.uniform(-drift, drift)
        value += (typical - value) * 0.05  # drift back towards the typical value
        self._values[channel] = value
        self._last_ms = max(self._last_ms + 1, int(clock * 1000))
        sample = {"metric_type": metric, "value": round(value, 3), "ts": self._last_ms}
        return Out("telemetry", f"{self.base}/{channel}/telemetry", _json({**sample, "unit": unit} if unit else sample))

    # -- what it hears --

    def on_time_response(self, payload: bytes, now: float) -> bool:
        """Set the clock from `unix_ts`; False for an answer it cannot read."""
        try:
            body = json.loads(payload)
            unix_ts = body["unix_ts"]
        except (ValueError, TypeError, KeyError):
            return False
        if isinstance(unix_ts, bool) or not isinstance(unix_ts, (int, float)) or not math.isfinite(unix_ts):
            return False
        self.clock_offset = unix_ts - now
        return True

    def on_config(self, payload: bytes, now: float) -> tuple[bool, list[Out]]:
        """(applied, what to publish). A config the firmware refuses (not JSON, or
        without `node_id`, `version`, `type`, `channels`, `mqtt`) is answered with an
        `error` and changes nothing. One naming another gh/zone is applied and sets
        `pending`: the node reconnects there, with its will there, and reports from
        there on connect. Otherwise it reports at once."""
        problem, config = _check_config(payload)
        if problem:
            return False, [self.error("config_invalid", problem, now)]
        self.config = config
        if isinstance(config.get("node_secret"), str):
            self.secret = config["node_secret"]
        sensors = [(c.get("channel") or c["name"], str(c["metric"]).upper(),
                    str(c.get("unit") or _TYPICAL.get(str(c["metric"]).upper(), ("",))[0]),
                    *_TYPICAL.get(str(c["metric"]).upper(), ("", 1.0, 0.01))[1:])
                   for c in config["channels"]
                   if isinstance(c, dict) and c.get("type") == "SENSOR" and isinstance(c.get("metric"), str)
                   and isinstance(c.get("channel") or c.get("name"), str)]
        self.sensors = sensors or list(SENSORS[self.node_type])
        gh, zone = config.get("gh_uid", self.gh), config.get("zone_uid", self.zone)
        segment = self.hardware_id if (gh, zone) == (TEMP_GH, TEMP_ZONE) else config["node_id"]
        if (gh, zone, segment) != (self.gh, self.zone, self.segment):
            self.pending = (gh, zone, segment)
            return True, []
        return True, [self.config_report()]

    def on_command(self, topic: str, payload: bytes, now: float) -> tuple[str, list[Out]]:
        """(outcome, answers). The firmware's check (`signing.check`: format, `ts` within
        10 s of the node's own clock, signature), then its memory of command ids: a
        cmd_id it carried out before is ignored, with no answer. A command that passes
        is answered ACK, then DONE. outcome: `done`, `ignored`, or the error code
        answered (a command without a usable cmd_id cannot be answered, only counted)."""
        channel = topic.rsplit("/", 2)[-2]
        answer_topic = f"{self.base}/{channel}/command_response"
        clock = self.clock(now)
        verdict = signing.check(payload, self.secret or "", clock if clock is not None else now)
        if isinstance(verdict, signing.Refusal):
            cmd_id = _cmd_id(payload)
            if cmd_id is None:
                return verdict.error_code, []
            return verdict.error_code, [self._response(answer_topic, cmd_id, verdict.status, now,
                                                       error_code=verdict.error_code,
                                                       error_message=verdict.message)]
        cmd_id = verdict["cmd_id"]
        if not isinstance(cmd_id, str) or not cmd_id:
            return signing.INVALID_FORMAT, []
        if cmd_id in self.seen:
            return "ignored", []
        self.seen[cmd_id] = None
        while len(self.seen) > SEEN_CMD_IDS:
            self.seen.popitem(last=False)
        return "done", [self._response(answer_topic, cmd_id, "ACK", now),
                        self._response(answer_topic, cmd_id, "DONE", now, details={"result": "ok"})]

    def _response(self, topic: str, cmd_id: str, status: str, now: float, **extra: Any) -> Out:
        return Out("command_response", topic, _json({"cmd_id": cmd_id, "status": status,
                                                     "ts": self._ms(now), **extra}))

    def error(self, code: str, message: str, now: float) -> Out:
        return Out("error", f"{self.base}/error", _json({
            "level": "ERROR", "component": "config", "error_code": code, "message": message, "ts": self._ms(now)}))

    def _ms(self, now: float) -> int:
        clock = self.clock(now)
        return int((clock if clock is not None else now - self.booted_at) * 1000)


_TYPICAL = {metric: (unit, typical, drift) for sensors in SENSORS.values() for _, metric, unit, typical, drift in sensors}
_REQUIRED = (("node_id", str, "a string"), ("version", (int, float), "a number"), ("type", str, "a string"),
             ("channels", list, "an array"), ("mqtt", dict, "an object"))


def _cmd_id(payload: bytes) -> str | None:
    """The cmd_id of a command refused before it was read in full, if it has one."""
    try:
        cmd_id = json.loads(payload).get("cmd_id")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return cmd_id if isinstance(cmd_id, str) and cmd_id else None


def _check_config(payload: bytes) -> tuple[str | None, dict[str, Any]]:
    """(problem or None, config): what the firmware refuses a NodeConfig for."""
    try:
        config = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return "not JSON", {}
    if not isinstance(config, dict):
        return "not a JSON object", {}
    for key, kind, what in _REQUIRED:
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), kind):
            return f"`{key}` must be {what}", {}
    for key in ("gh_uid", "zone_uid", "node_secret"):
        if key in config and not (isinstance(config[key], str) and config[key]):
            return f"`{key}` must be a non-empty string", {}
    if ("gh_uid" in config) != ("zone_uid" in config):
        return "`gh_uid` and `zone_uid` go together", {}
    return None, config


class Pacer:
    """Ticks evenly spaced at `rate` a second from `start`. `due(now)` says how many
    have come; if more than `catch_up_s` seconds' worth are late (the loop was held
    up), the late ones are dropped, counted in `dropped`, and the schedule restarts
    from now, so lateness never turns into a burst."""

    def __init__(self, rate: float, start: float, catch_up_s: float = 1.0) -> None:
        self.interval = 1.0 / rate if rate > 0 else math.inf
        self.next = start if rate > 0 else math.inf
        self.catch_up = max(1, int(rate * catch_up_s))
        self.dropped = 0

    def due(self, now: float) -> int:
        if now < self.next:
            return 0
        count = int((now - self.next) / self.interval) + 1
        if count > self.catch_up:
            self.dropped += count - 1
            self.next = now + self.interval
            return 1
        self.next += count * self.interval
        return count

    def wait(self, now: float) -> float:
        return max(0.0, self.next - now)


@dataclass(frozen=True)
class Options:
    nodes: int = 3
    rate: float = 1.0
    duration: float | None = None  # None: until stop()
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    prefix: str = "esp32-sim"
    heartbeat_s: float = 15.0
    time_retry_s: float = 5.0
    keepalive: int = 30
    max_backlog: int = 100  # unacknowledged messages per node before samples are skipped
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    stop_timeout_s: float = 5.0
    seed: int = 0

    def hardware_ids(self) -> list[tuple[str, str]]:
        """(hardware id, node type) per node: `{prefix}-0001` ph, `-0002` ec, `-0003` climate, ..."""
        return [(f"{self.prefix}-{i:04d}", NODE_TYPES[(i - 1) % len(NODE_TYPES)]) for i in range(1, self.nodes + 1)]


def options_error(o: Options) -> str | None:
    """What is wrong with the options, in one line; None when they can run."""
    if not 1 <= o.nodes <= 10_000:
        return f"--nodes {o.nodes}: between 1 and 10000"
    if not (math.isfinite(o.rate) and o.rate >= 0):
        return f"--rate {o.rate}: a number of messages a second, 0 or more"
    if o.duration is not None and not (math.isfinite(o.duration) and o.duration > 0):
        return f"--duration {o.duration}: seconds, more than 0"
    if not 1 <= o.port <= 65535:
        return f"--mqtt-port {o.port}: between 1 and 65535"
    if not (math.isfinite(o.heartbeat_s) and o.heartbeat_s > 0):
        return f"--heartbeat {o.heartbeat_s}: seconds, more than 0"
    if not HARDWARE_ID.fullmatch(f"{o.prefix}-0000"):
        return f"--prefix {o.prefix!r}: up to 123 characters of A-Z a-z 0-9 . _ : -"
    return None


def format_summary(s: dict[str, Any], o: Options) -> str:
    """The summary for a person (`--json` prints the dict itself)."""
    sent = s["sent"]
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(sent.items(), key=lambda kv: -kv[1]))
    commands = s["commands"]
    answered = {k: v for k, v in commands.items() if k != "ignored"}
    lines = [
        f"hydrod simulate: {s['nodes']} node(s) against {o.host}:{o.port} for {s['seconds']:.1f} s",
        f"  connected       {s['connected']} of {s['nodes']} (time set on {s['time_synced']})",
        f"  sent            {sum(sent.values())} messages, {s.get('acknowledged', 0)} acknowledged by the broker"
        + (f": {kinds}" if kinds else ""),
        f"  telemetry       {sent.get('telemetry', 0)} samples, {s['telemetry_per_s']}/s (asked {o.rate:g}/s)"
        + "".join(f", {s[k]} {label}" for k, label in (("telemetry_skipped_backlog", "skipped (broker behind)"),
                                                      ("telemetry_dropped_late", "dropped (simulator behind)"))
                  if s.get(k)),
        f"  configs applied {s.get('configs_applied', 0)}"
        + (f" (refused {s['configs_refused']})" if s.get("configs_refused") else ""),
        f"  commands        {sum(answered.values())} answered"
        + (": " + ", ".join(f"{k} {v}" for k, v in sorted(answered.items())) if answered else "")
        + f"; {commands.get('ignored', 0)} repeated cmd_id ignored",
    ]
    trouble = [f"{label} {s[k]}" for k, label in (("connect_failed", "failed connects"), ("disconnects", "lost connections"),
                                                   ("publish_failed", "failed publishes"),
                                                   ("unacknowledged_at_stop", "unacknowledged at stop"))
               if s.get(k)]
    if s.get("last_connect_error"):
        trouble.append(f"last connect error: {s['last_connect_error']}")
    if trouble:
        lines.append("  trouble         " + ", ".join(trouble))
    if s["connected"] and not s["time_synced"]:
        lines.append("  note            no node got an answer on hydro/time/response, so none sent telemetry: "
                     "is hydrod running on this broker?")
    return "\n".join(lines)


@dataclass
class Link:
    """One node's connection and what the loop knows about it."""
    node: VirtualNode
    client: mqtt.Client
    connected: bool = False
    ever_connected: bool = False
    moving: bool = False
    closing: bool = False
    refused: str | None = None  # the broker's reason for refusing the last CONNECT
    backoff: float = 0.0
    generation: int = 0
    unacked: set[int] = field(default_factory=set)


class Stats:
    """The counts behind the summary; written by the loop, read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.other: Counter[str] = Counter()
        self.commands: Counter[str] = Counter()

    def add(self, what: str, n: int = 1, to: str = "other") -> None:
        with self._lock:
            getattr(self, to)[what] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"sent": dict(self.sent), **dict(self.other), "commands": dict(self.commands)}


class Simulator:
    """N virtual nodes on one selector. `run()` blocks until the duration is over or
    `stop()` is called (from any thread or a signal handler) and returns the summary."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.stats = Stats()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._tls = self._tls_context() if options.tls else None
        now = time.time()
        self.links = [Link(VirtualNode(hw, kind, now, seed=options.seed * 100_003 + i), self._client(hw))
                      for i, (hw, kind) in enumerate(options.hardware_ids())]
        for link in self.links:
            link.client.user_data_set(link)
            link.client.connect_async(options.host, options.port, keepalive=options.keepalive)
        self._turn = 0
        self.started_at = 0.0
        self.synced_at: float | None = None
        self.ended_at = 0.0
        self.last_connect_error: str | None = None

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.options.ca_file or None)
        return context

    def _client(self, client_id: str) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=True, reconnect_on_failure=False)
        client.enable_logger()
        client.max_inflight_messages_set(self.options.max_backlog)
        client.max_queued_messages_set(0)
        if self.options.username:
            client.username_pw_set(self.options.username, self.options.password or None)
        if self._tls:
            client.tls_set_context(self._tls)
        client.on_socket_open = lambda _c, link, sock: self._selector.register(sock, selectors.EVENT_READ, link)
        client.on_socket_close = lambda _c, link, sock: self._unregister(sock)
        client.on_socket_register_write = lambda _c, link, sock: self._selector.modify(
            sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
        client.on_socket_unregister_write = lambda _c, link, sock: self._selector.modify(
            sock, selectors.EVENT_READ, link)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # -- public --

    def stop(self) -> None:
        """End the run soon; safe from any thread and from a signal handler."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def summary(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        end = self.ended_at or time.monotonic()
        sending = end - self.synced_at if self.synced_at else 0.0
        connected = sum(link.ever_connected for link in self.links)
        return {"nodes": len(self.links), "connected": connected,
                "online": sum(link.connected for link in self.links),
                "time_synced": sum(link.node.synced for link in self.links),
                "seconds": round(end - self.started_at, 3) if self.started_at else 0.0,
                "telemetry_per_s": round(snap["sent"].get("telemetry", 0) / sending, 2) if sending > 0 else 0.0,
                **snap, **({"last_connect_error": self.last_connect_error} if self.last_connect_error else {})}

    def run(self) -> dict[str, Any]:
        options = self.options
        self.started_at = time.monotonic()
        deadline = self.started_at + options.duration if options.duration else math.inf
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        log.info("simulate_started", nodes=len(self.links), rate=options.rate, duration=options.duration,
                 broker=f"{options.host}:{options.port}")
        for link in self.links:
            self._later(0.0, lambda link=link: self._connect(link))
        pacer = Pacer(options.rate, self.started_at)
        misc_at = self.started_at + 1.0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                now = time.monotonic()
                timeout = min(1.0, deadline - now, pacer.wait(now), self._timer_wait(now))
                self._poll(max(0.0, timeout))
                self._run_timers()
                self._send_telemetry(pacer.due(time.monotonic()))
                if time.monotonic() >= misc_at:
                    misc_at = time.monotonic() + 1.0
                    for link in self.links:
                        if link.client.socket() is not None:
                            link.client.loop_misc()
            self.stats.add("telemetry_dropped_late", pacer.dropped)
        finally:
            self.ended_at = time.monotonic()
            self._shut_down()
        summary = self.summary()
        log.info("simulate_stopped", **{k: v for k, v in summary.items() if k != "sent"}, sent=summary["sent"])
        return summary

    # -- the loop --

    def _poll(self, timeout: float) -> None:
        for key, mask in self._selector.select(timeout):
            link = key.data
            if link is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                continue
            client = link.client
            # A failed loop_read/loop_write closes the socket and calls _on_disconnect,
            # which retries: their return codes say nothing more.
            if mask & selectors.EVENT_READ:
                client.loop_read()
                sock = client.socket()
                while isinstance(sock, ssl.SSLSocket) and sock.pending():
                    client.loop_read()
                    sock = client.socket()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()

    def _unregister(self, sock: Any) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), action))

    def _timer_wait(self, now: float) -> float:
        return self._timers[0][0] - now if self._timers else 1.0

    def _run_timers(self) -> None:
        while self._timers and self._timers[0][0] <= time.monotonic() and not self._stop.is_set():
            _, _, action = heapq.heappop(self._timers)
            action()

    def _connect(self, link: Link) -> None:
        """A blocking TCP (and TLS) connect; CONNACK comes through the selector."""
        topic, payload = link.node.will()
        link.client.will_set(topic, payload, qos=1, retain=True)
        try:
            rc = link.client.reconnect()
        except (OSError, ValueError) as exc:
            self._retry(link, f"{type(exc).__name__}: {exc}")
            return
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._retry(link, mqtt.error_string(rc))

    def _retry(self, link: Link, why: str) -> None:
        o = self.options
        link.backoff = min(o.reconnect_max_s, max(o.reconnect_min_s, link.backoff * 2))  # min, 2 min, ... max
        delay = link.backoff * random.uniform(0.5, 1.0)
        self._later(delay, lambda: self._connect(link))
        self.stats.add("connect_failed")
        self.last_connect_error = why
        if self.stats.other["connect_failed"] == 1 or link.backoff >= o.reconnect_max_s:
            log.warning("simulate_connect_failed", node=link.node.hardware_id, error=why,
                        broker=f"{o.host}:{o.port}", retry_in_s=round(delay, 2))

    # -- paho callbacks (all on this thread) --

    def _on_connect(self, client: mqtt.Client, link: Link, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:  # the broker closes the connection: _on_disconnect retries
            link.refused = f"refused by the broker: {reason}"
            return
        link.connected, link.ever_connected, link.backoff = True, True, 0.0
        link.generation += 1
        self.stats.add("connects")
        rc, _ = client.subscribe(link.node.subscriptions())
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("simulate_subscribe_failed", node=link.node.hardware_id, error=mqtt.error_string(rc))
        now = time.time()
        self._publish(link, link.node.on_connect(now))
        generation = link.generation
        self._later(self.options.heartbeat_s * random.uniform(0.1, 1.0), lambda: self._heartbeat(link, generation))
        if not link.node.synced:
            self._later(self.options.time_retry_s, lambda: self._time_retry(link, generation))

    def _on_disconnect(self, _client: mqtt.Client, link: Link, _flags: Any, reason: Any, _props: Any) -> None:
        was_connected, link.connected = link.connected, False
        link.generation += 1
        if self._stop.is_set() or link.closing:
            return
        if not was_connected:  # refused, or lost before the CONNACK
            refused, link.refused = link.refused, None
            self._retry(link, refused or f"lost before the broker answered: {reason}")
            return
        if link.moving:  # our own clean disconnect: come back in the new namespace
            link.moving = False
            link.node.move()
            self._later(0.0, lambda: self._connect(link))  # from the loop, not inside paho's write
            return
        self.stats.add("disconnects")
        log.info("simulate_disconnected", node=link.node.hardware_id, reason=str(reason))
        self._retry(link, f"connection lost: {reason}")

    def _on_publish(self, _client: mqtt.Client, link: Link, mid: int, _reason: Any, _props: Any) -> None:
        link.unacked.discard(mid)
        self.stats.add("acknowledged")
        if link.moving and not link.unacked:
            self._disconnect(link)

    def _on_message(self, _client: mqtt.Client, link: Link, message: mqtt.MQTTMessage) -> None:
        node, topic, now = link.node, message.topic, time.time()
        if topic == TIME_RESPONSE:
            was_synced = node.synced
            if node.on_time_response(message.payload, now) and not was_synced:
                self.synced_at = self.synced_at or time.monotonic()
            return
        if topic.endswith("/config"):
            applied, out = node.on_config(message.payload, now)
            self.stats.add("configs_applied" if applied else "configs_refused")
            log.info("simulate_config_applied" if applied else "simulate_config_refused",
                     node=node.hardware_id, version=node.config.get("version"),
                     moving_to=f"{node.pending[0]}/{node.pending[1]}" if node.pending else None)
            self._publish(link, out)
            if node.pending:
                link.moving = True
                if not link.unacked:
                    self._disconnect(link)
            return
        if topic.endswith("/command"):
            outcome, out = node.on_command(topic, message.payload, now)
            self.stats.add(outcome, to="commands")
            log.info("simulate_command", node=node.hardware_id, outcome=outcome)
            self._publish(link, out)

    # -- sending --

    def _publish(self, link: Link, out: list[Out]) -> None:
        for message in out:
            info = link.client.publish(message.topic, message.payload, qos=1, retain=message.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self.stats.add("publish_failed")
                continue
            link.unacked.add(info.mid)
            self.stats.add(message.kind, to="sent")

    def _heartbeat(self, link: Link, generation: int) -> None:
        if link.generation != generation or not link.connected:
            return
        if not link.moving:
            self._publish(link, [link.node.heartbeat(time.time())])
        self._later(self.options.heartbeat_s, lambda: self._heartbeat(link, generation))

    def _time_retry(self, link: Link, generation: int) -> None:
        if link.generation != generation or not link.connected or link.node.synced:
            return
        self._publish(link, [link.node.time_request(time.time())])
        self._later(self.options.time_retry_s, lambda: self._time_retry(link, generation))

    def _send_telemetry(self, ticks: int) -> None:
        count = len(self.links)
        for _ in range(ticks):
            for step in range(count):  # the next node, in turn, that may send
                link = self.links[(self._turn + step) % count]
                if link.connected and not link.moving and link.node.synced:
                    if len(link.unacked) >= self.options.max_backlog:
                        self.stats.add("telemetry_skipped_backlog")
                    else:
                        self._publish(link, [link.node.telemetry(time.time())])
                    self._turn = (self._turn + step + 1) % count
                    break

    def _disconnect(self, link: Link) -> None:
        rc = link.client.disconnect()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("simulate_disconnect_failed", node=link.node.hardware_id, error=mqtt.error_string(rc))

    def _shut_down(self) -> None:
        """Each connected node says OFFLINE (retained) and leaves cleanly once what it
        sent is acknowledged, or after stop_timeout_s."""
        self._stop.set()
        now = time.time()
        for link in self.links:
            link.closing = True
            if link.connected:
                self._publish(link, [link.node.offline(now)])
        deadline = time.monotonic() + self.options.stop_timeout_s
        while any(link.connected and link.unacked for link in self.links) and time.monotonic() < deadline:
            self._poll(0.05)
        unacked = sum(len(link.unacked) for link in self.links if link.connected)
        if unacked:
            self.stats.add("unacknowledged_at_stop", unacked)
        for link in self.links:
            if link.client.socket() is not None:
                link.client.disconnect()
        while any(link.client.socket() is not None for link in self.links) and time.monotonic() < deadline + 1:
            self._poll(0.05)
        for link in self.links:
            sock = link.client.socket()
            if sock is not None:  # the broker did not take our DISCONNECT in time
                self._unregister(sock)
                sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
