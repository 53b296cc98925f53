"""The pure rules of the wire protocol (SPEC §1-§2)."""

import pytest

from hydrod import protocol
from hydrod.core.arrivals import Inbound
from hydrod.protocol import NodeHello, Rejected, Telemetry

NOW = 1_764_400_000.0


@pytest.mark.parametrize("hardware_id, node_type, uid", [
    ("esp32-a1b2c3d4e5f6", "ph", "nd-ph-a1b2c3d4e5f6"),
    ("esp32-78e36ddde468", "climate", "nd-clim-78e36ddde468"),
    ("esp32-0a1b2c3d4e5f", "unknown", "nd-node-0a1b2c3d4e5f"),
    ("ESP32:A1:B2:C3:D4:E5:F6", "ec", "nd-ec-a1b2c3d4e5f6"),
    ("esp32_0011223344556677", "irrig", "nd-irr-001122334455"),
    ("node-7", "water_sensor", "nd-water-node7"),
    ("esp32-abc", "recirculation", "nd-recirc-abc"),
    ("esp32-abc", "light", "nd-light-abc"),
    ("esp32-abc", "relay", "nd-relay-abc"),
])
def test_a_node_uid_is_derived_from_its_hardware_id_and_type(hardware_id, node_type, uid):
    assert protocol.base_uid(hardware_id, node_type) == uid


@pytest.mark.parametrize("given, expected", [
    ("ph", "ph"), ("PH", "ph"), ("climate", "climate"), ("pump", "unknown"), (None, "unknown"),
    ("water_sensor", "water_sensor"), ("", "unknown"),
])
def test_a_node_type_is_normalised_to_the_known_set(given, expected):
    assert protocol.normalise_type(given) == expected


def test_a_valid_provisioned_uid_wins_and_an_invalid_one_is_ignored():
    good = protocol.decode(b'{"message_type":"node_hello","hardware_id":"esp32-1",'
                           b'"provisioning_meta":{"node_uid":"tank-3"}}', NodeHello)
    bad = protocol.decode(b'{"message_type":"node_hello","hardware_id":"esp32-1",'
                          b'"provisioning_meta":{"node_uid":"Tank 3!"}}', NodeHello)
    assert protocol.provisioned_uid(good) == "tank-3"
    assert protocol.provisioned_uid(bad) is None


@pytest.mark.parametrize("payload, names", [
    (b'{"message_type":"node_hello","hardware_id":"esp32-a1","node_type":"ph"}', ("esp32-a1", "nd-ph-a1")),
    (b'{"hardware_id":"esp32-a1","provisioning_meta":{"node_uid":"tank-3"}}', ("esp32-a1", "nd-node-a1", "tank-3")),
    (b'{"node_id":"nd-ph-a1","version":3}', ("nd-ph-a1",)),
    (b'{"hardware_id":7,"provisioning_meta":"x"}', ()),  # wrong types name nothing
    (b"not json", ()),
    (b"[1, 2]", ()),
])
def test_registry_work_names_its_node_as_its_topic_and_payload_do(payload, names):
    hello = protocol.classify(1, "hydro/node_hello", payload, NOW)
    assert protocol.node_names(hello) == names
    report = protocol.classify(2, "hydro/gh-1/zn-1/esp32-a1/config_report", payload, NOW)
    assert protocol.node_names(report) == tuple(dict.fromkeys(("esp32-a1", *names)))


def test_one_segment_rule_for_topics_hardware_ids_and_config_topics():
    assert protocol.is_segment("nd-ph-a1b2:c3.d4_e5") and protocol.is_segment("x" * 128)
    assert not any(protocol.is_segment(s) for s in ("", "x" * 129, "a/b", "a+b", "a#", "nd 1"))
    assert protocol.temp_config_topic("esp32-a1") == "hydro/gh-temp/zn-temp/esp32-a1/config"
    assert protocol.parse_topic(protocol.config_topic("gh-1", "zn-1", "nd-1")[:-len("config")] + "heartbeat") == (
        "heartbeat", "gh-1", "zn-1", "nd-1", None)


