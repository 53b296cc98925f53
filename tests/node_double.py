"""A node double for the command tests: a real MQTT client on the real broker that
checks each command exactly as the firmware does (signing.check: the exact keys, the
10 s window, the canonical form and the signature; a cmd_id seen before is ignored)
and answers as told: ACK then DONE, ERROR, or nothing."""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from harness import _connect
from hydrod import signing


@dataclass(frozen=True)
class Got:
    """A command as the node received it, and the node's verdict."""

    topic: str
    payload: bytes
    at: float  # time.time() when it arrived
    verdict: dict[str, Any] | signing.Refusal  # the command, or why it was refused

    @property
    def ok(self) -> bool:
        return isinstance(self.verdict, dict)


class NodeDouble:
    """Listens on hydro/{gh}/{zone}/{segment}/+/command. `answer` is "done" (ACK then
    DONE), "error" (ACK then ERROR), "ack" (ACK only), or "silent"; a refused command
    is answered ERROR/INVALID with its error_code, as the firmware does."""

    def __init__(self, port: int, secret: str, segment: str, gh: str = "gh-1", zone: str = "zn-1",
                 answer: str = "done", clock=time.time):
        self.port, self.secret, self.answer, self.clock = port, secret, answer, clock
        self.base = f"hydro/{gh}/{zone}/{segment}"
        self.got: list[Got] = []
        self.seen: set[str] = set()
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"node-{secrets.token_hex(4)}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message

    def __enter__(self) -> NodeDouble:
        _connect(self.client, self.port, "127.0.0.1", 10)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        rc, _ = self.client.subscribe(f"{self.base}/+/command", qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and subscribed.wait(10), "node double could not subscribe"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _client, _userdata, msg: mqtt.MQTTMessage) -> None:
        verdict = signing.check(bytes(msg.payload), self.secret, self.clock())
        got = Got(msg.topic, bytes(msg.payload), time.time(), verdict)
        with self._cond:
            self.got.append(got)
            self._cond.notify_all()
        respond = msg.topic.rsplit("/", 1)[0] + "/command_response"
        if not got.ok:
            cmd_id = _cmd_id(msg.payload)
            if cmd_id is not None:
                self.reply(respond, cmd_id, verdict.status, error_code=verdict.error_code,
                           error_message=verdict.message)
            return
        if verdict["cmd_id"] in self.seen:
            return  # the firmware ignores a cmd_id it has seen
        self.seen.add(verdict["cmd_id"])
        if self.answer == "silent":
            return
        self.reply(respond, verdict["cmd_id"], "ACK")
        if self.answer == "done":
            self.reply(respond, verdict["cmd_id"], "DONE", details={"ok": True})
        elif self.answer == "error":
            self.reply(respond, verdict["cmd_id"], "ERROR", error_code="pump_jammed", error_message="stuck")

    def reply(self, topic: str, cmd_id: str, status: str, **extra: Any) -> None:
        """Publish a command_response (from paho's thread, QoS 1: no wait here)."""
        body = {"cmd_id": cmd_id, "status": status, "ts": int(time.time() * 1000), **extra}
        self.client.publish(topic, json.dumps(body), qos=1)

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Got]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.got) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.base}: {len(self.got)} command(s) after {timeout}s, not {count}")
                self._cond.wait(remaining)
            return list(self.got)


def _cmd_id(payload: bytes) -> str | None:
    try:
        value = json.loads(payload).get("cmd_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
