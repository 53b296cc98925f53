"""Logging: one JSON object per line on stdout, each with ts, level, event and actor.

structlog renders both hydrod's own events and the records of the libraries
(pykka, paho, psycopg) that go through the standard logging module.
"""

from __future__ import annotations

import json
import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "json", stream=None) -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    renderer = (structlog.processors.JSONRenderer(serializer=_dumps) if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(),
                           _default_actor],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # paho logs every packet at DEBUG; keep it to warnings unless asked.
    logging.getLogger("paho").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # pykka logs every exception an ask returns to its caller at INFO: those are answers.
    logging.getLogger("pykka").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    structlog.configure(
        processors=[*shared, _default_actor, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # tests reconfigure; no log call is on the hot path
    )


def _default_actor(_logger, _name, event: dict) -> dict:
    """Library records name their logger as the actor (`pykka`, `paho`, ...)."""
    event.setdefault("actor", event.get("logger") or "daemon")
    return event


_FIRST = ("ts", "level", "event", "actor")


def _dumps(event: dict, **kwargs) -> str:
    """JSON with the stable keys first, so a line reads left to right."""
    ordered = {key: event.pop(key) for key in _FIRST if key in event}
    ordered.update(event)
    return json.dumps(ordered, default=str)
