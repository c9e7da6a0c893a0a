"""Minting and verifying gateway tokens, without a server."""

from __future__ import annotations

import base64
import dataclasses
import json

import jwt
import pytest

from gastown_cloud.errors import TokenInvalid
from gastown_cloud.tokens import (
    GastownClaims,
    fingerprint,
    mint_gastown_token,
    verify_gastown_token,
)

SECRET = "s" * 32 + "-test-secret"
OTHER = "o" * 32 + "-other-secret"
NOW = 1_700_000_000


def _b64(data: dict[str, object]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _payload(token: str) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def _reason(token: str, **kwargs: object) -> str:
    with pytest.raises(TokenInvalid) as caught:
        verify_gastown_token(token, secret=SECRET, now=NOW, **kwargs)  # type: ignore[arg-type]
    if token:
        assert token not in str(caught.value)
    return caught.value.reason


def test_mint_payload_is_exact() -> None:
    """The payload holds exactly sub, type, town_id, organization_id, iat and exp."""
    token = mint_gastown_token("user-1", "town-1", "org-1", secret=SECRET, now=NOW)
    assert _payload(token) == {
        "sub": "user-1",
        "type": "gastown_sandbox",
        "town_id": "town-1",
        "organization_id": "org-1",
        "iat": NOW,
        "exp": NOW + 86400,
    }
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_mint_without_organization_writes_null() -> None:
    """A town without an organisation gets `organization_id: null`, not a missing claim."""
    token = mint_gastown_token("user-1", "town-1", secret=SECRET, now=NOW)
    payload = _payload(token)
    assert "organization_id" in payload
    assert payload["organization_id"] is None


def test_mint_lifetime_sets_exp() -> None:
    """`exp` is `iat + lifetime`."""
    token = mint_gastown_token("u", "t", secret=SECRET, lifetime=30, now=NOW)
    assert _payload(token)["exp"] == NOW + 30


def test_verify_round_trip() -> None:
    """A fresh token verifies into frozen claims equal to what was minted."""
    token = mint_gastown_token("user-1", "town-1", "org-1", secret=SECRET, now=NOW)
    claims = verify_gastown_token(token, secret=SECRET, now=NOW + 10)
    assert claims == GastownClaims("user-1", "town-1", "org-1", NOW, NOW + 86400)
    assert claims.lifetime == 86400
    with pytest.raises(dataclasses.FrozenInstanceError):
        claims.sub = "other"  # type: ignore[misc]


def test_expired_token_is_refused() -> None:
    """A token at or past `exp` is refused with reason `expired`."""
    token = mint_gastown_token("u", "t", secret=SECRET, lifetime=60, now=NOW - 60)
    assert _reason(token) == "expired"


def test_leeway_extends_acceptance() -> None:
    """`leeway` accepts a token that expired less than `leeway` seconds ago."""
    token = mint_gastown_token("u", "t", secret=SECRET, lifetime=60, now=NOW - 65)
    assert verify_gastown_token(token, secret=SECRET, leeway=10, now=NOW).exp == NOW - 5


def test_verify_exp_false_accepts_expired() -> None:
    """With `verify_exp=False` a well-signed expired token verifies (the refresh binding)."""
    token = mint_gastown_token("u", "t", secret=SECRET, lifetime=60, now=NOW - 3600)
    assert verify_gastown_token(token, secret=SECRET, verify_exp=False, now=NOW).sub == "u"


def test_other_secret_is_bad_signature() -> None:
    """A token signed with another secret is refused with `bad_signature`."""
    token = mint_gastown_token("u", "t", secret=OTHER, now=NOW)
    assert _reason(token) == "bad_signature"
    assert _reason(token, verify_exp=False) == "bad_signature"


def test_alg_none_is_refused() -> None:
    """An unsigned `alg: none` token is refused with `bad_algorithm`."""
    claims = _payload(mint_gastown_token("u", "t", secret=SECRET, now=NOW))
    token = jwt.encode(claims, None, algorithm="none")
    assert _reason(token) == "bad_algorithm"
    assert _reason(token, verify_exp=False) == "bad_algorithm"


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_refused(alg: str) -> None:
    """Tokens signed with the right secret but another algorithm are refused."""
    claims = _payload(mint_gastown_token("u", "t", secret=SECRET, now=NOW))
    assert _reason(jwt.encode(claims, SECRET + "x" * 32, algorithm=alg)) == "bad_algorithm"


@pytest.mark.parametrize("alg", ["none", "HS512", "RS256", "hs256"])
def test_forged_header_is_refused(alg: str) -> None:
    """A valid token whose header is swapped for another `alg` is refused."""
    token = mint_gastown_token("u", "t", secret=SECRET, now=NOW)
    _, body, signature = token.split(".")
    forged = f"{_b64({'alg': alg, 'typ': 'JWT'})}.{body}.{signature}"
    assert _reason(forged) == "bad_algorithm"


def test_header_claiming_hs256_over_other_signature_is_bad_signature() -> None:
    """A token whose header says HS256 while signed otherwise fails the signature check."""
    claims = _payload(mint_gastown_token("u", "t", secret=SECRET, now=NOW))
    _, body, signature = jwt.encode(claims, SECRET * 2, algorithm="HS512").split(".")
    forged = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{body}.{signature}"
    assert _reason(forged) == "bad_signature"


@pytest.mark.parametrize("claim", ["sub", "type", "town_id", "organization_id", "iat", "exp"])
def test_missing_claim_is_refused(claim: str) -> None:
    """Every claim is required, `organization_id` included (it may be null)."""
    claims = _payload(mint_gastown_token("u", "t", "o", secret=SECRET, now=NOW))
    del claims[claim]
    assert _reason(jwt.encode(claims, SECRET, algorithm="HS256")) == "missing_claim"


def test_wrong_type_is_refused() -> None:
    """A token of another `type` is refused with `wrong_type`."""
    claims = _payload(mint_gastown_token("u", "t", secret=SECRET, now=NOW))
    claims["type"] = "session"
    assert _reason(jwt.encode(claims, SECRET, algorithm="HS256")) == "wrong_type"


@pytest.mark.parametrize(("before", "after"), [(60, 10 * 365 * 86400), (5, 4)])
def test_a_well_signed_token_of_a_lifetime_no_sandbox_takes_is_refused(
    before: int, after: int
) -> None:
    """A lifetime outside 10 s to 7 days (CONTRACT §3): refused though well signed (a
    minter's bug; before, a ten-year token passed the refresh binding). 10 s and 7 days
    pass; a token issued ahead of this clock passes too (the cloud's own clock may step)."""
    claims = _payload(mint_gastown_token("u", "t", secret=SECRET, now=NOW))
    token = jwt.encode({**claims, "iat": NOW - before, "exp": NOW + after}, SECRET)
    assert _reason(token) == "bad_lifetime"
    for iat, exp in (
        (NOW - 5, NOW + 5),
        (NOW - 60, NOW - 60 + 7 * 86400),
        (NOW + 3600, NOW + 7200),
    ):
        edge = jwt.encode({**claims, "iat": iat, "exp": exp}, SECRET)
        assert verify_gastown_token(edge, secret=SECRET, now=NOW).exp == exp


@pytest.mark.parametrize(
    ("claim", "value"),
    [("sub", ""), ("sub", 7), ("town_id", None), ("organization_id", 3), ("iat", "1"),
     ("exp", 1.5), ("exp", True)],
)  # fmt: skip
def test_badly_typed_claim_is_refused(claim: str, value: object) -> None:
    """Claims of the wrong type are refused with `invalid_claim`."""
    claims = _payload(mint_gastown_token("u", "t", secret=SECRET, now=NOW))
    claims[claim] = value
    assert _reason(jwt.encode(claims, SECRET, algorithm="HS256")) == "invalid_claim"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "!!!.???.###", f"{_b64({'alg': 'HS256'})}.e30", "x" * 9000],
)
def test_malformed_token_is_refused(token: str) -> None:
    """Strings that are not three-segment JWTs are refused with `malformed`."""
    assert _reason(token) == "malformed"


def test_non_object_payload_is_malformed() -> None:
    """A signed token whose payload is not a JSON object is refused with `malformed`."""
    token = jwt.PyJWS().encode(b"[1]", SECRET, algorithm="HS256")
    assert _reason(token) == "malformed"


def test_fingerprint_is_last_eight_hex_of_sha256() -> None:
    """Logs name a token by the last 8 hex characters of its SHA-256."""
    assert fingerprint("abc") == "f20015ad"
