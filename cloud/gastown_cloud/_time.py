"""Times as the API writes them: RFC 3339 in UTC with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(unix_seconds: float) -> str:
    """`2025-01-31T12:00:00Z` for the given Unix time (whole seconds)."""
    moment = datetime.fromtimestamp(int(unix_seconds), UTC)
    return moment.isoformat().replace("+00:00", "Z")
