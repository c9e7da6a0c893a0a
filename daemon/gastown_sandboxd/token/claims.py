"""The gateway token: its claims and the rules that make it acceptable to the sandbox.

Pure: no I/O, no clock (callers pass `now`). The sandbox holds no signing secret, so it
checks structure and claims only; the cloud checks the signature. Structure includes the
signature's length: an HS256 signature is 32 bytes, 43 unpadded base64url characters, so a
token cut short inside its signature (a close-delimited body that lost its tail still matches
the three-segment pattern) is refused as `bad_signature`. Every segment must be canonical
base64url: no padding, length mod 4 != 1, unused trailing bits zero.

Every agent start through a shim and every call of Claude Code's helper reads these rules, so
they import little: records are `NamedTuple`s, not dataclasses (`dataclasses` imports
`inspect`), and `hashlib` (which loads OpenSSL) only when a fingerprint is asked for.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, NamedTuple, TypeGuard

from gastown_sandboxd._types import all_unicode
from gastown_sandboxd.errors import TokenError

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
MAX_TOKEN_BYTES = 8 * 1024
TOKEN_TYPE = "gastown_sandbox"  # noqa: S105 - a claim value, not a secret
ALGORITHM = "HS256"
SIGNATURE_BYTES = 32  # HMAC-SHA256
MIN_LIFETIME = 10
MAX_LIFETIME = 7 * 24 * 3600
MAX_IAT_AHEAD = 300
MAX_EXPIRY_MARGIN = 60


class Claims(NamedTuple):
    """The claims the sandbox reads; `organization_id` is None unless a string."""

    sub: str
    type: str
    town_id: str
    organization_id: str | None
    iat: int
    exp: int

    @property
    def lifetime(self) -> int:
        return self.exp - self.iat


class TokenView(NamedTuple):
    """What may be shown of a token: its claims and fingerprint, never the token."""

    sub: str
    organization_id: str | None
    iat: int
    exp: int
    fingerprint: str

    @classmethod
    def of(cls, token: str, claims: Claims) -> TokenView:
        return cls(
            sub=claims.sub,
            organization_id=claims.organization_id,
            iat=claims.iat,
            exp=claims.exp,
            fingerprint=fingerprint(token),
        )

    def expires_in(self, now: float) -> int:
        """Whole seconds until `exp`, 0 once it has passed."""
        return max(0, int(self.exp - now))

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "organization_id": self.organization_id,
            "iat": self.iat,
            "exp": self.exp,
            "expires_in": self.expires_in(now),
            "fingerprint": self.fingerprint,
        }


def fingerprint(token: str) -> str:
    """The last 8 hex characters of the token's SHA-256: how logs and APIs name a token."""
    import hashlib

    return hashlib.sha256(_bytes(token)).hexdigest()[-8:]


def _bytes(token: str) -> bytes:
    """The token as bytes, whatever text it is: a file's undecodable bytes come back as they
    were (surrogateescape), and a lone surrogate that a JSON escape (`"\\ud800"`) gave, which
    no UTF-8 holds, as its three bytes (surrogatepass) instead of an error."""
    try:
        return token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return token.encode("utf-8", "surrogatepass")


def decode_unverified(token: str) -> Claims:
    """The token's claims without checking the signature or the time.

    Raises `TokenError` when the token is not a JWT or a claim has the wrong type.
    """
    _header, payload, _signature = _decode(token)
    reasons = _type_reasons(payload)
    if reasons:
        raise TokenError(reasons)
    return _claims(payload)


def acceptability_reasons(token: str, *, town_id: str, now: float) -> list[str]:
    """Every reason the sandbox refuses `token` at `now`; an empty list means acceptable."""
    reasons: list[str] = []
    if len(_bytes(token)) > MAX_TOKEN_BYTES:
        reasons.append("too_long")
    try:
        header, payload, signature = _decode(token)
    except TokenError:
        return [*reasons, "malformed"]
    if header.get("alg") != ALGORITHM:
        reasons.append("bad_alg")
    elif signature is None or len(signature) != SIGNATURE_BYTES:
        reasons.append("bad_signature")
    if payload.get("type") != TOKEN_TYPE:
        reasons.append("wrong_type")
    if payload.get("town_id") != town_id:
        reasons.append("wrong_town")
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        reasons.append("bad_sub")
    iat, exp = payload.get("iat"), payload.get("exp")
    if not _is_int(iat):
        reasons.append("bad_iat")
    if not _is_int(exp):
        reasons.append("bad_exp")
    if _is_int(iat) and _is_int(exp):
        reasons.extend(time_reasons(iat, exp, now=now))
    return reasons


