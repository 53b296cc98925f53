"""ConfigPublisher: the shell of core/configs.py (building, recording and publishing
NodeConfigs; ack timeouts; queued configs sent when the link comes up).

It owns the actor's pool (core/database.py), the expiry timer, and the hand-over
to MqttIo. A (re)started publisher asks MqttIo for the link's state, so it
never answers `queued` while the link is up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..core.configs import Acked, Configs, PushResult, ResendConfig
from ..core.database import Database
from ..core.timers import Ticker
from .address import Address
from .messages import Ask, Drained, Flush, Health, HealthReport, LinkChanged
from .supervised import Context, SupervisedActor
from .mqtt_io import Publish, WatchLink

@dataclass(frozen=True)
class PushConfig(Ask[PushResult]):
    """Ask (HTTP API): push `body` to node `uid`; answered with PushResult, or raises
    PushRefused. Past `deadline` (time.monotonic()) the push is not made."""

    uid: str
    body: Any
    deadline: float


@dataclass(frozen=True)
class _Expire:
    """Ticker: time out configs the node never acknowledged."""


def push_config(publisher: Address, uid: str, body: Any, timeout: float) -> PushResult:
    """Ask the config publisher to push `body` to node `uid`, within `timeout` seconds."""
    result = publisher.ask(PushConfig(uid, body, deadline=time.monotonic() + timeout - 0.2), timeout)
    if not isinstance(result, PushResult):
        raise TypeError(f"{publisher.name} answered a push with {type(result).__name__}")
    return result


class ConfigPublisher(SupervisedActor):
    def __init__(self, context: Context, *, dsn: str, mqtt: Address, metrics, ack_timeout_s: float):
        super().__init__(context)
        self._dsn = dsn
        self.mqtt = mqtt
        self.metrics = metrics
        self.ack_timeout_s = ack_timeout_s
        self.db: Database | None = None
        self.configs: Configs | None = None
        self._ticker: Ticker | None = None

    def on_start(self) -> None:
        self.db = Database(self.ctx.name, self._dsn, (1, 1), metrics=self.metrics, log=self.log)
        self.configs = Configs(self.db, publish=self._publish, metrics=self.metrics, log=self.log,
                               ack_timeout_s=self.ack_timeout_s)
        interval = min(max(self.ack_timeout_s / 4, 0.05), 5.0)
        self._ticker = Ticker(self.ctx.name, self.ctx.address, _Expire(), interval).start()
        self.mqtt.tell(WatchLink(self.ctx.address))  # answered with LinkChanged

    def _publish(self, topic: str, payload: bytes, acked: Acked | None) -> None:
        self.mqtt.tell(Publish(topic, payload, on_acked=None if acked is None else (self.ctx.address, acked)))

    def handle(self, message: Any) -> Any:
        match message:
            case PushConfig(uid, body, deadline):
                return self.configs.push(uid, body, deadline)
            case LinkChanged(up):
                self.configs.link_changed(up)
            case Acked():
                self.configs.acked(message)
            case ResendConfig():
                self.configs.resend(message)
            case _Expire():
                self.configs.expire()
            case Health():
                return HealthReport(*self.db.health())
            case Flush():
                return Drained(0)
            case _:
                raise TypeError(f"ConfigPublisher does not handle {type(message).__name__}")
        return None

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        if self.db is not None:
            self.db.close()
            self.db = None
