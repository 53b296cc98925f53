"""The wire protocol of SPEC §1-§2: topics, payload shapes and their rules.

Everything here is pure and cheap: it runs once per message on the hot path.
"""

from __future__ import annotations

import decimal
import functools
import math
import re
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

PREFIX = "hydro"
TEMP_GH = "gh-temp"
TEMP_ZONE = "zn-temp"
MAX_PAYLOAD = 64 * 1024

# What hydrod subscribes to (SPEC §1), all at QoS 1.
SUBSCRIPTIONS = (
    "hydro/node_hello",
    "hydro/+/+/+/node_hello",
    "hydro/+/+/+/+/telemetry",
    "hydro/+/+/+/heartbeat",
    "hydro/+/+/+/status",
    "hydro/+/+/+/lwt",
    "hydro/+/+/+/config_report",
    "hydro/time/request",
    "hydro/+/+/+/+/command_response",
    "hydro/+/+/+/error",
    "hydro/+/+/+/diagnostics",
    "hydro/+/+/+/+/event",
)
TIME_RESPONSE_TOPIC = "hydro/time/response"

# Message kinds. Node-level topics have five segments, channel-level six.
HELLO = "node_hello"
TELEMETRY = "telemetry"
HEARTBEAT = "heartbeat"
STATUS = "status"
LWT = "lwt"
CONFIG_REPORT = "config_report"
TIME_REQUEST = "time_request"
COMMAND_RESPONSE = "command_response"
REJECT = "reject"
NODE_KINDS = frozenset({HELLO, HEARTBEAT, STATUS, LWT, CONFIG_REPORT, "error", "diagnostics"})
CHANNEL_KINDS = frozenset({TELEMETRY, "command_response", "event"})
EVENT_KINDS = frozenset({"command_response", "error", "diagnostics", "event"})
# Event kinds whose `ts` is in milliseconds (SPEC §2).
MS_KINDS = frozenset({"command_response", "error"})

# Reasons a message is dead-lettered; each is a label of the rejection counter.
TOO_LARGE = "too_large"
BAD_ENCODING = "bad_encoding"
BAD_JSON = "bad_json"
BAD_PAYLOAD = "bad_payload"
UNKNOWN_TOPIC = "unknown_topic"
UNKNOWN_NODE = "unknown_node"
ZONE_MISMATCH = "zone_mismatch"
HANDLER_CRASH = "handler_crash"
STORE_REFUSED = "store_refused"

# A topic segment (gh, zone, node, channel): what a uid, a hardware id or a channel
# name may be. The one rule for topics, here and in the API, the config and the SQL.
SEGMENT_CHARS = "A-Za-z0-9._:-"
SEGMENT_MAX = 128
_SEGMENT = re.compile(f"[{SEGMENT_CHARS}]{{1,{SEGMENT_MAX}}}")


def is_segment(value: str) -> bool:
    """Whether `value` can stand as one segment of a topic."""
    return _SEGMENT.fullmatch(value) is not None


class Routed(NamedTuple):
    """One received MQTT message, classified by its topic.

    A NamedTuple rather than a dataclass: one is built per message on the hot
    path, and a tuple costs a fifth of a frozen dataclass.
    """

    seq: int  # arrival order; MqttIo acknowledges in this order
    kind: str
    gh: str
    zone: str
    node: str  # the node segment: a uid, or a hardware id
    channel: str | None
    topic: str
    payload: bytes
    received_at: float  # unix seconds
    reason: str | None = None  # set when kind == REJECT
    detail: str = ""  # what was wrong, for the dead letter
    mid: int = 0  # the broker's packet id; 0 for QoS 0
    dup: bool = False  # the broker's DUP flag: a redelivery of a PUBLISH it sent before

    def __repr__(self) -> str:
        # Never the payload: a config_report may echo the node's secret, and a
        # message's repr is what a crash report logs.
        return (f"Routed(seq={self.seq}, kind={self.kind!r}, topic={self.topic!r}, "
                f"payload=<{len(self.payload)} bytes>, reason={self.reason!r})")


