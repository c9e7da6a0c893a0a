"""Tokens for the token tests, minted with pyjwt and a test secret as the cloud mints them."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt

SECRET = "test-secret-that-is-at-least-32-bytes-long"
TOWN = "town-1"
DAY = 24 * 3600


def mint(
    now: float,
    *,
    lifetime: int = DAY,
    town_id: str = TOWN,
    sub: Any = "user-1",
    organization_id: str | None = "org-1",
    **overrides: Any,
) -> str:
    """An HS256 gastown token issued at `now`; `overrides` replace or add claims."""
    iat = int(now)
    payload: dict[str, Any] = {
        "sub": sub,
        "type": "gastown_sandbox",
        "town_id": town_id,
        "organization_id": organization_id,
        "iat": iat,
        "exp": iat + lifetime,
    }
    payload.update(overrides)
    return jwt.encode(payload, SECRET, algorithm="HS256")


# 43 base64url characters: the length of a real HS256 signature (32 bytes).
SIGNATURE = base64.urlsafe_b64encode(b"not-a-real-hmac-sha256-signature").rstrip(b"=").decode()


def forge(header: Any, payload: Any, signature: str = SIGNATURE) -> str:
    """A JWT-shaped string with any header and payload (JSON-encoded), for hostile cases."""

    def segment(value: Any) -> str:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{segment(header)}.{segment(payload)}.{signature}"