@pytest.mark.parametrize("topic, kind, channel", [
    ("hydro/node_hello", "node_hello", None),
    ("hydro/gh-temp/zn-temp/esp32-a1/node_hello", "node_hello", None),
    ("hydro/gh-1/zn-1/nd-ph-1/ph_sensor/telemetry", "telemetry", "ph_sensor"),
    ("hydro/gh-1/zn-1/nd-ph-1/heartbeat", "heartbeat", None),
    ("hydro/gh-1/zn-1/nd-ph-1/lwt", "lwt", None),
    ("hydro/gh-1/zn-1/nd-ph-1/pump_acid/command_response", "command_response", "pump_acid"),
    ("hydro/time/request", "time_request", None),
    ("hydro/gh-1/zn-1/nd-ph-1/ph_sensor/heartbeat", "reject", None),
    ("hydro/gh-1/zn-1//heartbeat", "reject", None),
    ("hydro/gh-1/zn-1/nd-1\n/heartbeat", "reject", None),
    ("other/gh-1/zn-1/nd-1/heartbeat", "reject", None),
])
def test_topics_are_classified_by_shape(topic, kind, channel):
    routed = protocol.classify(7, topic, b"{}", NOW)
    assert (routed.kind, routed.channel, routed.seq) == (kind, channel, 7)
    if kind == "reject":
        assert routed.reason == protocol.UNKNOWN_TOPIC


def test_a_payload_over_64_kib_is_rejected_before_anything_else_and_only_its_start_kept():
    routed = protocol.classify(1, "hydro/gh-1/zn-1/nd-1/heartbeat", b" " * (1024 * 1024), NOW)
    assert (routed.kind, routed.reason) == ("reject", protocol.TOO_LARGE)
    assert len(routed.payload) == 64 * 1024 and "1048576 bytes" in routed.detail


def test_temp_is_exactly_gh_temp_and_zn_temp():
    assert protocol.is_temp("gh-temp", "zn-temp")
    assert not protocol.is_temp("gh-temp", "zn-1")
    assert not protocol.is_temp("gh-1", "zn-temp")


@pytest.mark.parametrize("ts, ms, expected, rule", [
    (1_764_399_000, False, 1_764_399_000, None),
    (1_764_399_000_123, False, 1_764_399_000.123, None),
    (1_764_399_000_123, True, 1_764_399_000.123, None),
    (12, False, NOW, "uptime"),
    (12_000, True, NOW, "uptime"),
    (NOW + 301, False, NOW, "future"),
    (NOW + 299, False, NOW + 299, None),
    (None, False, NOW, "missing"),
    (10 ** 400, False, NOW, "missing"),
    (10 ** 400, True, NOW, "missing"),
])
def test_timestamps_follow_the_unit_and_replacement_rules(ts, ms, expected, rule):
    value, replaced = protocol.normalise_ts(ts, NOW, milliseconds=ms)
    assert value == pytest.approx(expected)
    assert replaced == rule