def classify(seq: int, topic: str, payload: bytes, received_at: float, mid: int = 0, dup: bool = False) -> Routed:
    """Turn a topic into a kind and its parts; unknown shapes become rejects."""
    if len(payload) > MAX_PAYLOAD:
        # Keep the first 64 KiB as evidence, not the whole thing: memory is bounded
        # by message count (Receive Maximum), so no message may be arbitrarily large.
        return Routed(seq, REJECT, "", "", "", None, topic, payload[:MAX_PAYLOAD], received_at, TOO_LARGE,
                      f"payload of {len(payload)} bytes, over {MAX_PAYLOAD}; the first {MAX_PAYLOAD} kept", mid, dup)
    shape = parse_topic(topic)
    return Routed(seq, *shape, topic, payload, received_at, UNKNOWN_TOPIC if shape[0] == REJECT else None, "",
                  mid, dup)


class Topic(NamedTuple):
    kind: str  # REJECT: not a topic of SPEC §1
    gh: str
    zone: str
    node: str  # a uid, or a hardware id; "" where the topic names no node
    channel: str | None


@functools.lru_cache(maxsize=65536)
def parse_topic(topic: str) -> Topic:
    """A received topic's kind and segments; a node sends on a handful of topics,
    so each is parsed and checked once."""
    parts = topic.split("/")
    n = len(parts)
    if n == 5 and parts[0] == PREFIX and parts[4] in NODE_KINDS:
        kind, channel = parts[4], None
    elif n == 6 and parts[0] == PREFIX and parts[5] in CHANNEL_KINDS:
        kind, channel = parts[5], parts[4]
        if not is_segment(channel):
            return _NOT_OURS
    elif topic == "hydro/node_hello":
        return Topic(HELLO, "", "", "", None)
    elif topic == "hydro/time/request":
        return Topic(TIME_REQUEST, "", "", "", None)
    else:
        return _NOT_OURS
    gh, zone, node = parts[1], parts[2], parts[3]
    if not (is_segment(gh) and is_segment(zone) and is_segment(node)):
        return _NOT_OURS
    return Topic(kind, gh, zone, node, channel)


_NOT_OURS = Topic(REJECT, "", "", "", None)


def config_topic(gh: str, zone: str, node: str) -> str:
    """Where a node gets its config: its own namespace, under its uid."""
    return f"{PREFIX}/{gh}/{zone}/{node}/config"


def temp_config_topic(hardware_id: str) -> str:
    """Where an unbound (or reset) node gets its config: the temp namespace, under its hardware id."""
    return config_topic(TEMP_GH, TEMP_ZONE, hardware_id)



def is_temp(gh: str, zone: str) -> bool:
    return gh == TEMP_GH and zone == TEMP_ZONE


