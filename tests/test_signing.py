"""signing.py: the firmware's canonical form, the HMAC, and the node's check (SPEC §7).

Every expected string and digest below is written out by hand: the canonical forms as a
C program with cJSON 1.7.13's `print_number` logic and glibc's printf prints them, the
digests as `openssl dgst -sha256 -hmac KEY` computes them over the canonical string.
"""

import json

import pytest

from hydrod import signing

NOW = 1764460800


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        (1.0, "1"),
        (1, "1"),
        (-0.0, "0"),
        (1e20, "1e+20"),
        (1e-7, "1e-07"),
        (0.1, "0.1"),
        (5.86, "5.86"),
        (100.5, "100.5"),
        (1 / 3, "0.33333333333333331"),
        (2**31 - 1, "2147483647"),
        (2**31, "2147483648"),
        (-(2**31), "-2147483648"),
        (-(2**31) - 1, "-2147483649"),
        (1e14, "100000000000000"),
        (10**15, "1e+15"),
        (123456789012345678, "1.2345678901234568e+17"),
        (12345678901234567890, "1.2345678901234567e+19"),
        (-1.5e-300, "-1.5e-300"),
        # cJSON's compare_double accepts the 15-digit form within one epsilon:
        (0.30000000000000004, "0.3"),
        (1.0000000000000002, "1"),
        (2**53 + 1, "9.00719925474099e+15"),
    ],
)
def test_a_number_prints_as_cjson_prints_the_double_the_firmware_parsed(value, printed):
    assert signing.canonical(value) == printed.encode()


def test_an_object_prints_with_its_keys_sorted_at_every_level_and_no_whitespace():
    value = {"z": [1.0, {"b": True, "a": None}], "a": {"y": False, "x": "s"}, "m": []}
    assert signing.canonical(value) == b'{"a":{"x":"s","y":false},"m":[],"z":[1,{"a":null,"b":true}]}'


def test_keys_sort_by_their_utf8_bytes():
    assert signing.canonical({"é": 1, "z": 2, "Z": 3, "_": 4}) == '{"Z":3,"_":4,"z":2,"é":1}'.encode()


def test_non_ascii_stays_raw_utf8_and_control_characters_are_escaped_as_cjson_does():
    value = {"s": 'pH é ✓ 🌱 "q" \\ / \b\f\n\r\t \x01\x1f \x7f'}
    expected = '{"s":"pH é ✓ 🌱 \\"q\\" \\\\ / \\b\\f\\n\\r\\t \\u0001\\u001f \x7f"}'
    assert signing.canonical(value) == expected.encode("utf-8")


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"a": float("nan")}, "$.a is not a finite number"),
        ({"a": [float("inf")]}, "$.a[0] is not a finite number"),
        ({"a": {"b": 10**400}}, "$.a.b is beyond the range of a double"),
        ({"s": "a\x00b"}, "$.s holds a NUL character"),
        ({"s": "\ud800"}, "$.s holds a lone surrogate"),
    ],
)
def test_a_value_the_firmware_could_not_print_back_is_refused_naming_where_it_sits(value, where):
    with pytest.raises(signing.Unsignable, match=where.replace("$", r"\$").replace("[", r"\[")):
        signing.canonical(value)


def test_the_signature_is_the_hmac_of_the_canonical_form_keyed_by_the_secret():
    body = {"ts": NOW, "params": {"ml": 1.5}, "cmd_id": "c-1", "cmd": "dose"}
    # openssl over '{"cmd":"dose","cmd_id":"c-1","params":{"ml":1.5},"ts":1764460800}', key 'ab12'
    assert signing.sign("ab12", body) == "487f59fea3c25b05a20793b2ba1bc72ae0d179f4f00814e3453cc541aeb213be"


def test_a_signed_payload_prints_exponents_integers_and_unicode_as_the_firmware_does():
    secret = "a" * 64
    payload = signing.signed_payload(secret, "set", "c-2", {"d": "é", "c": 1.0, "b": 1e-7, "a": 1e20}, NOW)
    # openssl over '{"cmd":"set","cmd_id":"c-2","params":{"a":1e+20,"b":1e-07,"c":1,"d":"é"},"ts":1764460800}'
    sig = "b07e3d560b8ae0e4ab4fa565fcd5ab19fe01c478e1bc4dd98a1b42615980841a"
    expected = '{"cmd":"set","cmd_id":"c-2","params":{"a":1e+20,"b":1e-07,"c":1,"d":"é"},"sig":"' + sig + '","ts":1764460800}'
    assert payload == expected.encode("utf-8")


def test_a_published_number_prints_the_same_under_an_exact_reading_of_the_rule():
    # 0.30000000000000004 is published as 0.3: the node parses 0.3, whose 15-digit form
    # reads back exactly, so a node on an older cJSON (exact `!=`) signs the same bytes.
    payload = signing.signed_payload("k", "c", "i", {"x": 0.1 + 0.2, "y": 2**53 + 1}, NOW)
    params = json.loads(payload)["params"]
    assert params == {"x": 0.3, "y": 9007199254740990}
    assert "%.15g" % params["x"] == "0.3" and float("%.15g" % params["y"]) == params["y"]


def test_the_node_accepts_a_correctly_signed_command_within_ten_seconds():
    payload = signing.signed_payload("s" * 64, "dose", "c-3", {"ml": 2.5}, NOW)
    for now in (NOW - 10, NOW, NOW + 10.9):
        assert signing.check(payload, "s" * 64, now) == json.loads(payload)


@pytest.mark.parametrize("now", [NOW - 11, NOW + 11])
def test_the_node_refuses_a_timestamp_more_than_ten_seconds_from_its_clock(now):
    payload = signing.signed_payload("s" * 64, "dose", "c-3", {}, NOW)
    refusal = signing.check(payload, "s" * 64, now)
    assert (refusal.status, refusal.error_code) == ("ERROR", "timestamp_expired")


def test_the_node_refuses_another_secret_or_a_changed_parameter_as_invalid_signature():
    payload = signing.signed_payload("s" * 64, "dose", "c-3", {"ml": 2.5}, NOW)
    assert signing.check(payload, "t" * 64, NOW).error_code == "invalid_signature"
    tampered = payload.replace(b'"ml":2.5', b'"ml":25')
    assert signing.check(tampered, "s" * 64, NOW).error_code == "invalid_signature"


def test_the_node_checks_the_canonical_form_not_the_bytes_it_received():
    body = {"cmd": "dose", "cmd_id": "c-1", "params": {"ml": 1.5}, "ts": NOW}
    body["sig"] = "487f59fea3c25b05a20793b2ba1bc72ae0d179f4f00814e3453cc541aeb213be"
    spaced = json.dumps(dict(reversed(body.items())), indent=2).replace("1.5", "1.50").encode()
    assert signing.check(spaced, "ab12", NOW)["cmd_id"] == "c-1"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"cmd":"x","cmd_id":"i","params":{},"ts":1764460800}',
        b'{"cmd":"x","cmd_id":"i","params":{},"ts":1764460800,"sig":"00","extra":1}',
        b'{"cmd":"x","cmd_id":"i","params":[],"ts":1764460800,"sig":"00"}',
        b'{"cmd":"x","cmd_id":"i","params":{},"ts":"1764460800","sig":"00"}',
        b"[1]",
        b"not json",
    ],
)
def test_the_node_refuses_anything_but_exactly_the_five_keys_as_invalid(payload):
    refusal = signing.check(payload, "k", NOW)
    assert (refusal.status, refusal.error_code) == ("INVALID", "invalid_format")
