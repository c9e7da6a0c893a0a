"""Logs: JSON lines, and no token or key ever reaches them."""

from __future__ import annotations

import io
import json
import logging

import structlog

from gastown_sandboxd.ops.logs import Redactor, configure_logging

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
KEY = "internal-key-0123456789"


def test_redactor_hides_jwts_and_secrets() -> None:
    """JWT-shaped strings become a fingerprint, secrets become [secret]."""
    scrub = Redactor([KEY]).scrub
    text = scrub(f"Bearer {TOKEN} with key {KEY}")
    assert TOKEN not in text
    assert KEY not in text
    assert "[jwt:" in text
    assert "[secret]" in text


def test_json_logs_are_redacted_end_to_end() -> None:
    """structlog and stdlib records both come out as redacted JSON lines."""
    stream = io.StringIO()
    configure_logging(format="json", level="debug", secrets=[KEY], stream=stream)
    try:
        structlog.get_logger("t").info("refresh_failed", body=f"got {TOKEN}", key=KEY)
        logging.getLogger("hypercorn.error").warning("peer sent %s", TOKEN)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "refresh_failed"
    assert len(lines) == 2
    assert lines[0]["level"] == "info"
    assert TOKEN not in stream.getvalue()
    assert KEY not in stream.getvalue()


def test_tracebacks_are_redacted_too() -> None:
    """An exception whose text holds a token or the key, logged by structlog or by a library
    through stdlib logging: the traceback comes out scrubbed like every other value."""
    stream = io.StringIO()
    configure_logging(format="json", level="debug", secrets=[KEY], stream=stream)
    try:
        for log in (structlog.get_logger("t").exception, logging.getLogger("hypercorn").exception):
            try:
                raise ValueError(f"refused {TOKEN} for {KEY}")
            except ValueError:
                log("failed")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert "ValueError: refused [jwt:" in line["exception"]
        assert "[secret]" in line["exception"]
    assert TOKEN not in stream.getvalue()
    assert KEY not in stream.getvalue()


def test_strings_inside_lists_and_dicts_are_redacted() -> None:
    """A hook's command logged at a reload (a list) or any nested value: scrubbed too."""
    stream = io.StringIO()
    configure_logging(format="json", level="debug", secrets=[KEY], stream=stream)
    try:
        structlog.get_logger("t").info(
            "options_reloaded",
            hooks=[["curl", "-H", f"x-internal-api-key: {KEY}", f"--data={TOKEN}"]],
            extra={"nested": (TOKEN, 7)},
        )
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    [line] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert line["hooks"][0][:2] == ["curl", "-H"]
    assert line["hooks"][0][2] == "x-internal-api-key: [secret]"
    assert line["extra"]["nested"][1] == 7
    assert TOKEN not in stream.getvalue()
    assert KEY not in stream.getvalue()