class Rejected(Exception):
    """A payload that breaks the rules; `reason` is a dead-letter reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- payloads ---------------------------------------------------------------

HardwareId = Annotated[str, msgspec.Meta(min_length=1, max_length=SEGMENT_MAX, pattern=f"^[{SEGMENT_CHARS}]+\\Z")]


class ProvisioningMeta(msgspec.Struct):
    node_uid: str | None = None
    node_name: str | None = None


class NodeHello(msgspec.Struct):
    message_type: Literal["node_hello"]
    hardware_id: HardwareId
    node_type: str | None = None
    fw_version: str | None = None
    capabilities: list[str] | None = None  # absent: a repeat hello keeps the stored ones
    hardware_revision: str | None = None
    provisioning_meta: ProvisioningMeta | None = None


class Telemetry(msgspec.Struct):
    metric_type: Annotated[str, msgspec.Meta(min_length=1, max_length=50)]
    value: float
    ts: float | None = None


# Each field as its column in `nodes` (migrations/001_initial.sql) holds it.
BIGINT_MAX = 2 ** 63 - 1


class Heartbeat(msgspec.Struct):
    uptime: Annotated[float, msgspec.Meta(ge=0)] | None = None  # seconds, double precision
    free_heap: Annotated[int, msgspec.Meta(ge=0, le=BIGINT_MAX)] | None = None  # bytes, bigint
    # dBm, integer: the ESP-IDF reports it as an int8_t, so anything outside is no reading.
    rssi: Annotated[int, msgspec.Meta(ge=-128, le=127)] | None = None
    fw_version: str | None = None


class Status(msgspec.Struct):
    status: str | None = None  # absent in a safe-mode report: kept as an event
    ts: float | None = None


_decoders: dict[type, msgspec.json.Decoder] = {
    t: msgspec.json.Decoder(t) for t in (NodeHello, Telemetry, Heartbeat, Status)
}
_any = msgspec.json.Decoder()
_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])


def decode(payload: bytes, shape: type):
    """Decode and validate a JSON payload, or raise Rejected naming what is wrong.

    What passes can be stored: each field the shape names is checked against its
    column, and the whole payload, which is kept as jsonb, against what jsonb
    holds (see _unstorable). The whole payload must also be UTF-8: msgspec does
    not look inside the keys it skips."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(BAD_ENCODING, f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        if shape is dict:
            value = _any.decode(payload)
        else:
            value = _decoders[shape].decode(payload)
            _any.decode(payload)  # the keys the shape skips: a number beyond a double
    except msgspec.ValidationError as exc:
        raise Rejected(BAD_PAYLOAD, _unstorable(payload) or str(exc)) from None
    except msgspec.DecodeError as exc:
        raise Rejected(BAD_JSON, str(exc)) from None
    except RecursionError:
        raise Rejected(BAD_JSON, "JSON nested too deeply") from None
    if shape is dict and not isinstance(value, dict):
        raise Rejected(BAD_PAYLOAD, "payload is not a JSON object")
    # Cheap tests first: a NUL character is only ever written `\u0000`, and a number with
    # more decimals than numeric holds needs a negative exponent or 16 KiB of digits.
    if (b"\\u0000" in payload or b"e-" in payload or b"E-" in payload
            or len(payload) > NUMERIC_DSCALE_MAX):
        problem = _unstorable(payload)
        if problem:
            raise Rejected(BAD_PAYLOAD, problem)
    return value


def decode_object(payload: bytes) -> dict:
    """A payload that must be a JSON object, kept whole (config_report, events)."""
    return decode(payload, dict)


# PostgreSQL's numeric, behind every jsonb number, keeps at most this many digits
# after the decimal point (and 131072 before it, more than a 64 KiB payload holds).
NUMERIC_DSCALE_MAX = 16383
# A JSON string (skipped whole), or a number: exact on JSON that msgspec accepted.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|(-?[0-9][0-9.eE+-]*)')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # used with fullmatch


def _unstorable(payload: bytes) -> str | None:
    """What in valid JSON PostgreSQL's jsonb would refuse, and where; None if nothing.

    The rules: every number fits a double (1e400 does not: it is out of range, as
    NaN and Infinity are not JSON), and numeric (at most 16383 digits after the
    decimal point); no string and no key holds a NUL character, which jsonb
    cannot store. Slow, and only called for a payload that may break them."""
    try:
        fields = [(_path(key), key, bytes(raw)) for key, raw in _fields.decode(payload).items()]
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        fields = [("$", "", payload)]  # not an object: look at it whole
    for path, key, raw in fields:
        if "\x00" in key:
            return "a key holds a NUL character (\\u0000) - at `$`"
        try:
            value = _any.decode(raw)
        except msgspec.ValidationError:
            return f"a number is out of range (beyond a double) - at `{path}`"
        except (msgspec.DecodeError, RecursionError):
            continue  # the caller reports it
        if b"\\u0000" in raw and holds_nul(value):
            return f"a string holds a NUL character (\\u0000) - at `{path}`"
        for number in _TOKEN.findall(raw):
            if number and -decimal.Decimal(number.decode()).as_tuple().exponent > NUMERIC_DSCALE_MAX:
                return (f"a number has more than {NUMERIC_DSCALE_MAX} digits after the decimal point,"
                        f" more than PostgreSQL holds - at `{path}`")
    return None


def _path(key: str) -> str:
    """A top-level key as msgspec names a field: `$.rssi`, or `$["odd key"]` (64 characters at most)."""
    return f"$.{key}" if _NAME.fullmatch(key) else f"$[{msgspec.json.encode(key[:64]).decode()}]"


