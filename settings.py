"""hydrod's settings: `config.toml` parsed once into frozen, typed sections.

Each key is declared once, here, with its default. Every problem in a file is
reported at once, naming the key, before any actor starts.
"""

from __future__ import annotations

import difflib
import os
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .errors import ConfigError

# A duration: positive, finite, and at most ten years (PostgreSQL intervals and
# timers must be able to hold it).
Seconds = Annotated[float, Field(gt=0, le=10 * 365 * 86400, allow_inf_nan=False)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 1883
    client_id: Annotated[str, Field(min_length=1, max_length=128)] = "hydrod"
    username: str = ""
    password: SecretStr = SecretStr("")
    tls: bool = False
    ca_file: str = ""
    keepalive: Annotated[int, Field(ge=5, le=65535)] = 30
    # Several hydrod instances share the load when they name the same group.
    shared_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]*$")] = ""
    # How long the broker keeps hydrod's session (and queues its messages)
    # while hydrod is away.
    session_expiry_s: Annotated[int, Field(ge=60)] = 7 * 24 * 3600
    # MQTT 5 Receive Maximum: how many unacknowledged messages the broker may
    # have in flight towards hydrod. It bounds what hydrod holds in memory.
    receive_maximum: Annotated[int, Field(ge=10, le=65535)] = 20000
    connect_timeout_s: Seconds = 5.0
    reconnect_min_s: Seconds = 0.5
    reconnect_max_s: Seconds = 30.0


class DatabaseSettings(_Section):
    dsn: SecretStr = SecretStr("postgresql://127.0.0.1:5432/hydro")
    pool_min: Annotated[int, Field(ge=1, le=100)] = 2
    pool_max: Annotated[int, Field(ge=1, le=100)] = 4
    # How long start-up waits for the database before giving up.
    startup_timeout_s: Seconds = 30.0
    retry_min_s: Seconds = 0.2
    retry_max_s: Seconds = 10.0


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 6001
    token: SecretStr = SecretStr("")
    # Connections open at once, at most; fewer when the open-file limit is low
    # (see deploy/README.md). Past it, the connection idle the longest is closed.
    connection_limit: Annotated[int, Field(ge=1, le=100000)] = 100
    # Requests handled at once; more wait their turn.
    threads: Annotated[int, Field(ge=1, le=64)] = 4


class TelemetrySettings(_Section):
    # A batch is written when it holds batch_size messages or when the oldest
    # has waited flush_interval_ms, whichever comes first.
    batch_size: Annotated[int, Field(ge=1, le=50000)] = 2000
    flush_interval_ms: Annotated[int, Field(ge=1, le=60000)] = 25
    # Messages accepted but not yet committed. Beyond it, QoS 0 messages are
    # refused (logged and counted); QoS 1 ones are bounded by
    # mqtt.receive_maximum and wait in the broker.
    max_pending: Annotated[int, Field(ge=100)] = 100000


class NodesSettings(_Section):
    offline_after_s: Seconds = 120.0
    config_ack_timeout_s: Seconds = 60.0
    # A config_report held for a node that never says hello is dropped (logged,
    # counted) after this long.
    held_report_ttl_s: Seconds = 3 * 86400.0
    # A bound node back in the temp namespace (reset, reflashed) is sent its last
    # applied config again, at most once per this long.
    config_resend_interval_s: Seconds = 60.0


class CommandsSettings(_Section):
    # How long a command may wait to be sent (broker link down, node offline)
    # before it expires unsent; a request's `ttl_s` overrides it.
    default_ttl_s: Annotated[float, Field(gt=0, le=86400, allow_inf_nan=False)] = 60.0
    # How long after the broker took a command its final answer may take.
    response_timeout_s: Seconds = 30.0
    # How often expiries and timeouts are checked, and waiting commands of nodes
    # that came back online are sent.
    sweep_interval_s: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 1.0


