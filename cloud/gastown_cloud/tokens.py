"""Mint and verify the gateway tokens of Gas Town sandboxes (HS256 JWTs).

Payload, exactly: `{"sub", "type": "gastown_sandbox", "town_id", "organization_id", "iat",
"exp"}` with `organization_id` a string or null and `iat`/`exp` integer Unix seconds. With
`TokenClaims.KILO` it also carries `kiloUserId` (= `sub`) and `version: 3`, which Kilo's real
gateway requires (`kilo_rule_met` is its rule).
"""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import jwt

from gastown_sandboxd.token.claims import MAX_LIFETIME, MIN_LIFETIME

from .errors import TokenInvalid

ALGORITHM = "HS256"
TOKEN_TYPE = "gastown_sandbox"  # noqa: S105 (a claim value, not a secret)
DEFAULT_LIFETIME = 86400
MAX_TOKEN_BYTES = 8192
_CLAIMS = ("sub", "type", "town_id", "organization_id", "iat", "exp")
KILO_VERSION = 3


class TokenClaims(enum.StrEnum):
    """Which payload the cloud mints: the seed's six claims, or those plus Kilo's two."""

    SEED = "seed"
    KILO = "kilo"


@dataclass(frozen=True, slots=True)
class GastownClaims:
    """The verified claims of a gateway token."""

    sub: str
    town_id: str
    organization_id: str | None
    iat: int
    exp: int
    # Kilo's claims as found in the payload (any JSON value, or None when absent).
    kilo_user_id: object = None
    version: object = None

    @property
    def lifetime(self) -> int:
        return self.exp - self.iat

    def kilo_rule_met(self) -> bool:
        """Kilo's gateway rule: `kiloUserId` a non-empty string and `version === 3`."""
        return kilo_rule_met({"kiloUserId": self.kilo_user_id, "version": self.version})


def kilo_rule_met(payload: dict[str, Any]) -> bool:
    """Kilo's gateway rule on a decoded payload (JavaScript `===`: 3.0 is 3, true is not)."""
    user, version = payload.get("kiloUserId"), payload.get("version")
    is_number = isinstance(version, int | float) and not isinstance(version, bool)
    return isinstance(user, str) and bool(user) and is_number and version == KILO_VERSION


def fingerprint(token: str) -> str:
    """The last 8 hex characters of the token's SHA-256: how logs name a token."""
    return hashlib.sha256(token.encode()).hexdigest()[-8:]


def mint_gastown_token(
    user_id: str,
    town_id: str,
    organization_id: str | None = None,
    *,
    secret: str,
    lifetime: int = DEFAULT_LIFETIME,
    now: int | None = None,
    claims: TokenClaims = TokenClaims.SEED,
) -> str:
    """A token for `user_id` in `town_id`, valid `lifetime` seconds from `now`."""
    iat = int(time.time()) if now is None else now
    payload: dict[str, Any] = {
        "sub": user_id,
        "type": TOKEN_TYPE,
        "town_id": town_id,
        "organization_id": organization_id,
        "iat": iat,
        "exp": iat + lifetime,
    }
    if claims is TokenClaims.KILO:
        payload |= {"kiloUserId": user_id, "version": KILO_VERSION}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify_gastown_token(
    token: str,
    *,
    secret: str,
    leeway: int = 0,
    verify_exp: bool = True,
    now: int | None = None,
) -> GastownClaims:
    """The claims of a well-signed HS256 token; raises `TokenInvalid` with a reason code.

    With `verify_exp=False` a well-signed expired token is accepted (the refresh binding).
    """
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise TokenInvalid("malformed", "the token is not a JWT of three segments")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise TokenInvalid("malformed", "the token header cannot be decoded") from exc
    if header.get("alg") != ALGORITHM:
        raise TokenInvalid("bad_algorithm", "only HS256 tokens are accepted")
    try:
        # Claims are checked below, each with its own reason code.
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": False,
                "verify_iss": False,
                "verify_sub": False,
                "verify_jti": False,
            },
        )
    except jwt.InvalidSignatureError as exc:
        raise TokenInvalid("bad_signature", "the token signature does not verify") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenInvalid("malformed", "the token cannot be decoded") from exc
    claims = _claims(payload)
    current = int(time.time()) if now is None else now
    if verify_exp and current >= claims.exp + leeway:
        raise TokenInvalid("expired", "the token has expired")
    # A lifetime no sandbox would take (CONTRACT §3) is no token of this cloud's either, even
    # well signed (a minter's bug: ten years long passed the refresh binding). Its issue time
    # is not judged against this clock: after an NTP step back every token minted in the
    # last hour would be refused at once, the gateway's and the binding's alike.
    if not MIN_LIFETIME <= claims.exp - claims.iat <= MAX_LIFETIME:
        raise TokenInvalid("bad_lifetime", "the token's lifetime is not 10 s to 7 days")
    return claims


def _claims(payload: dict[str, Any]) -> GastownClaims:
    missing = [name for name in _CLAIMS if name not in payload]
    if missing:
        raise TokenInvalid("missing_claim", f"the token lacks the claim {missing[0]}")
    if payload["type"] != TOKEN_TYPE:
        raise TokenInvalid("wrong_type", f"the token type is not {TOKEN_TYPE}")
    sub, town_id, org = payload["sub"], payload["town_id"], payload["organization_id"]
    iat, exp = payload["iat"], payload["exp"]
    if not (isinstance(sub, str) and sub and isinstance(town_id, str) and town_id):
        raise TokenInvalid("invalid_claim", "sub and town_id must be non-empty strings")
    if org is not None and not isinstance(org, str):
        raise TokenInvalid("invalid_claim", "organization_id must be a string or null")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (iat, exp)):
        raise TokenInvalid("invalid_claim", "iat and exp must be integers")
    return GastownClaims(
        sub=sub,
        town_id=town_id,
        organization_id=org,
        iat=iat,
        exp=exp,
        kilo_user_id=payload.get("kiloUserId"),
        version=payload.get("version"),
    )
