"""Log output: plain text lines, or one JSON object per line (setting ``log_format``).

A JSON line holds the time (UTC, RFC 3339), level, logger, message and process
id, the request id and W3C trace id of the request being served (if any), and every
structured field the code attached to the record (``extra``): the access log's
``http_route``, ``http_status``, ``duration_ms``..., the decision log's
``decision``, ``rule``, ``reason``...::

    {"time": "2025-01-07T10:31:02.114Z", "level": "INFO", "logger": "sts.decision",
     "message": "token refused invalid_target policy.target_not_allowed ...",
     "request_id": "deploy-4711", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
     "endpoint": "token", "decision": "refused", "error": "invalid_target", ...}

The fields are whatever the code put there, and the code never puts a token or
a secret in a log record (hashes at most); the formatter adds nothing from the
request itself.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from .tracing import current

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

#: Attributes every LogRecord has; anything else on a record was attached with ``extra``.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        out: dict[str, Any] = {
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            # Several worker processes write to one stream: say which one.
            "pid": record.process,
        }
        trace = current.get()
        if trace is not None:
            out["request_id"] = trace.request_id
            out["trace_id"] = trace.trace_id
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRIBUTES and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: str) -> None:
    """Send every log record to standard error in ``log_format``, from ``level`` up."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("sts").setLevel(level)
    # Alembic narrates at INFO (its plugins, "Context impl SQLiteImpl."): sts.migrations logs
    # what changed.  Set here too: its import may come before this (and ``force`` keeps levels).
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger("sts").level))


#: granian's own log lines, in the format ``sts serve`` uses for the others (on stderr, with a time).
_GRANIAN_FORMAT = {"()": "logging.Formatter", "fmt": "%(asctime)s %(levelname)s granian: %(message)s"}
GRANIAN_LOG_CONFIG = {
    "formatters": {"generic": _GRANIAN_FORMAT, "access": _GRANIAN_FORMAT},
    "handlers": {
        "console": {"formatter": "generic", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
    },
}
