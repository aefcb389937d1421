"""Logging: the configuration the server installs, and the helpers code logs with.

- Every line logged while a request is handled carries its request id (and,
  once the upstream answered, the upstream's ``x-request-id``, which is the id
  OpenAI support asks for). Both travel in context variables, so code deep in
  the call stack logs as usual and the :class:`RequestContext` filter adds them.
- ``GATEWAY_LOG_FORMAT=text`` (the default) writes one line per record with
  control characters escaped, so a ``%0a`` in a request path cannot forge a
  line; ``json`` writes one JSON object per line (JSON escapes them itself).
- :class:`Throttled` turns a failure repeated per request (Redis down) into
  one line per interval with a count.
- A response the gateway cut off on purpose is not an application error:
  :class:`DropStreamAborted` keeps uvicorn from logging it with a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from gateway.errors import StreamAborted

#: The gateway's request id for the request being handled, if any.
REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)
#: The upstream's ``x-request-id`` for that request, once it has answered.
UPSTREAM_REQUEST_ID: ContextVar[str | None] = ContextVar(
    "gateway_upstream_request_id", default=None
)

ACCESS_LOGGER = "gateway.access"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


def _escapes() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    # Unicode line and paragraph separators: some log viewers split on them.
    table.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
    return table


_ESCAPES = _escapes()


def escape(value: str) -> str:
    """``value`` with every control character written as an escape sequence."""
    return value.translate(_ESCAPES)


class RequestContext(logging.Filter):
    """Adds ``request_id`` and ``upstream_request_id`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.upstream_request_id = UPSTREAM_REQUEST_ID.get()
        return True


class DropStreamAborted(logging.Filter):
    """A response deliberately cut off is not an application error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamAborted)


class TextFormatter(logging.Formatter):
    """``time level logger: message rid=... upstream_rid=...``, one line per record
    (a traceback, when there is one, follows on its own lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        line = super().formatMessage(record)
        rid = getattr(record, "request_id", None)
        if rid is not None:
            line += f" rid={escape(rid)}"
        upstream = getattr(record, "upstream_request_id", None)
        if upstream is not None:
            line += f" upstream_rid={escape(upstream)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's ids,
    the access log's fields, and the traceback as a string when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("request_id", "upstream_request_id"):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        fields: Mapping[str, Any] | None = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


def log_config(level: str, fmt: LogFormat = LogFormat.TEXT) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` dictionary for the gateway and uvicorn."""
    formatter = JsonFormatter if fmt is LogFormat.JSON else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "stream_aborted": {"()": DropStreamAborted},
            "request_context": {"()": RequestContext},
        },
        "formatters": {"gateway": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "gateway",
                "filters": ["stream_aborted", "request_context"],
            },
        },
        "loggers": {
            "gateway": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
            "uvicorn": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
        },
    }


def log_access(fields: Mapping[str, Any]) -> None:
    """One access-log line: readable in text, every field its own key in JSON.

    ``fields`` holds method, path, status, kind, outcome, client, bytes_in,
    bytes_out, duration_ms, upstream_ms and, when set, aborted, app (the
    issuer app of a session call), and a ChatKit request's workflow and class.
    """
    _access.info(
        "%s %s %d %s outcome=%s client=%s in=%d out=%d %.1fms upstream=%s%s%s%s%s",
        fields["method"],
        fields["path"],
        fields["status"],
        fields["kind"],
        fields["outcome"],
        fields["client"],
        fields["bytes_in"],
        fields["bytes_out"],
        fields["duration_ms"],
        "-" if fields["upstream_ms"] is None else f"{fields['upstream_ms']:.1f}ms",
        f" aborted={fields['aborted']}" if fields.get("aborted") else "",
        f" app={fields['app']}" if fields.get("app") else "",
        f" workflow={fields['workflow']}" if fields.get("workflow") else "",
        f" class={fields['class']}" if fields.get("class") else "",
        extra={"fields": fields},
    )


_access = logging.getLogger(ACCESS_LOGGER)


class Throttled:
    """Logs a failure that repeats (once per request while Redis is down) at most
    once per ``interval`` seconds, saying how many occurrences each line stands for.

    The first occurrence is logged at once; later ones within the interval are
    counted and reported with the next line logged after it.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (and %d more times in the last %.0fs)"
            args = (*args, self._suppressed, now - self._last)
        self._suppressed = 0
        self._last = now
        self._logger.log(level, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self.log(logging.ERROR, msg, *args)
