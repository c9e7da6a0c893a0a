"""Structured logs of the cloud: JSON lines on stderr, with tokens and secrets scrubbed.

Routes never log a token or the key; the scrubber makes a slip harmless anyway: a JWT becomes
`[jwt:<last 8 hex of its SHA-256>]` and each configured secret `[secret]`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from .tokens import fingerprint

_JWT = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


class Scrubber:
    """A structlog processor that hides JWTs and the given secrets in every string value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(secret for secret in secrets if secret)

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if isinstance(value, str):
                event[key] = self.scrub(value)
        return event

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return _JWT.sub(lambda match: f"[jwt:{fingerprint(match[0])}]", text)


def configure_logging(*, secrets: Iterable[str] = (), stream: TextIO | None = None) -> None:
    """JSON lines to `stream` (stderr by default: stdout carries only the listening line)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            Scrubber(secrets),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
