"""Structured logs of the cloud: JSON lines on stderr, with tokens and secrets scrubbed.

Routes never log a token or the key; the scrubber makes a slip harmless anyway: a JWT becomes
`[jwt:<last 8 hex of its SHA-256>]` and each configured secret `[secret]`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TextIO

from gastown_sandboxd.ops import logs as sandbox_logs
from gastown_sandboxd.ops.logs import Redactor

# One scrubber for both services: the daemon's redaction step (JWTs and given secrets).
Scrubber = Redactor


def configure_logging(
    *, secrets: Iterable[str] = (), stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    """JSON lines from `level` up to `stream` (stderr by default: stdout carries only answers),
    through the daemon's one pipeline of structlog and stdlib logging: hypercorn's own lines
    (`Running on …`, its errors) are JSON too, where they were its plain text on stderr."""
    sandbox_logs.configure_logging(
        format="json",
        level=logging.getLevelName(level).lower(),
        secrets=secrets,
        stream=stream,
    )
