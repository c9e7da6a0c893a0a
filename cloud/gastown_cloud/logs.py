"""Structured logs of the cloud: JSON lines on stderr, with tokens and secrets scrubbed.

Routes never log a token or the key; the scrubber makes a slip harmless anyway: a JWT becomes
`[jwt:<last 8 hex of its SHA-256>]` and each configured secret `[secret]`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TextIO

import structlog

from gastown_sandboxd.ops.logs import Redactor

# One scrubber for both services: the daemon's redaction step (JWTs and given secrets).
Scrubber = Redactor


def configure_logging(
    *, secrets: Iterable[str] = (), stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    """JSON lines from `level` up to `stream` (stderr by default: stdout carries only answers)."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            Scrubber(secrets),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
