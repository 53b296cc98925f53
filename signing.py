"""Signed commands (SPEC §7): the firmware's canonical JSON, the HMAC over it, and the
check a node makes of each command it receives.

One place for the rule: hydrod signs with it, and the node double in the tests and
`hydrod simulate` check with it, so a change here is a change everywhere.

The firmware parses every JSON number into a double and prints it as cJSON's
`print_number` does (cJSON 1.7.13 and later, the one ESP-IDF ships):

- a double equal to its `int` cast (cJSON's `valueint`, which saturates at INT_MIN and
  INT_MAX) prints as that integer: `1.0` is `1`, `-0.0` is `0`, `2147483647` is
  `2147483647`, but `2147483648` (2^31) goes on to `%.15g`;
- otherwise `%1.15g`, unless that reads back as a double "different" from the original,
  in which case `%1.17g`. cJSON's "different" is `compare_double`:
  `|a - b| > max(|a|, |b|) * DBL_EPSILON`, about one unit in the last place, not `!=`.
  So `0.30000000000000004` prints `0.3` and `2^53 + 1` (a double 2^53) prints
  `9.00719925474099e+15`, while `1/3` prints `0.33333333333333331`.

SPEC §7 words the last rule as "when %.15g does not read back the same double". The two
readings differ only for doubles whose 15-digit form is within that one unit. hydrod
publishes every command in canonical form (`signed_payload`), so the number the node
parses is the 15-digit one, which reads back exactly and prints the same under either
reading: a node built on an older cJSON (exact `!=`) checks the same signature.

Integers are doubles to the firmware: an integer beyond 2^53 is rounded to the nearest
double first, as `strtod` does, and one beyond the double range cannot be signed
(cJSON would print `null`). NaN and infinities are not JSON and cannot be signed either.
Strings are escaped as cJSON does (`"`, `\\`, `\\b \\f \\n \\r \\t`, other control
characters as `\\u00xx`), everything else, non-ASCII included, as raw UTF-8. A string
holding NUL (C strings end there) or a lone surrogate (not UTF-8) cannot be signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import sys
from dataclasses import dataclass

KEYS = frozenset({"cmd", "cmd_id", "params", "ts", "sig"})
TS_WINDOW_S = 10

INT_MIN = -(2**31)
INT_MAX = 2**31 - 1

# Error codes a node answers with (status ERROR or INVALID).
INVALID_SIGNATURE = "invalid_signature"
TIMESTAMP_EXPIRED = "timestamp_expired"
INVALID_FORMAT = "invalid_format"


class Unsignable(ValueError):
    """A value the firmware could not print back as it was given. The message names
    where it sits (`$.params.x`)."""


def canonical(obj) -> bytes:
    """`obj` (a JSON value as Python: dict, list, str, int, float, bool, None) printed
    as the firmware prints it: keys sorted at every level, no whitespace."""
    parts: list[str] = []
    _print(obj, parts, "$")
    return "".join(parts).encode("utf-8")


def sign(secret: str, payload_without_sig: dict) -> str:
    """Lowercase hex HMAC-SHA256 over the canonical form, keyed by the secret's UTF-8."""
    return hmac.new(secret.encode("utf-8"), canonical(payload_without_sig), hashlib.sha256).hexdigest()


def signed_payload(secret: str, cmd: str, cmd_id: str, params: dict, ts: int) -> bytes:
    """The bytes to publish: the command with its `sig`, itself in canonical form (see
    the module's note on why canonical and not merely valid JSON)."""
    body = {"cmd": cmd, "cmd_id": cmd_id, "params": params, "ts": ts}
    body["sig"] = sign(secret, body)
    return canonical(body)


def number(value: float | int) -> str:
    """One number as cJSON's `print_number` prints it (see the module's note)."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a number here")
    try:
        d = float(value)
    except OverflowError:
        raise Unsignable("is beyond the range of a double") from None
    if not math.isfinite(d):
        raise Unsignable("is not a finite number")
    if d >= INT_MAX:
        valueint = INT_MAX
    elif d <= INT_MIN:
        valueint = INT_MIN
    else:
        valueint = int(d)  # C's cast truncates toward zero, as int() does
    if d == valueint:
        return str(valueint)
    text = "%1.15g" % d
    if not _same_double(float(text), d):
        text = "%1.17g" % d
    return text


def _same_double(a: float, b: float) -> bool:
    """cJSON's `compare_double`: equal within one epsilon of the larger magnitude."""
    return abs(a - b) <= max(abs(a), abs(b)) * sys.float_info.epsilon


def _print(obj, out: list[str], path: str) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, (int, float)):
        try:
            out.append(number(obj))
        except Unsignable as exc:
            raise Unsignable(f"{path} {exc}") from None
    elif isinstance(obj, str):
        out.append(_string(obj, path))
    elif isinstance(obj, dict):
        out.append("{")
        for i, key in enumerate(sorted(obj)):
            if not isinstance(key, str):
                raise Unsignable(f"{path} has a key that is not a string")
            if i:
                out.append(",")
            out.append(_string(key, path))
            out.append(":")
            _print(obj[key], out, f"{path}.{key}")
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _print(item, out, f"{path}[{i}]")
        out.append("]")
    else:
        raise Unsignable(f"{path} is a {type(obj).__name__}, not a JSON value")


def _string(text: str, path: str) -> str:
    if "\x00" in text:
        raise Unsignable(f"{path} holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Unsignable(f"{path} holds a lone surrogate, which is not UTF-8") from None
    # json's escaping with ensure_ascii=False is cJSON's: the same characters, the same
    # lowercase \u00xx for the other control characters, and raw UTF-8 for the rest.
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class Refusal:
    """Why a node refuses a command, as it answers: `status` and `error_code`."""

    status: str
    error_code: str
    message: str


def check(payload: bytes, secret: str, now: float) -> dict | Refusal:
    """What the firmware does with a received command: the parsed command when it is
    well formed, within `TS_WINDOW_S` of the node's clock `now` and correctly signed;
    otherwise the refusal the node answers with."""
    try:
        command = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return Refusal("INVALID", INVALID_FORMAT, "not JSON")
    if not isinstance(command, dict) or set(command) != KEYS:
        return Refusal("INVALID", INVALID_FORMAT, f"keys must be exactly {sorted(KEYS)}")
    ts, sig = command["ts"], command["sig"]
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not isinstance(sig, str):
        return Refusal("INVALID", INVALID_FORMAT, "ts must be a number and sig a string")
    if not isinstance(command["params"], dict) or not isinstance(command["cmd"], str):
        return Refusal("INVALID", INVALID_FORMAT, "params must be an object and cmd a string")
    if abs(int(now) - ts) > TS_WINDOW_S:
        return Refusal("ERROR", TIMESTAMP_EXPIRED, f"ts {ts} is more than {TS_WINDOW_S} s from {int(now)}")
    unsigned = {key: value for key, value in command.items() if key != "sig"}
    try:
        expected = sign(secret, unsigned)
    except Unsignable as exc:
        return Refusal("INVALID", INVALID_FORMAT, str(exc))
    if not hmac.compare_digest(expected, sig):
        return Refusal("ERROR", INVALID_SIGNATURE, "signature does not match")
    return command
