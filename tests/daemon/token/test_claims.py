"""The acceptability rules of CONTRACT §3, one reason at a time."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import jwt
import pytest

from gastown_sandboxd.errors import TokenError
from gastown_sandboxd.token.claims import (
    Claims,
    TokenView,
    acceptability_reasons,
    acceptable_claims,
    decode_unverified,
    fingerprint,
)
from tests.daemon.minting import DAY, SECRET, SIGNATURE, TOWN, forge, mint

NOW = 1_800_000_000.0
HEADER = {"alg": "HS256", "typ": "JWT"}


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "user-1",
        "type": "gastown_sandbox",
        "town_id": TOWN,
        "organization_id": None,
        "iat": int(NOW),
        "exp": int(NOW) + DAY,
    }
    base.update(overrides)
    return base


def reasons(token: str, now: float = NOW) -> list[str]:
    return acceptability_reasons(token, town_id=TOWN, now=now)


def test_fresh_token_is_acceptable() -> None:
    """A token minted as the cloud mints it has no reason against it."""
    assert reasons(mint(NOW)) == []


def test_claims_are_decoded() -> None:
    """decode_unverified returns the claims without checking the signature."""
    token = jwt.encode(claims(organization_id="org-9"), "another-secret-of-32-bytes-or-more")
    assert decode_unverified(token) == Claims(
        sub="user-1",
        type="gastown_sandbox",
        town_id=TOWN,
        organization_id="org-9",
        iat=int(NOW),
        exp=int(NOW) + DAY,
    )


def test_organization_that_is_not_a_string_reads_as_none() -> None:
    """A non-string organization_id is shown as None rather than trusted."""
    assert decode_unverified(forge(HEADER, claims(organization_id=5))).organization_id is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c d",
        "a.b.c\n",
        "$(touch x).a.b",
        "a+b.c.d",
        "é.a.b",
    ],
)
def test_shapes_that_are_not_three_base64url_segments_are_malformed(token: str) -> None:
    """Anything but three base64url segments (even a trailing newline) is malformed."""
    assert reasons(token) == ["malformed"]


def test_segments_that_are_not_json_objects_are_malformed() -> None:
    """A JWT shape whose header or payload is not a JSON object is malformed."""
    assert reasons(forge([1], claims())) == ["malformed"]
    assert reasons(forge(HEADER, [1, 2])) == ["malformed"]
    assert reasons(forge(HEADER, b"not json")) == ["malformed"]


@pytest.mark.parametrize("text", ["\ud800", "abc\udc00"])
def test_text_no_utf8_holds_is_malformed_not_an_error(text: str) -> None:
    """A lone surrogate, which a JSON escape gives: in the token string itself (a cloud's
    answer `{"token": "\\ud800"}`), it is refused and fingerprinted, not an error; in a claim
    or the header (escaped, so the token is still ASCII), the token is malformed, since no
    answer, event or log line could carry that claim."""
    assert reasons(text) == ["malformed"]
    assert reasons(mint(NOW) + text) == ["malformed"]
    assert len(fingerprint(text)) == 8
    assert reasons(forge(HEADER, claims(sub=f"user-{text}"))) == ["malformed"]
    assert reasons(forge(HEADER, claims(organization_id=text))) == ["malformed"]
    assert reasons(forge({**HEADER, "kid": text}, claims())) == ["malformed"]
    with pytest.raises(TokenError):
        decode_unverified(forge(HEADER, claims(sub=text)))


def test_decode_unverified_refuses_malformed() -> None:
    """decode_unverified raises TokenError('malformed') for a non-JWT."""
    with pytest.raises(TokenError) as caught:
        decode_unverified("not-a-token")
    assert caught.value.reasons == ("malformed",)


def test_decode_unverified_refuses_wrong_claim_types() -> None:
    """decode_unverified names every claim whose type is wrong."""
    token = forge(HEADER, {"sub": 1, "type": None, "town_id": 2, "iat": "x", "exp": True})
    with pytest.raises(TokenError) as caught:
        decode_unverified(token)
    assert caught.value.reasons == ("wrong_type", "wrong_town", "bad_sub", "bad_iat", "bad_exp")


def test_exactly_8_kib_is_allowed_and_one_byte_more_is_too_long() -> None:
    """The size limit is 8 KiB inclusive."""
    base = mint(NOW, pad="")
    pad = 8192 - len(base)
    # Each 3 bytes of payload become 4 base64 characters; search the padding that lands exactly.
    token = base
    for extra in range(pad * 3 // 4 - 4, pad * 3 // 4 + 4):
        token = mint(NOW, pad="x" * extra)
        if len(token) == 8192:
            break
    assert len(token) == 8192
    assert reasons(token) == []
    longer = mint(NOW, pad="x" * (extra + 1))
    assert len(longer) > 8192
    assert reasons(longer) == ["too_long"]


def test_alg_none_is_refused() -> None:
    """`alg: none` is refused, with or without a signature segment."""
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert unsigned.endswith(".")
    assert reasons(unsigned) == ["malformed"]
    assert reasons(forge({"alg": "none"}, claims())) == ["bad_alg"]


@pytest.mark.parametrize("alg", ["HS512", "RS256", "hs256", None])
def test_other_algorithms_are_refused(alg: str | None) -> None:
    """Only HS256 is acceptable."""
    assert reasons(forge({"alg": alg}, claims())) == ["bad_alg"]


def test_header_without_alg_is_refused() -> None:
    """A header without alg has the wrong algorithm."""
    assert reasons(forge({"typ": "JWT"}, claims())) == ["bad_alg"]


@pytest.mark.parametrize("value", ["gastown", "", None, 1])
def test_wrong_type_is_refused(value: Any) -> None:
    """Only type gastown_sandbox is acceptable."""
    assert reasons(forge(HEADER, claims(type=value))) == ["wrong_type"]


def test_missing_type_is_refused() -> None:
    """A token without a type claim is the wrong type."""
    payload = claims()
    del payload["type"]
    assert reasons(forge(HEADER, payload)) == ["wrong_type"]


@pytest.mark.parametrize("value", ["town-2", "", None, 1, "TOWN-1"])
def test_another_town_is_refused(value: Any) -> None:
    """town_id must equal the configured town exactly."""
    assert reasons(forge(HEADER, claims(town_id=value))) == ["wrong_town"]


@pytest.mark.parametrize("value", ["", None, 7, ["user"]])
def test_sub_must_be_a_non_empty_string(value: Any) -> None:
    """sub is a non-empty string."""
    assert reasons(forge(HEADER, claims(sub=value))) == ["bad_sub"]


@pytest.mark.parametrize("value", [True, False, 1.8e9, "1800000000", None])
def test_iat_must_be_an_integer(value: Any) -> None:
    """iat is an integer: not a bool, a float, a string or null."""
    assert reasons(forge(HEADER, claims(iat=value))) == ["bad_iat"]


@pytest.mark.parametrize("value", [True, 1.8e9 + DAY, str(int(NOW) + DAY), None])
def test_exp_must_be_an_integer(value: Any) -> None:
    """exp is an integer: not a bool, a float, a string or null."""
    assert reasons(forge(HEADER, claims(exp=value))) == ["bad_exp"]


@pytest.mark.parametrize("field", ["iat", "exp"])
@pytest.mark.parametrize("value", [2**53, -(2**53), 10**400])
def test_a_time_beyond_a_floats_exact_range_is_refused_not_an_error(field: str, value: int) -> None:
    """An integer iat or exp at 2**53 or beyond (JSON allows any length) is refused as bad,
    never compared with the clock (`10**400 - 0.0` raises), and not decoded either."""
    token = forge(HEADER, claims(**{field: value}))
    assert reasons(token) == [f"bad_{field}"]
    with pytest.raises(TokenError):
        decode_unverified(token)


def test_the_largest_exact_time_is_still_read() -> None:
    """One below 2**53 is an integer time like any other: far-future, so too long a life."""
    assert reasons(forge(HEADER, claims(exp=2**53 - 1))) == ["bad_lifetime"]


def test_expiry_margin_is_sixty_seconds_for_long_tokens() -> None:
    """A 24 h token is refused 60 s before exp, accepted 61 s before."""
    token = mint(NOW)
    exp = NOW + DAY
    assert reasons(token, now=exp - 61) == []
    assert reasons(token, now=exp - 60) == ["expired"]
    assert reasons(token, now=exp + 1) == ["expired"]


def test_expiry_margin_is_a_tenth_of_short_lifetimes() -> None:
    """A 20 s token is refused 2 s before exp, accepted 3 s before."""
    token = mint(NOW, lifetime=20)
    assert reasons(token, now=NOW + 17) == []
    assert reasons(token, now=NOW + 18) == ["expired"]


def test_iat_may_be_300_seconds_ahead_but_not_more() -> None:
    """Clock skew up to 300 s is tolerated for iat."""
    assert reasons(mint(NOW + 300), now=NOW) == []
    assert reasons(mint(NOW + 301), now=NOW) == ["issued_in_future"]


@pytest.mark.parametrize(("lifetime", "ok"), [(9, False), (10, True), (7 * DAY, True)])
def test_lifetime_bounds(lifetime: int, ok: bool) -> None:
    """Lifetimes from 10 s to 7 days are acceptable."""
    assert (reasons(mint(NOW, lifetime=lifetime)) == []) is ok


def test_lifetime_above_seven_days_is_refused() -> None:
    """A lifetime one second over 7 days is refused."""
    assert reasons(mint(NOW, lifetime=7 * DAY + 1)) == ["bad_lifetime"]


def test_negative_lifetime_is_refused_and_expired() -> None:
    """exp before iat is a bad lifetime, and such a token is expired too."""
    token = forge(HEADER, claims(iat=int(NOW), exp=int(NOW) - 100))
    assert reasons(token) == ["expired", "bad_lifetime"]


def test_every_reason_is_reported_at_once() -> None:
    """A token that breaks every rule gets every reason."""
    payload = claims(type="x", town_id="other", sub="", iat=int(NOW) + 1000, exp=int(NOW) + 1003)
    token = forge({"alg": "none"}, {**payload, "pad": "x" * 9000})
    assert reasons(token) == [
        "too_long",
        "bad_alg",
        "wrong_type",
        "wrong_town",
        "bad_sub",
        "issued_in_future",
        "bad_lifetime",
    ]


def test_acceptable_claims_raises_with_every_reason() -> None:
    """acceptable_claims raises TokenError listing the reasons, without the token."""
    token = mint(NOW, town_id="town-2", lifetime=5)
    with pytest.raises(TokenError) as caught:
        acceptable_claims(token, town_id=TOWN, now=NOW)
    assert caught.value.reasons == ("wrong_town", "bad_lifetime")
    assert token not in str(caught.value)


def test_acceptable_claims_returns_claims() -> None:
    """acceptable_claims returns the decoded claims of a good token."""
    assert acceptable_claims(mint(NOW), town_id=TOWN, now=NOW).lifetime == DAY


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def payload_segment(length_mod: int) -> str:
    """The base64url of good claims whose length is `length_mod` modulo 4 (0, 2 or 3)."""
    for pad in range(3):
        segment = b64(json.dumps(claims(pad="x" * pad)).encode())
        if len(segment) % 4 == length_mod:
            return segment
    raise AssertionError(length_mod)


def with_low_bit_set(segment: str) -> str:
    """The same bytes spelled with a non-zero unused bit in the last character."""
    last = ALPHABET.index(segment[-1])
    assert last & 1 == 0
    return segment[:-1] + ALPHABET[last | 1]


@pytest.mark.parametrize("cut", range(1, 11))
def test_token_cut_inside_its_signature_is_refused(cut: int) -> None:
    """A real token cut 1 to 10 characters short still matches the pattern, yet is refused."""
    token = mint(NOW)
    assert len(token.rsplit(".", 1)[1]) == 43
    assert reasons(token) == []
    assert reasons(token[:-cut]) == ["bad_signature"]


@pytest.mark.parametrize("extra", ["A", "AA", "AAAA", "AAAAAAAA"])
def test_signature_longer_than_32_bytes_is_refused(extra: str) -> None:
    """An HS256 signature longer than 43 characters is not a signature the cloud made."""
    assert reasons(mint(NOW) + extra) == ["bad_signature"]


def test_signature_with_non_canonical_trailing_bits_is_refused() -> None:
    """43 characters whose last one has non-zero unused bits are not a canonical signature."""
    token = forge(HEADER, claims())
    assert reasons(token) == []
    assert reasons(with_low_bit_set(token)) == ["bad_signature"]


def test_signature_length_is_judged_for_hs256_only() -> None:
    """Another algorithm is refused for its alg alone, whatever its signature looks like."""
    assert reasons(forge({"alg": "none"}, claims(), "c2ln")) == ["bad_alg"]
    assert reasons(forge({"alg": "HS512"}, claims(), "A")) == ["bad_alg"]
    assert reasons(forge(HEADER, claims(), "c2ln")) == ["bad_signature"]


def test_bad_signature_comes_with_the_other_reasons() -> None:
    """A cut token of another town gets both reasons, and its claims still decode."""
    token = mint(NOW, town_id="town-2")[:-3]
    assert reasons(token) == ["bad_signature", "wrong_town"]
    assert decode_unverified(token).town_id == "town-2"


@pytest.mark.parametrize("length_mod", [2, 3])
def test_non_canonical_header_or_payload_is_malformed(length_mod: int) -> None:
    """Header and payload must be canonical base64url: no stray bits in the last character."""
    header = b64(json.dumps(HEADER).encode())
    payload = payload_segment(length_mod)
    assert reasons(f"{header}.{payload}.{SIGNATURE}") == []
    assert reasons(f"{header}.{with_low_bit_set(payload)}.{SIGNATURE}") == ["malformed"]
    short_header = b64(b'{"alg": "HS256"}')
    assert len(short_header) % 4 == 2
    assert reasons(f"{short_header}.{payload}.{SIGNATURE}") == []
    assert reasons(f"{with_low_bit_set(short_header)}.{payload}.{SIGNATURE}") == ["malformed"]


def test_segment_of_4k_plus_1_characters_is_malformed() -> None:
    """A header or payload whose length is 1 modulo 4 encodes no bytes at all."""
    header = b64(json.dumps(HEADER).encode())
    payload = payload_segment(0)
    assert reasons(f"{header}.{payload}.{SIGNATURE}") == []
    assert reasons(f"{header}.{payload}A.{SIGNATURE}") == ["malformed"]
    assert len(header) % 4 == 0
    assert reasons(f"{header}A.{payload}.{SIGNATURE}") == ["malformed"]
    with pytest.raises(TokenError):
        decode_unverified(f"{header}.{payload}A.{SIGNATURE}")


def test_signature_is_not_checked() -> None:
    """A token signed with a secret the sandbox does not know is still acceptable."""
    assert reasons(jwt.encode(claims(), SECRET + "-other", algorithm="HS256")) == []


def test_fingerprint_is_last_8_hex_of_sha256() -> None:
    """fingerprint names a token by the end of its SHA-256."""
    token = mint(NOW)
    assert fingerprint(token) == hashlib.sha256(token.encode()).hexdigest()[-8:]
    assert len(fingerprint(token)) == 8


def test_token_view_shows_metadata_and_never_the_token() -> None:
    """TokenView.as_json has the claims, expires_in and fingerprint, and repr hides the token."""
    token = mint(NOW)
    view = TokenView.of(token, decode_unverified(token))
    assert view.as_json(NOW + 100) == {
        "sub": "user-1",
        "organization_id": "org-1",
        "iat": int(NOW),
        "exp": int(NOW) + DAY,
        "expires_in": DAY - 100,
        "fingerprint": fingerprint(token),
    }
    assert view.as_json(NOW + 2 * DAY)["expires_in"] == 0
    assert token not in repr(view)
