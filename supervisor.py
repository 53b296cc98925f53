"""The supervisor: starts the actors in dependency order, restarts the ones that
fail, and stops them all, in reverse order, on SIGTERM or when it gives up.

Only this module knows restart policy. A restart loses nothing: the dead
actor's queued messages, and whatever was told to it meanwhile, go to its
replacement under the same address. A message that keeps crashing its actor
is split (a batch) or dead-lettered (a single message) instead of replayed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pykka
import structlog

from . import protocol, store
from .actors.address import ActorUnavailable, Address, ask_ref
from .actors.messages import ActorFailed, Deliver, Flush, Health, Ready
from .actors.supervised import Context
from .core.timers import Backoff, Ticker, tell_later
from .actors.commands import CommandSender
from .actors.config_publisher import ConfigPublisher
from .actors.db_writer import DbWriter
from .actors.history_keeper import HistoryKeeperActor
from .actors.http_api import HttpApi, Peers
from .actors.mqtt_io import Close, MqttIo, StopIntake
from .core.link import wanted_filters
from .actors.node_registry import NodeRegistry
from .errors import DatabaseUnavailable, StartupError, SupervisorGaveUp, unexpected
from .metrics import Metrics
from .settings import Settings
from .systemd import Notifier

log = structlog.get_logger("hydrod", actor="supervisor")


@dataclass
class ActorSpec:
    name: str
    start: Callable[[Context], pykka.ActorRef]
    address: Address
    restarts: deque = field(default_factory=deque)  # monotonic times, within the window


# --- the supervising actor ------------------------------------------------------------


@dataclass(frozen=True)
class _Restart:
    failure: ActorFailed
    first: tuple[Any, ...] | None = None  # decided already, when a restart is tried again


@dataclass(frozen=True)
class _Stats:
    pass


class SupervisorActor(pykka.ThreadingActor):
    """Receives failures; decides, logs and carries out every restart."""

    use_daemon_thread = True

    def __init__(self, daemon: Daemon):
        super().__init__()
        self.daemon = daemon
        self.settings = daemon.settings.supervisor
        self.backoff: dict[str, Backoff] = {}
        # Failures per message, forgotten after the restart window.
        self._message_failures: dict[tuple, tuple[Any, int, float]] = {}

    def on_receive(self, message: Any) -> Any:
        try:
            if self.daemon.fault_hook is not None:
                self.daemon.fault_hook("supervisor", message)
            match message:
                case ActorFailed():
                    self._failed(message)
                case _Restart(failure, first):
                    self._restart(failure, first)
                case _Stats():
                    self._stats()
                case Ready():
                    self.daemon.ready()
        except Exception as exc:
            # Nothing would be supervised any more: stop everything, so that systemd
            # starts a whole new process.
            log.critical("supervisor_failed", error=repr(exc), exc_info=True)
            self.daemon.give_up(SupervisorGaveUp(f"the supervisor itself failed: {exc!r}"))
        return None

    def _stats(self) -> None:
        # A periodic job: one failed round is logged, and the next comes all the same.
        try:
            self.daemon.log_stats()
        except Exception as exc:
            log.error("stats_failed", error=repr(exc), exc_info=True)

    def _failed(self, failure: ActorFailed, first: tuple[Any, ...] | None = None) -> None:
        spec = self.daemon.specs[failure.name]
        now = time.monotonic()
        window = self.settings.restart_window_s
        if spec.restarts and spec.restarts[-1] < now - window:
            self.backoff.pop(failure.name, None)  # a quiet window: start the backoff afresh
        spec.restarts.append(now)
        while spec.restarts and spec.restarts[0] < now - window:
            spec.restarts.popleft()
        # The traceback: of the failure in the actor, or of a replacement's start-up,
        # which the actor answered to its ping.
        error = failure.error.__cause__ if isinstance(failure.error, StartupError) else failure.error
        log.error("actor_failed", failed_actor=failure.name, error=repr(failure.error),
                  message=type(failure.message).__name__ if failure.message is not None else None,
                  queued=len(failure.leftovers), restarts_in_window=len(spec.restarts),
                  exc_info=unexpected(error))
        if self.daemon.stopping.is_set():
            return
        if len(spec.restarts) > self.settings.max_restarts:
            log.critical("supervisor_gave_up", failed_actor=failure.name, restarts=len(spec.restarts) - 1,
                         window_s=window)
            self.daemon.give_up(SupervisorGaveUp(
                f"{failure.name} failed {len(spec.restarts)} times in {window:g} s"))
            return
        backoff = self.backoff.setdefault(failure.name, Backoff(self.settings.backoff_min_s,
                                                                self.settings.backoff_max_s))
        delay = backoff.next_delay()
        log.info("actor_restart_scheduled", failed_actor=failure.name, in_s=round(delay, 3))
        tell_later(self.daemon.supervisor_address, _Restart(failure, first), delay)

    def _restart(self, failure: ActorFailed, first: tuple[Any, ...] | None) -> None:
        if self.daemon.stopping.is_set():
            return
        spec = self.daemon.specs[failure.name]
        if first is None:
            # What it held arrived before the suspect: it goes first, as it is.
            first = failure.salvaged + self._replay_or_dead_letter(failure)
        try:
            ref = self.daemon.start_actor(spec, replay_first=first, replay=failure.leftovers)
        except StartupError as exc:
            # Counted like any failure: the budget decides whether to try again. What
            # the dead incarnation held is kept for the next try.
            self._failed(ActorFailed(failure.name, failure.ref, exc, failure.message, failure.leftovers,
                                     failure.salvaged), first=first)
            return
        self.daemon.metrics.restarts.labels(failure.name).inc()
        log.info("actor_restarted", restarted_actor=failure.name, ref=str(ref), replayed=len(failure.leftovers)
                 + len(first), held=spec.address.held)

    def _replay_or_dead_letter(self, failure: ActorFailed) -> tuple[Any, ...]:
        """The failed message goes first to the replacement, unless it keeps failing.

        A batch is split into single messages at once, each handled alone
        (replaying is harmless: the writes are idempotent), so a poison message is
        cornered in 1 + max_message_failures restarts, within the restart budget;
        a single message that fails max_message_failures times is dead-lettered.
        """
        message = failure.message
        if message is None:
            return ()
        if isinstance(message, Deliver) and len(message.items) > 1:
            log.warning("poison_batch_split", failed_actor=failure.name, items=len(message.items))
            return tuple(Deliver((item,), alone=True) for item in message.items)
        now = time.monotonic()
        for stale in [k for k, (_, _, at) in self._message_failures.items()
                      if at < now - self.settings.restart_window_s]:
            del self._message_failures[stale]
        key = _identity(failure.name, message)
        _, count, _ = self._message_failures.get(key, (message, 0, now))
        count += 1
        if count < self.settings.max_message_failures:
            self._message_failures[key] = (message, count, now)
            return (Deliver(message.items, alone=True),) if isinstance(message, Deliver) else (message,)
        self._message_failures.pop(key, None)
        if isinstance(message, Deliver):
            item = message.items[0]
            log.warning("message_rejected", reason=protocol.HANDLER_CRASH, topic=item.topic,
                        detail=f"crashed {failure.name} {count} times: {failure.error!r}")
            self.daemon.specs["db_writer"].address.tell(Deliver((item._replace(
                kind=protocol.REJECT, reason=protocol.HANDLER_CRASH,
                detail=f"crashed {failure.name} {count} times: {failure.error!r}"),)))
            return ()
        self.daemon.metrics.rejected.labels("message_dropped").inc()
        log.error("message_dropped", failed_actor=failure.name, message=repr(message)[:200],
                  detail=f"crashed its actor {count} times")
        return ()


# --- the daemon ---------------------------------------------------------------------------


class Daemon:
    """Builds the actors and their addresses; run() blocks until stopped."""

    ORDER = ("db_writer", "history_keeper", "node_registry", "config_publisher", "commands", "http_api", "mqtt_io")

    def __init__(self, settings: Settings, fault_hook: Callable[[str, Any], None] | None = None,
                 notifier: Notifier | None = None):
        self.settings = settings
        self.notifier = notifier or Notifier()
        self._ready = False
        self.metrics = Metrics()
        self.fault_hook = fault_hook
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.supervisor_address = Address("supervisor")
        self.specs: dict[str, ActorSpec] = {}
        self.started: list[str] = []
        self._supervisor_ref: pykka.ActorRef | None = None
        self._stats: Ticker | None = None
        self.stale_filters: tuple[str, ...] = ()  # see remember_subscriptions
        self._build()

    def _build(self) -> None:
        s = self.settings
        addr = {name: Address(name) for name in self.ORDER}
        dsn = s.database.dsn.get_secret_value()
        retry = lambda: Backoff(s.database.retry_min_s, s.database.retry_max_s)  # noqa: E731
        consumer = dict(dsn=dsn, mqtt=addr["mqtt_io"], metrics=self.metrics,
                        flush_interval=s.telemetry.flush_interval_ms / 1000)
        factories = {
            "db_writer": lambda ctx: DbWriter.start(
                ctx, offline_after_s=s.nodes.offline_after_s, held_report_ttl_s=s.nodes.held_report_ttl_s,
                pool_size=(s.database.pool_min, s.database.pool_max),
                batch_size=s.telemetry.batch_size, retry=retry(), **consumer),
            "history_keeper": lambda ctx: HistoryKeeperActor.start(
                ctx, dsn=dsn, settings=s.history, metrics=self.metrics),
            "node_registry": lambda ctx: NodeRegistry.start(
                ctx, config_publisher=addr["config_publisher"],
                resend_interval_s=s.nodes.config_resend_interval_s, pool_size=(1, 1), batch_size=min(s.telemetry.batch_size, 500), retry=retry(), **consumer),
            "config_publisher": lambda ctx: ConfigPublisher.start(
                ctx, dsn=dsn, mqtt=addr["mqtt_io"], metrics=self.metrics,
                ack_timeout_s=s.nodes.config_ack_timeout_s),
            "commands": lambda ctx: CommandSender.start(
                ctx, dsn=dsn, mqtt=addr["mqtt_io"], metrics=self.metrics,
                default_ttl_s=s.commands.default_ttl_s, response_timeout_s=s.commands.response_timeout_s,
                sweep_interval_s=s.commands.sweep_interval_s),
            "http_api": lambda ctx: HttpApi.start(
                ctx, settings=s.http, dsn=dsn, metrics=self.metrics, ask_timeout=s.supervisor.ask_timeout_s,
                stall_after_s=s.supervisor.stall_after_s,
                peers=Peers(registry=addr["node_registry"], config_publisher=addr["config_publisher"],
                            commands=addr["commands"],
                            db_writer=addr["db_writer"], mqtt=addr["mqtt_io"],
                            all=tuple(addr[name] for name in self.ORDER if name != "http_api"
                                      or s.http.enabled))),
            "mqtt_io": lambda ctx: MqttIo.start(
                ctx, settings=s.mqtt, registry=addr["node_registry"], history=addr["db_writer"],
                link_watchers=(addr["config_publisher"], addr["commands"]), metrics=self.metrics,
                batch_size=s.telemetry.batch_size, max_pending=s.telemetry.max_pending,
                stale_filters=self.stale_filters, commands=addr["commands"]),
        }
        for name in self.ORDER:
            if name == "http_api" and not s.http.enabled:
                continue
            self.specs[name] = ActorSpec(name, factories[name], addr[name])

    # -- start --

    def migrate(self) -> None:
        """Apply migrations, and record the MQTT filters about to be subscribed (see
        store.remember_subscriptions), waiting for PostgreSQL up to database.startup_timeout_s."""
        s = self.settings.database
        deadline = time.monotonic() + s.startup_timeout_s
        backoff = Backoff(s.retry_min_s, min(s.retry_max_s, 2.0))
        while True:
            try:
                with store.connect(s.dsn.get_secret_value()) as conn:
                    applied = store.migrate(conn)
                    # Before any SUBSCRIBE: the record is never short of what the session holds.
                    mqtt = self.settings.mqtt
                    self.stale_filters = tuple(store.remember_subscriptions(
                        conn, mqtt.client_id, wanted_filters(mqtt.shared_group)))
                break
            except psycopg.OperationalError as exc:
                error = store.error_line(exc)
                if time.monotonic() >= deadline:
                    raise DatabaseUnavailable(f"PostgreSQL unreachable for {s.startup_timeout_s:g} s: {error}") from None
                if backoff.attempts == 0:
                    log.error("db_unavailable", error=error, doing="migrate", gives_up_in_s=s.startup_timeout_s)
                # Waiting on the stop event: SIGTERM ends the wait at once.
                if self.stopping.wait(min(backoff.next_delay(), max(deadline - time.monotonic(), 0))):
                    log.info("migrations_abandoned", reason="stopping")
                    return
        log.info("migrations_applied", applied=applied, outage_s=backoff.reset())

    def start(self) -> None:
        started_at = time.monotonic()
        if self.notifier.watchdog_interval is not None:
            threading.Thread(target=self._watchdog, args=(self.notifier.watchdog_interval,),
                             name="watchdog", daemon=True).start()
        self.migrate()
        if self.stopping.is_set():
            return  # asked to stop while waiting for the database: nothing started
        self._supervisor_ref = SupervisorActor.start(self)
        self.supervisor_address.attach(self._supervisor_ref)
        for name in self.specs:
            self.start_actor(self.specs[name])
            self.started.append(name)
        self._stats = Ticker("stats", self.supervisor_address, _Stats(),
                             self.settings.logging.stats_interval_s).start()
        log.info("daemon_started", actors=self.started, startup_s=round(time.monotonic() - started_at, 3))

    def start_actor(self, spec: ActorSpec, replay_first: tuple[Any, ...] = (),
                    replay: tuple[Any, ...] = ()) -> pykka.ActorRef:
        ctx = Context(spec.name, spec.address, self.supervisor_address, self.fault_hook)
        try:
            ref = spec.start(ctx)
        except Exception as exc:
            raise StartupError(f"actor {spec.name} did not start: {exc}") from exc
        try:
            # on_start failures are otherwise silent in pykka: ping with a timeout.
            ask_ref(ref, Health(), timeout=self.settings.supervisor.ask_timeout_s)
        except Exception as exc:
            ref.stop(block=False)
            raise StartupError(f"actor {spec.name} did not start: {_cause(exc)}") from exc
        try:
            spec.address.attach(ref, replay_first=replay_first, replay=replay)
        except ActorUnavailable as exc:
            raise StartupError(f"actor {spec.name} did not start: {exc}") from exc
        log.info("actor_started", started_actor=spec.name)
        return ref

    # -- run and stop --

    def give_up(self, error: BaseException) -> None:
        self.failure = error
        self.stopping.set()

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.info("daemon_stopping", reason=reason)
        self.stopping.set()

    def ready(self) -> None:
        """MqttIo is subscribed: tell systemd, once (a reconnect subscribes again)."""
        if not self._ready and not self.stopping.is_set():
            self._ready = True
            self.notifier.notify("READY=1", "STATUS=subscribed")
            log.info("daemon_ready", systemd=bool(self.notifier.address))

    def not_progressing(self) -> list[str]:
        """The actors that are not alive and making progress, each with why: what /healthz
        calls stalled or restarting (Address.not_progressing), and the supervisor if it stopped."""
        now, stall_after_s = time.monotonic(), self.settings.supervisor.stall_after_s
        stuck = [f"{name}: {why}" for name in self.started
                 if (why := self.specs[name].address.not_progressing(stall_after_s, now)) is not None]
        if self._supervisor_ref is not None and not self._supervisor_ref.is_alive():
            stuck.append("supervisor: stopped")
        return stuck

    def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every `interval` while every actor makes progress. Withheld while one
        does not, so that systemd kills hydrod (SIGABRT) and starts it again after WatchdogSec.
        Start-up (waiting for PostgreSQL) is no stall: no actor has started yet."""
        withheld: list[str] | None = None
        while not self.stopping.wait(interval):
            try:
                stuck = self.not_progressing()
            except Exception as exc:  # a periodic job: log, and keep the schedule
                log.error("watchdog_failed", error=repr(exc), exc_info=True)
                continue
            if not stuck:
                self.notifier.notify("WATCHDOG=1")
                if withheld is not None:
                    log.info("watchdog_resumed", was=withheld)
                    withheld = None
            elif withheld is None:
                withheld = stuck
                log.error("watchdog_withheld", not_progressing=stuck,
                          detail="systemd kills and restarts hydrod if this lasts WatchdogSec")

    def wait(self) -> None:
        while not self.stopping.wait(1.0):
            if not self._supervisor_ref.is_alive():
                # Stopped from outside its own code (a BaseException makes pykka stop
                # every actor): nothing is supervised any more.
                log.critical("supervisor_failed", error="the supervisor actor stopped")
                self.give_up(SupervisorGaveUp("the supervisor actor stopped"))

    def log_stats(self) -> None:
        log.info("stats", **self.metrics.summary(),
                 held_for_restart=sum(spec.address.held for spec in self.specs.values()),
                 restarting=[name for name, spec in self.specs.items() if spec.address.ref is None])

    def shutdown(self) -> None:
        """Drain and stop, in reverse order; every wait bounded by shutdown_timeout_s."""
        deadline = time.monotonic() + self.settings.supervisor.shutdown_timeout_s
        remaining = lambda: max(deadline - time.monotonic(), 0.1)  # noqa: E731
        self.stopping.set()
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        if self._stats is not None:
            self._stats.stop()
        drained: dict[str, Any] = {}
        # Registry work first: history held behind it is released to db_writer by
        # the second StopIntake, which also hands over MqttIo's partial batches.
        steps = [("mqtt_io", StopIntake()), ("node_registry", Flush()), ("mqtt_io", StopIntake()),
                 ("db_writer", Flush()), ("commands", Flush()), ("mqtt_io", Close())]
        for name, step in steps:
            if name not in self.started:
                continue
            try:
                key = f"{name}.{type(step).__name__}"
                drained[key] = drained.get(key, 0) + self.specs[name].address.ask(step, remaining()).pending
            except Exception as exc:  # a step that cannot finish must not stop the others
                log.error("drain_step_failed", step=f"{name}.{type(step).__name__}", error=repr(exc))
        for name in reversed(self.started):
            ref = self.specs[name].address.ref
            if ref is None:
                continue
            try:
                ref.stop(block=True, timeout=remaining())
            except pykka.Timeout:
                log.error("actor_stop_timeout", stopped_actor=name)
        if self._supervisor_ref is not None:
            try:
                self._supervisor_ref.stop(block=True, timeout=remaining())
            except pykka.Timeout:
                log.error("actor_stop_timeout", stopped_actor="supervisor")
        log.info("daemon_stopped", drained=drained, messages=self.metrics.accounts(),
                 failure=None if self.failure is None else str(self.failure))


def _cause(exc: BaseException) -> str:
    """Why an actor did not answer its start-up ping: its on_start error, as it said it."""
    if isinstance(exc, pykka.ActorDeadError):
        return "it stopped during start-up (see the error logged just before)"
    if isinstance(exc, pykka.Timeout):
        return "it did not answer in time"
    if isinstance(exc, OSError) and str(exc):
        return str(exc)  # says what and where: "cannot listen on 127.0.0.1:6001: ..."
    return f"{type(exc).__name__}: {exc}"


def _identity(actor: str, message: Any) -> tuple:
    """The same message across replays: a salvaged batch is rebuilt, so it is known by its items."""
    if isinstance(message, Deliver) and message.items:
        return actor, message.items[0].seq, message.items[-1].seq, len(message.items)
    return actor, id(message)
