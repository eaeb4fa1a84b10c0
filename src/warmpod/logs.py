"""The server's logging: one handler on stderr, readable text or one JSON object a line, uvicorn's too."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
# What every LogRecord has: anything else on a record is a structured field its caller passed in
# ``extra``. uvicorn's ``color_message`` is its message again, with terminal colours.
_STANDARD = {*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "color_message"}
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status_code")
"""The arguments of a ``uvicorn.access`` record, in the order uvicorn passes them."""


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields its caller gave ``record``."""
    return {name: value for name, value in record.__dict__.items() if name not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` (the
    message), then the record's structured fields and, if any, ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = _extra(record)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            fields.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        for name, value in fields.items():
            line.setdefault(name, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``, then the record's structured fields as ``name=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """The record as a line for a terminal (a traceback below it)."""
        text = super().format(record)
        extra = _extra(record)
        if not extra:
            return text
        head, newline, rest = text.partition("\n")
        pairs = " ".join(f"{name}={json.dumps(value, default=str)}" for name, value in extra.items())
        return f"{head} {pairs}{newline}{rest}"


def configure(log_format: LogFormat, level: str = "info") -> dict[str, Any]:
    """Send every log record at ``level`` or above to one handler on stderr in ``log_format``; return
    the ``log_config`` that makes uvicorn's loggers (``uvicorn.error``, ``uvicorn.access``) use it too."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"warmpod": {"()": formatter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "warmpod", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        # Their own handlers removed, uvicorn's and Litestar's records reach the root's. Litestar's
        # app puts a handler of its own on both when it is made: uvicorn applies this again after.
        "loggers": {
            **{
                name: {"level": level.upper(), "handlers": [], "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar")
            },
            # httpx logs every request it sends at INFO, a webhook's URL with it, and a tenant's
            # callback URL may carry a token of its own: only its warnings reach the log.
            "httpx": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }
    logging.config.dictConfig(config)
    return config
