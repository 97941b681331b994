"""Structured logging: one JSON object per line, carrying the current request's id.

The request id lives in a context variable set by the request middleware, so every log record
made while handling a request (in the route, the store, an error handler) carries it without
being passed around. Image content is never logged: records hold ids, sizes, codes and timings.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from nacguard.settings import Settings

__all__ = [
    "JsonFormatter",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
    "request_id_var",
]

#: The id of the request being handled on this task ("" outside a request).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
# uvicorn adds ``color_message`` (the message with ANSI colours) to its records: not for JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


def current_request_id() -> str:
    """The id of the request being handled, or ``""``."""
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (unless it already carries one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and value not in (None, ""):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Send every logger (nacguard's, uvicorn's) to stderr, as JSON lines or plain text.

    Replaces the root logger's handlers, so calling it twice does not duplicate lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn's loggers would otherwise keep handlers of their own and print twice.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Pillow logs a line per chunk of every decoded image at debug level: volume that clients
    # control, about their uploads. Kept at info even when everything else is at debug.
    logging.getLogger("PIL").setLevel(max(logging.INFO, root.level))
    # Python warnings (Pillow's "Corrupt EXIF data", ...) would go to stderr as plain text and
    # break the one-JSON-object-per-line stream.
    logging.captureWarnings(True)
    # The multipart parser warns about every malformed body it sees (with byte values from it):
    # the request already gets its 422, one access-log line is enough.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