@pytest.mark.parametrize("payload, reason", [
    (b"not json", protocol.BAD_JSON),
    (b'{"metric_type":"PH","value":NaN}', protocol.BAD_JSON),
    (b'{"metric_type":"PH","value":1e999}', protocol.BAD_PAYLOAD),
    (b'{"metric_type":"PH","value":"5.8"}', protocol.BAD_PAYLOAD),
    (b'{"metric_type":"PH","value":true}', protocol.BAD_PAYLOAD),
    (b'{"value":5.8}', protocol.BAD_PAYLOAD),
    (b'{"metric_type":"","value":5.8}', protocol.BAD_PAYLOAD),
    (b'{"metric_type":"' + b"X" * 51 + b'","value":5.8}', protocol.BAD_PAYLOAD),
    (b'{"metric_type":"PH","value":5.8,"note":"\xff"}', protocol.BAD_ENCODING),
    (b'{"metric_type":"PH","value":5.8,"note":"a\\u0000b"}', protocol.BAD_PAYLOAD),
    (b"[1, 2]", protocol.BAD_PAYLOAD),
    (b'{"metric_type":"PH","value":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}", protocol.BAD_JSON),
])
def test_bad_telemetry_is_rejected_with_a_reason(payload, reason):
    with pytest.raises(Rejected) as caught:
        protocol.decode(payload, Telemetry)
    assert caught.value.reason == reason
    assert caught.value.detail


def test_a_firmware_sample_decodes_with_its_extra_keys_ignored():
    sample = protocol.decode(b'{"metric_type":"PH","value":5.86,"ts":1710001234,"unit":"pH","raw":1465,'
                             b'"stable":false}', Telemetry)
    assert (sample.metric_type, sample.value, sample.ts) == ("PH", 5.86, 1710001234)


@pytest.mark.parametrize("payload, reason", [
    (b'{"message_type":"node_hello"}', protocol.BAD_PAYLOAD),
    (b'{"message_type":"node_hello","hardware_id":"has space"}', protocol.BAD_PAYLOAD),
    (b'{"message_type":"node_hello","hardware_id":"' + b"a" * 129 + b'"}', protocol.BAD_PAYLOAD),
    (b'{"message_type":"hello","hardware_id":"esp32-1"}', protocol.BAD_PAYLOAD),
    (b'{"message_type":"node_hello","hardware_id":"esp32-1","capabilities":"ph"}', protocol.BAD_PAYLOAD),
    (b'{"message_type":"node_hello","hardware_id":"esp32-ab\\n"}', protocol.BAD_PAYLOAD),
])
def test_a_bad_node_hello_is_rejected(payload, reason):
    with pytest.raises(Rejected) as caught:
        protocol.decode(payload, NodeHello)
    assert caught.value.reason == reason


def test_an_event_keeps_any_json_object_but_refuses_infinity():
    assert protocol.decode_object(b'{"a":{"b":[1,2.5]}}') == {"a": {"b": [1, 2.5]}}
    with pytest.raises(Rejected):
        protocol.decode_object(b'{"a":[1e999]}')
    with pytest.raises(Rejected):
        protocol.decode_object(b'"just a string"')
    with pytest.raises(Rejected) as deep:
        protocol.decode_object(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert deep.value.reason == protocol.BAD_JSON


def test_the_time_response_carries_integer_seconds():
    assert protocol.time_response(1_764_400_000.75) == (
        b'{"message_type":"time_response","unix_ts":1764400000,"server_time":1764400000}')


def test_the_repr_of_a_received_message_never_shows_its_payload():
    # A config_report may echo the node's secret; a crash report logs a message's repr.
    secret = "ab" * 32
    payload = ('{"node_secret":"%s","channels":[]}' % secret).encode()
    routed = protocol.classify(1, "hydro/gh-1/zn-1/nd-ph-1/config_report", payload, 0.0)
    inbound = Inbound("hydro/gh-1/zn-1/nd-ph-1/config_report", payload, 1, 1, 0.0, False)
    for text in (repr(routed), repr((routed,)), repr(inbound)):
        assert secret not in text and f"<{len(payload)} bytes>" in text


# --- what reaches PostgreSQL: every column's type and bounds (issue 7) ---------------

HEARTBEAT = b'{"uptime":%s,"free_heap":%s,"rssi":%s,"fw_version":"1.0.0"}'


@pytest.mark.parametrize("uptime, free_heap, rssi, field", [
    (b"3600", b"102000", b"3000000000", "$.rssi"),  # beyond `integer`, and no dBm a radio reports
    (b"3600", b"102000", b"-129", "$.rssi"),
    (b"3600", b"102000", b"128", "$.rssi"),
    (b"3600", b"18446744073709551615", b"-62", "$.free_heap"),  # beyond `bigint`
    (b"3600", b"-1", b"-62", "$.free_heap"),
    (b"-1", b"102000", b"-62", "$.uptime"),
    (b"1e400", b"102000", b"-62", "$.uptime"),
])
def test_a_heartbeat_field_beyond_its_column_is_rejected_naming_the_field(uptime, free_heap, rssi, field):
    with pytest.raises(Rejected) as caught:
        protocol.decode(HEARTBEAT % (uptime, free_heap, rssi), protocol.Heartbeat)
    assert caught.value.reason == protocol.BAD_PAYLOAD
    assert field in caught.value.detail


def test_a_heartbeat_at_the_edges_of_its_columns_is_accepted():
    beat = protocol.decode(HEARTBEAT % (b"0", b"9223372036854775807", b"-128"), protocol.Heartbeat)
    assert (beat.uptime, beat.free_heap, beat.rssi) == (0, 2 ** 63 - 1, -128)
    assert protocol.decode(HEARTBEAT % (b"1.5e9", b"0", b"127"), protocol.Heartbeat).rssi == 127


@pytest.mark.parametrize("payload, field, what", [
    # Metadata is stored as jsonb: numbers its `numeric` cannot hold, and NUL characters, are refused.
    (b'{"metric_type":"PH","value":5.8,"note":1e1000000}', "$.note", "out of range"),
    (b'{"metric_type":"PH","value":5.8,"note":[1,-1e400]}', "$.note", "out of range"),
    (b'{"metric_type":"PH","value":5.8,"note":1e-16384}', "$.note", "digits after the decimal point"),
    (b'{"metric_type":"PH","value":5.8,"note":0.' + b"0" * 16383 + b'1}', "$.note",
     "digits after the decimal point"),
    (b'{"metric_type":"PH","value":5.8,"note":{"deep":["a\\u0000b"]}}', "$.note", "NUL"),
    (b'{"metric_type":"PH","value":5.8,"a\\u0000b":1}', "$", "NUL"),
    (b'{"metric_type":"P\\u0000H","value":5.8}', "$.metric_type", "NUL"),
    (b'{"metric_type":"PH","value":1e400}', "$.value", "out of range"),
])
def test_telemetry_postgresql_could_not_store_is_rejected_naming_the_field(payload, field, what):
    with pytest.raises(Rejected) as caught:
        protocol.decode(payload, Telemetry)
    assert caught.value.reason == protocol.BAD_PAYLOAD
    assert f"`{field}`" in caught.value.detail and what in caught.value.detail


@pytest.mark.parametrize("payload", [
    b'{"metric_type":"PH","value":5.8,"note":"a\\\\u0000b"}',  # an escaped backslash, then text: no NUL
    b'{"metric_type":"PH","value":5.8,"note":1e-400,"big":1' + b"0" * 400 + b'}',  # jsonb holds both
    b'{"metric_type":"PH","value":5.8,"note":1e-16383,"max":1.7976931348623157e308}',
    b'{"metric_type":"PH","value":5.8,"id":"esp32-e1234","x":"time-e-5"}',
])
def test_telemetry_postgresql_can_store_is_accepted(payload):
    assert protocol.decode(payload, Telemetry).value == 5.8


def test_an_event_with_a_number_beyond_a_double_is_out_of_range_not_a_non_object():
    with pytest.raises(Rejected) as caught:
        protocol.decode_object(b'{"a":1e400}')
    assert caught.value.reason == protocol.BAD_PAYLOAD
    assert "out of range" in caught.value.detail and "`$.a`" in caught.value.detail
    with pytest.raises(Rejected) as listed:
        protocol.decode_object(b"[1e400]")
    assert "out of range" in listed.value.detail
    with pytest.raises(Rejected) as array:
        protocol.decode_object(b"[1, 2]")
    assert array.value.detail == "payload is not a JSON object"


def test_an_escaped_backslash_before_u0000_is_text_not_a_nul_character():
    assert protocol.decode_object(b'{"path":"C:\\\\u0000"}') == {"path": "C:\\u0000"}
    assert not protocol.holds_nul({"path": "C:\\u0000", "list": ["x"]})
    assert protocol.holds_nul({"list": [{"k": "a\x00"}]})
    assert protocol.holds_nul({"a\x00": 1})
    with pytest.raises(Rejected) as caught:
        protocol.decode_object(b'{"path":"C:\\u0000"}')
    assert "NUL" in caught.value.detail and "`$.path`" in caught.value.detail


def test_a_node_hello_with_a_nul_character_is_rejected():
    with pytest.raises(Rejected) as caught:
        protocol.decode(b'{"message_type":"node_hello","hardware_id":"esp32-1","fw_version":"1\\u0000"}',
                        NodeHello)
    assert caught.value.reason == protocol.BAD_PAYLOAD and "`$.fw_version`" in caught.value.detail