def time_reasons(iat: int, exp: int, *, now: float) -> list[str]:
    """The reasons about time alone: expiry margin, issue time, lifetime."""
    reasons: list[str] = []
    lifetime = exp - iat
    if exp - now <= min(MAX_EXPIRY_MARGIN, max(lifetime, 0) / 10):
        reasons.append("expired")
    if iat - now > MAX_IAT_AHEAD:
        reasons.append("issued_in_future")
    if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
        reasons.append("bad_lifetime")
    return reasons


def acceptable_claims(token: str, *, town_id: str, now: float) -> Claims:
    """The claims of an acceptable token; raises `TokenError` with every reason otherwise."""
    reasons = acceptability_reasons(token, town_id=town_id, now=now)
    if reasons:
        raise TokenError(reasons)
    return decode_unverified(token)


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes | None]:
    """Header and payload (JSON objects), and the signature's bytes (None if not base64url)."""
    if not isinstance(token, str) or TOKEN_PATTERN.fullmatch(token) is None:
        raise TokenError(["malformed"])
    header_text, payload_text, signature_text = token.split(".")
    return _object(header_text), _object(payload_text), _segment_bytes(signature_text)


def _object(segment: str) -> dict[str, Any]:
    raw = _segment_bytes(segment)
    if raw is None:
        raise TokenError(["malformed"])
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise TokenError(["malformed"]) from exc
    # A lone surrogate's escape is JSON by the grammar, and no answer, event or log line could
    # carry the claim it is in (`/status` answered 500 while such a `sub` was held).
    if not isinstance(value, dict) or (b"\\u" in raw and not all_unicode(value)):
        raise TokenError(["malformed"])
    return value


def _segment_bytes(segment: str) -> bytes | None:
    """The bytes of a canonical unpadded base64url segment, None if it is not one.

    Decoded here rather than by pyjwt: a bad signature segment must not hide the claims
    (the reason is `bad_signature`, not `malformed`), and older pyjwt releases decode laxly.
    """
    # TOKEN_PATTERN has already limited the alphabet; 4k+1 characters cannot encode bytes.
    if len(segment) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:
        return None
    # Canonical: the unused low bits of the last character are zero, as every encoder writes.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        return None
    return raw


def _type_reasons(payload: dict[str, Any]) -> list[str]:
    reasons: list[str] = []
    if not isinstance(payload.get("type"), str):
        reasons.append("wrong_type")
    if not isinstance(payload.get("town_id"), str):
        reasons.append("wrong_town")
    if not isinstance(payload.get("sub"), str):
        reasons.append("bad_sub")
    if not _is_int(payload.get("iat")):
        reasons.append("bad_iat")
    if not _is_int(payload.get("exp")):
        reasons.append("bad_exp")
    return reasons


def _claims(payload: dict[str, Any]) -> Claims:
    org = payload.get("organization_id")
    return Claims(
        sub=payload["sub"],
        type=payload["type"],
        town_id=payload["town_id"],
        organization_id=org if isinstance(org, str) else None,
        iat=payload["iat"],
        exp=payload["exp"],
    )


# The largest `iat` or `exp` read as a time: every integer below it is exact as a float, so
# the arithmetic against the clock's float `now` neither rounds nor overflows (JSON allows
# any number of digits, and `10**400 - 0.0` raises). Year 285,000,000: no real token is near.
MAX_TIMESTAMP = 2**53


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false arrive as bool, a subclass of int: not a timestamp.
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -MAX_TIMESTAMP < value < MAX_TIMESTAMP
    )