class SupervisorSettings(_Section):
    max_restarts: Annotated[int, Field(ge=0)] = 5
    restart_window_s: Seconds = 60.0
    backoff_min_s: Seconds = 0.2
    backoff_max_s: Seconds = 5.0
    shutdown_timeout_s: Seconds = 20.0
    ask_timeout_s: Seconds = 5.0
    # /healthz reports an actor that has been on one message this long as stalled.
    stall_after_s: Seconds = 30.0
    # A message that crashes its actor this many times is dead-lettered.
    max_message_failures: Annotated[int, Field(ge=1)] = 2


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    stats_interval_s: Seconds = 60.0


class HistorySettings(_Section):
    # Retention (SPEC §8), checked at start-up and every hour. Raw samples go by
    # whole UTC days (a day's partition is dropped once all of it is older than
    # raw_days); rollup rows by their bucket. 0 keeps them for ever.
    raw_days: Annotated[int, Field(ge=0, le=100 * 365)] = 30
    rollup_1m_days: Annotated[int, Field(ge=0, le=100 * 365)] = 180
    rollup_1h_days: Annotated[int, Field(ge=0, le=100 * 365)] = 0
    rollup_1d_days: Annotated[int, Field(ge=0, le=100 * 365)] = 0
    # How far the rollups may lag the raw samples. hydrod keeps them in the
    # transaction that stores the samples, so they never lag (README, Decisions).
    rollup_lag_s: Seconds = 60.0


class Settings(_Section):
    mqtt: MqttSettings = MqttSettings()
    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    nodes: NodesSettings = NodesSettings()
    commands: CommandsSettings = CommandsSettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    logging: LoggingSettings = LoggingSettings()
    history: HistorySettings = HistorySettings()


# Secrets may come from the environment instead of the file.
ENV_SECRETS = {
    "HYDROD_MQTT_PASSWORD": ("mqtt", "password"),
    "HYDROD_DATABASE_DSN": ("database", "dsn"),
    "HYDROD_HTTP_TOKEN": ("http", "token"),
}


def default_path() -> Path:
    return Path(os.environ.get("HYDROD_CONFIG", "config.toml"))


def load(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read and validate a config file; raise ConfigError listing every problem."""
    path = path or default_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(raw, environ=os.environ if environ is None else environ, source=str(path))


def from_dict(raw: dict[str, Any], environ: dict[str, str] | None = None,
              source: str = "config") -> Settings:
    raw = {section: dict(values) if isinstance(values, dict) else values
           for section, values in raw.items()}
    for variable, (section, key) in ENV_SECRETS.items():
        if environ and environ.get(variable):
            raw.setdefault(section, {})
            if isinstance(raw[section], dict):
                raw[section][key] = environ[variable]
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems)) from None
    try:
        conninfo_to_dict(settings.database.dsn.get_secret_value())
    except psycopg.ProgrammingError:
        # The parser's message quotes the DSN, password included: say where, not what.
        raise ConfigError(f"{source}: `database.dsn` is not a valid PostgreSQL connection string "
                          "(key=value pairs or a postgresql:// URL; percent-encode special characters)") from None
    if settings.database.pool_min > settings.database.pool_max:
        raise ConfigError(f"{source}: database.pool_min ({settings.database.pool_min}) "
                          f"is above database.pool_max ({settings.database.pool_max})")
    if settings.mqtt.tls is False and settings.mqtt.ca_file:
        raise ConfigError(f"{source}: mqtt.ca_file is set but mqtt.tls is false")
    if settings.mqtt.ca_file and (problem := _not_a_ca(settings.mqtt.ca_file)):
        raise ConfigError(f"{source}: `mqtt.ca_file` {settings.mqtt.ca_file}: {problem}")
    return settings


def _not_a_ca(path: str) -> str | None:
    """Why a file is no CA certificate, or None: loaded for real, as paho's tls_set will load it."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return "not found"
    except IsADirectoryError:
        return "is a directory"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        return f"not a PEM CA certificate ({exc.reason or exc.library or exc})"
    return None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        known = _known_keys(error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f", did you mean `{'.'.join([*map(str, error['loc'][:-1]), close[0]])}`?" if close else ""
        return f"unknown key `{key}`{hint}"
    return f"`{key}`: {error['msg']}"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return list(model.model_fields)


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, with every secret masked, for logs and check-config."""
    return settings.model_dump(mode="json")
