"""The server's log formats: one JSON object a line, or text with its fields, for uvicorn's records too."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn

from warmpod import logs
from warmpod.http.app import create_app
from warmpod.settings import from_env

_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "litestar", "httpx")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put back the loggers ``logs.configure`` changes, as pytest set them."""
    saved = {
        name: (logger.handlers[:], logger.level, logger.propagate)
        for name in _LOGGERS
        for logger in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def record(name: str, msg: str, *args: object, **extra: object) -> logging.LogRecord:
    """An INFO record of logger ``name``, as ``logger.info(msg, *args, extra=extra)`` makes it."""
    return logging.getLogger(name).makeRecord(name, logging.INFO, __file__, 1, msg, args, None, extra=extra)


def test_json_is_one_object_a_line_with_time_level_logger_event_and_fields() -> None:
    """A record becomes one line of JSON: its UTC time in ISO 8601, level, logger, message and
    every field its caller passed, even when the message spans lines."""
    line = logs.JsonFormatter().format(
        record(
            "warmpod.queue.workers", "run %s\nfinished", "x", run_id="ab12", limits_hit=["memory"], key=None
        )
    )
    assert "\n" not in line
    body = json.loads(line)
    assert body.pop("time").endswith("+00:00")
    assert body == {
        "level": "info",
        "logger": "warmpod.queue.workers",
        "event": "run x\nfinished",
        "run_id": "ab12",
        "limits_hit": ["memory"],
        "key": None,
    }
    time = datetime.fromisoformat(json.loads(line)["time"])
    assert time.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - time) < timedelta(minutes=1)


def test_json_carries_the_traceback_and_drops_uvicorns_coloured_copy() -> None:
    """An exception's traceback is a field of its line; uvicorn's ``color_message`` is not."""
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.getLogger("uvicorn.error").makeRecord(
            "uvicorn.error", logging.ERROR, __file__, 1, "failed", (), sys.exc_info(),
            extra={"color_message": "\x1b[31mfailed\x1b[0m"},
        )  # fmt: skip
    body = json.loads(logs.JsonFormatter().format(failed))
    assert body["level"] == "error"
    assert "ValueError: boom" in body["exception"]
    assert "color_message" not in body


def test_an_access_line_has_its_parts_as_fields() -> None:
    """uvicorn's access record gives its client, method, path, HTTP version and status as fields."""
    access = record(
        "uvicorn.access", '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/health", "1.1", 200
    )
    body = json.loads(logs.JsonFormatter().format(access))
    assert body["event"] == '127.0.0.1:5000 - "GET /health HTTP/1.1" 200'
    assert (body["client"], body["method"], body["path"], body["http_version"], body["status_code"]) == (
        "127.0.0.1:5000",
        "GET",
        "/health",
        "1.1",
        200,
    )


def test_text_is_a_line_for_a_terminal_with_the_fields_after_it() -> None:
    """Text reads ``LEVEL logger: message``, then the record's fields as ``name=value``."""
    text = logs.TextFormatter().format(
        record("warmpod.queue.workers", "run finished", status="failed", key=None)
    )
    assert text == 'INFO warmpod.queue.workers: run finished status="failed" key=null'
    assert (
        logs.TextFormatter().format(record("warmpod.sandbox.pool", "plain"))
        == "INFO warmpod.sandbox.pool: plain"
    )


@pytest.mark.usefixtures("restore_logging")
def test_json_covers_warmpods_uvicorns_and_litestars_loggers(capsys: pytest.CaptureFixture[str]) -> None:
    """Set up as ``warmpod serve`` does (the app made, then uvicorn's config), every record of
    warmpod, uvicorn and Litestar reaches stderr as one JSON object a line, and nothing else."""
    config = logs.configure("json")
    app = create_app(from_env({}))  # Litestar's own logging set-up runs here
    uvicorn.Config(app, log_config=config, log_level="info")
    for name in ("warmpod.queue.workers", "uvicorn.error", "uvicorn.access", "litestar"):
        logging.getLogger(name).info("from %s", name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    out, err = capsys.readouterr()
    assert out == ""
    lines = [json.loads(line) for line in err.splitlines()]
    assert [(line["logger"], line["event"]) for line in lines] == [
        (name, f"from {name}")
        for name in ("warmpod.queue.workers", "uvicorn.error", "uvicorn.access", "litestar")
    ]


@pytest.mark.usefixtures("restore_logging")
def test_httpx_request_lines_stay_out_of_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    """httpx's INFO line per request (a webhook's URL, which may hold a tenant's token) is not
    logged; its warnings are."""
    logs.configure("json")
    logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:9/hook?token=secret "HTTP/1.1 204"')
    logging.getLogger("httpx").warning("a warning")
    for handler in logging.getLogger().handlers:
        handler.flush()
    _, err = capsys.readouterr()
    assert [json.loads(line)["event"] for line in err.splitlines()] == ["a warning"]
