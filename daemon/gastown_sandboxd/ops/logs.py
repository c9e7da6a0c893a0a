"""Structured logs: JSON lines in production, readable lines on a terminal.

Every record passes a redaction step: anything shaped like a JWT and every configured secret
is replaced, so a slip elsewhere cannot put a token or the key into the logs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

_JWT = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
# A JWT whose header is a JSON object, as every one is (`{"` is `eyJ` in base64url): what an
# answer hides. The log's wider shape also takes host names of three long labels
# (`gastown-cloud.internal.kilocode`), which an error answer must show as they are.
JWT_WITH_HEADER = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


class Redactor:
    """A structlog processor that hides JWTs and the given secrets in every value."""

    def __init__(self, secrets: Iterable[str] = (), *, jwt: re.Pattern[str] = _JWT) -> None:
        self._secrets = tuple(s for s in secrets if s)
        self._jwt = jwt

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            event[key] = self.scrub_value(value)
        return event

    def scrub_value(self, value: Any) -> Any:
        """`scrub` of a string, and of every string inside lists, tuples and dicts (a hook's
        command, the problems of a reload): other values as they are."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, list | tuple):
            return [self.scrub_value(item) for item in value]
        if isinstance(value, dict):
            return {self.scrub_value(k): self.scrub_value(v) for k, v in value.items()}
        return value

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return self._jwt.sub(
            lambda m: "[jwt:" + hashlib.sha256(m[0].encode()).hexdigest()[-8:] + "]", text
        )


def configure_logging(
    *,
    format: str = "auto",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging (hypercorn, httpx) through one pipeline."""
    stream = stream or sys.stderr
    if format == "auto":
        format = "console" if stream.isatty() else "json"
    redactor = Redactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # The traceback as text before the redactor, which scrubs strings alone: an
        # exception's message can hold what a request or an answer held.
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; keep it to warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # watchfiles logs every batch at INFO; a log file in a watched folder would feed itself.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
