"""The log scrubber: a token or secret that slips into a log line is hidden."""

from __future__ import annotations

import io
import json

import structlog

from gastown_cloud.logs import Scrubber, configure_logging
from gastown_cloud.tokens import fingerprint, mint_gastown_token

SECRET = "s" * 40


def test_scrubber_hides_jwts_and_secrets() -> None:
    """JWTs become their fingerprint and configured secrets become `[secret]`."""
    token = mint_gastown_token("u", "t", secret=SECRET, now=1_700_000_000)
    event = Scrubber([SECRET])(None, "info", {"event": "x", "detail": f"{token} and {SECRET}"})
    assert event["detail"] == f"[jwt:{fingerprint(token)}] and [secret]"


def test_configured_logs_are_json_lines_without_secrets() -> None:
    """After `configure_logging`, events are JSON lines with level and time, secrets scrubbed."""
    stream = io.StringIO()
    configure_logging(secrets=[SECRET], stream=stream)
    try:
        structlog.get_logger("test").info("something_happened", key=SECRET, n=1)
    finally:
        structlog.reset_defaults()
    record = json.loads(stream.getvalue())
    assert record["event"] == "something_happened"
    assert record["level"] == "info"
    assert record["key"] == "[secret]"
    assert "timestamp" in record