def holds_nul(value) -> bool:
    """Whether a decoded JSON value has a NUL character in any string or key
    (PostgreSQL's text and jsonb refuse it). It looks at the decoded text: the
    escaped backslash in `"\\\\u0000"` is text, not a NUL. No recursion: the
    nesting depth is the sender's choice."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# --- time rules (SPEC §2) ---------------------------------------------------

MS_THRESHOLD = 1e12
UPTIME_THRESHOLD = 1e9
MAX_FUTURE_S = 300.0

TS_OK = None
TS_MISSING = "missing"
TS_UPTIME = "uptime"
TS_FUTURE = "future"


def normalise_ts(ts: float | None, received_at: float, milliseconds: bool = False) -> tuple[float, str | None]:
    """Return (unix seconds, replacement reason or None) for a node's `ts`."""
    if ts is None:
        return received_at, TS_MISSING
    try:
        ts = float(ts)  # an int of 400 digits is valid JSON, and no time
    except OverflowError:
        return received_at, TS_MISSING
    if not math.isfinite(ts):
        return received_at, TS_MISSING
    if milliseconds or ts > MS_THRESHOLD:
        # A millisecond field still holding uptime-ms is caught by the rule below.
        ts = ts / 1000.0
    if ts < UPTIME_THRESHOLD:
        return received_at, TS_UPTIME
    if ts > received_at + MAX_FUTURE_S:
        return received_at, TS_FUTURE
    return ts, TS_OK


# --- node identity (SPEC §2) -----------------------------------------------

NODE_TYPES = frozenset({"ph", "ec", "climate", "irrig", "light", "relay", "water_sensor", "recirculation"})
UID_PREFIX = {
    "ph": "ph", "ec": "ec", "climate": "clim", "irrig": "irr", "light": "light",
    "relay": "relay", "water_sensor": "water", "recirculation": "recirc",
}
_PROVISIONED_UID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # used with fullmatch


def normalise_type(node_type: str | None) -> str:
    value = (node_type or "").strip().lower()
    return value if value in NODE_TYPES else "unknown"


def base_uid(hardware_id: str, node_type: str) -> str:
    """`esp32-a1b2c3d4e5f6` as a ph node is `nd-ph-a1b2c3d4e5f6`."""
    core = hardware_id.lower()
    for char in ":-_":
        core = core.replace(char, "")
    if core.startswith("esp32"):
        core = core[len("esp32"):]
    return f"nd-{UID_PREFIX.get(node_type, 'node')}-{core[:12]}"


def provisioned_uid(hello: NodeHello) -> str | None:
    meta = hello.provisioning_meta
    if meta and meta.node_uid and _PROVISIONED_UID.fullmatch(meta.node_uid):
        return meta.node_uid
    return None


class _Names(msgspec.Struct):
    hardware_id: Any = None  # node_hello
    node_type: Any = None  # node_hello
    provisioning_meta: Any = None  # node_hello: {"node_uid": ...}
    node_id: Any = None  # config_report


_names = msgspec.json.Decoder(_Names)


def node_names(routed: Routed) -> tuple[str, ...]:
    """The names a node_hello or config_report may give its node in its topics.

    Its topic's node segment, and what its payload names: a hello's hardware id,
    the uid it derives from it (`base_uid`: a node whose config survived a database
    reset sends under it right after its hello) and its provisioned uid; a
    config_report's `node_id`. Cheap, and never raises: a payload the registry
    will refuse names what it can."""
    names = [routed.node] if routed.node else []
    try:
        said = _names.decode(routed.payload)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return tuple(names)
    meta, hardware_id = said.provisioning_meta, said.hardware_id
    derived = None
    if isinstance(hardware_id, str) and hardware_id:
        derived = base_uid(hardware_id, normalise_type(said.node_type if isinstance(said.node_type, str) else None))
    for name in (hardware_id, derived, meta.get("node_uid") if isinstance(meta, dict) else None, said.node_id):
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return tuple(names)

def time_response(now: float) -> bytes:
    second = int(now)
    return msgspec.json.encode({"message_type": "time_response", "unix_ts": second, "server_time": second})
