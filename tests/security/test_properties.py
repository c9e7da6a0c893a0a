"""Properties of the two parsers that guard the shell: the env file and the token checks.

tests/daemon/test_envfile.py and test_token.py pin examples; these generate the inputs. The
token oracle here is written from CONTRACT §3 alone, not from gastown_sandboxd.token.claims.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jwt
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gastown_sandboxd.errors import TokenError
from gastown_sandboxd.token.claims import acceptability_reasons, decode_unverified
from gastown_sandboxd.token.envfile import EnvFile

TOWN = "town-prop"
NOW = 1_800_000_000
SECRET = "property-secret-that-is-at-least-32-bytes"
DAY = 86400
TOKEN = jwt.encode(
    {"sub": "u", "type": "gastown_sandbox", "town_id": TOWN, "iat": NOW, "exp": NOW + DAY},
    SECRET,
    algorithm="HS256",
)

# --- the env file -----------------------------------------------------------------------


def is_token_line(line: str) -> bool:
    """Whether bash would read the line as an assignment to KILO_JWT (export or not)."""
    rest = line.lstrip(" \t")
    if re.match(r"export[ \t]+", rest):
        rest = re.sub(r"^export[ \t]+", "", rest)
    return rest.startswith("KILO_JWT=")


def lines_of(text: str) -> list[str]:
    """Lines split after each "\\n" only, as bash splits them."""
    return re.findall(r"[^\n]*\n|[^\n]+", text)


token_lines = st.sampled_from(
    [
        "KILO_JWT=old\n",
        "export KILO_JWT=old\n",
        "  KILO_JWT='quoted old' # note\n",
        "\texport\tKILO_JWT=\n",
        "KILO_JWT=old\r\n",
        "KILO_JWT=last-without-newline",
    ]
)
other_lines = st.one_of(
    st.text(st.characters(blacklist_characters="\n"), max_size=30).map(lambda s: s + "\n"),
    st.sampled_from(
        [
            "# KILO_JWT=commented\n",
            "KILO_JWTX=other\n",
            "XKILO_JWT=other\n",
            "export KILO_JWT_OLD=1\n",
            "\n",
            "A=1\r\n",
            "B='two words'\n",
            "\x0bvertical tab line\n",
        ]
    ),
)
env_texts = st.lists(st.one_of(other_lines, token_lines), max_size=12).map("".join)


@given(st.text())
@example("")
@example("A=1")
@example("\r\n\r")
def test_parsing_and_rendering_any_text_gives_it_back(text: str) -> None:
    """Every text, however odd, renders back byte for byte."""
    assert EnvFile.parse(text).render() == text


@given(st.binary())
def test_any_bytes_survive_a_round_trip(data: bytes) -> None:
    """Bytes that are not UTF-8 survive parse and render too."""
    assert EnvFile.from_bytes(data).to_bytes() == data


@given(env_texts)
def test_setting_the_token_keeps_every_other_line_byte_identical(text: str) -> None:
    """Setting KILO_JWT leaves exactly one KILO_JWT line, where the first was (or at the end),
    and every other line as it was, in order."""
    result = EnvFile.parse(text).with_value("KILO_JWT", TOKEN).render()
    before, after = lines_of(text), lines_of(result)
    assert [line for line in after if is_token_line(line)] == [f"KILO_JWT={TOKEN}\n"]
    kept = [line for line in before if not is_token_line(line)]
    others = [line for line in after if not is_token_line(line)]
    if kept and not kept[-1].endswith("\n") and not any(map(is_token_line, before)):
        kept[-1] += "\n"  # the token line is appended after a last line that lacked "\n"
    assert others == kept
    first = next((i for i, line in enumerate(before) if is_token_line(line)), None)
    position = after.index(f"KILO_JWT={TOKEN}\n")
    expected = len(kept) if first is None else sum(not is_token_line(x) for x in before[:first])
    assert position == expected
    assert EnvFile.parse(result).get("KILO_JWT") == TOKEN


@given(env_texts, st.sampled_from([TOKEN, TOKEN[::-1].replace(".", "_", 1)]))
def test_setting_the_token_twice_is_setting_it_once(text: str, other: str) -> None:
    """Setting a value then the token gives the same file as setting the token alone."""
    once = EnvFile.parse(text).with_value("KILO_JWT", TOKEN)
    twice = EnvFile.parse(text).with_value("KILO_JWT", other).with_value("KILO_JWT", TOKEN)
    assert twice.render() == once.render()


safe_values = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-./ ", max_size=12)
bash_lines = st.one_of(
    token_lines,
    st.sampled_from(["# comment\n", "\n", "export PATH_EXTRA=/opt/bin\n"]),
    st.builds(
        lambda name, value: f"{name}='{value}'\n",
        st.from_regex(r"[A-Z]{1,6}", fullmatch=True),
        safe_values,
    ),
)


# Every example overwrites the same file, so one tmp_path for all of them is fine.
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(bash_lines, max_size=8).map("".join))
def test_bash_sourcing_the_written_file_gives_the_token(tmp_path: Path, text: str) -> None:
    """`set -a; . FILE; set +a` in bash gives exactly the token set (a few files only)."""
    path = tmp_path / "env"
    path.write_bytes(EnvFile.parse(text).with_value("KILO_JWT", TOKEN).to_bytes())
    done = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; set +a; printf %s "$KILO_JWT"', "_", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert done.stdout == TOKEN


# --- the token ---------------------------------------------------------------------------

PATTERN = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def oracle(token: str, header: dict[str, Any], claims: dict[str, Any]) -> bool:
    """CONTRACT §3, read on its own: is the token built from `header` and `claims` acceptable
    at NOW for TOWN?"""

    def integer(value: object) -> bool:
        return type(value) is int

    iat, exp = claims.get("iat"), claims.get("exp")
    if not (integer(iat) and integer(exp)):
        return False
    assert isinstance(iat, int)
    assert isinstance(exp, int)
    lifetime = exp - iat
    sub = claims.get("sub")
    return (
        len(token.encode()) <= 8 * 1024
        and PATTERN.match(token) is not None
        and header.get("alg") == "HS256"
        and claims.get("type") == "gastown_sandbox"
        and claims.get("town_id") == TOWN
        and isinstance(sub, str)
        and sub != ""
        and exp - NOW > min(60, lifetime / 10)
        and iat - NOW <= 300
        and 10 <= lifetime <= 7 * DAY
    )


near = st.sampled_from([-1, 0, 1])  # either side of a boundary, and on it
lifetimes = st.one_of(
    st.sampled_from([9, 10, 11, 7 * DAY - 1, 7 * DAY, 7 * DAY + 1]),
    st.builds(lambda base, d: base + d, st.sampled_from([100, 600, 601]), near),
    st.integers(10, 7 * DAY),
    st.integers(-100, 8 * DAY),
)
odd_values = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=4))


def sometimes(draw: st.DrawFn, good: Any, bad: st.SearchStrategy[Any]) -> Any:
    """`good` eleven times in twelve, else a value drawn from `bad`."""
    return good if draw(st.integers(0, 11)) else draw(bad)


@st.composite
def tokens(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A token from claims near every boundary (most of them valid, so both answers come
    up), signed HS256 or forged with another algorithm."""
    lifetime = draw(lifetimes)
    timing = draw(st.sampled_from(["issued", "expiring"]))
    if timing == "issued":  # iat around now, or near the 300 s ahead limit
        ahead = st.one_of(
            st.integers(-600, 400), st.integers(-3 * DAY, 400), st.sampled_from([299, 300, 301])
        )
        iat = NOW + draw(ahead)
        exp = iat + lifetime
    else:  # exp around the margin: the smaller of 60 s and a tenth of the lifetime
        margin = min(60, max(lifetime, 0) // 10)
        exp = NOW + margin + draw(st.integers(-2, 2))
        iat = exp - lifetime
    claims: dict[str, Any] = {
        "sub": sometimes(draw, "user-1", st.one_of(st.text(max_size=3), st.none(), st.integers())),
        "type": sometimes(draw, "gastown_sandbox", st.sampled_from(["gastown", "", None])),
        "town_id": sometimes(draw, TOWN, st.sampled_from(["town-other", TOWN.upper(), None])),
        "organization_id": draw(st.one_of(st.none(), st.text(max_size=3), st.integers())),
        "iat": sometimes(draw, iat, odd_values),
        "exp": sometimes(draw, exp, odd_values),
    }
    if not draw(st.integers(0, 11)):
        claims.pop(draw(st.sampled_from(sorted(claims))))
    claims.update(draw(st.dictionaries(st.text("xyz", min_size=1, max_size=3), odd_values)))
    alg = sometimes(draw, "HS256", st.sampled_from(["none", "HS512", "RS256", None]))
    header: dict[str, Any] = {"typ": "JWT"} if alg is None else {"alg": alg, "typ": "JWT"}
    if alg == "HS256":
        token = jwt.encode(claims, SECRET, algorithm="HS256")
    else:
        segments = [json.dumps(header).encode(), json.dumps(claims).encode(), b"s" * 32]
        token = ".".join(b64(segment) for segment in segments)
    return token, header, claims


def built(iat: int, lifetime: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """An HS256 token with valid claims but for `iat` and `exp = iat + lifetime`."""
    claims = {"sub": "u", "type": "gastown_sandbox", "town_id": TOWN, "iat": iat}
    claims["exp"] = iat + lifetime
    return jwt.encode(claims, SECRET, algorithm="HS256"), {"alg": "HS256"}, claims


# Each boundary of §3 from both sides, whatever the random draw finds.
BOUNDARIES = [
    built(NOW, 9),
    built(NOW, 10),
    built(NOW - DAY, 7 * DAY),
    built(NOW - DAY, 7 * DAY + 1),
    built(NOW + 300, DAY),
    built(NOW + 301, DAY),
    built(NOW + 60 - DAY, DAY),  # exp exactly 60 s ahead: refused
    built(NOW + 61 - DAY, DAY),
    built(NOW + 10 - 100, 100),  # a tenth of 100 s is 10 s
    built(NOW + 11 - 100, 100),
]


def at_the_boundaries(test: Any) -> Any:
    """Add every BOUNDARIES case as an explicit example."""
    for case in BOUNDARIES:
        test = example(case)(test)
    return test


@settings(max_examples=1000)
@given(tokens())
@at_the_boundaries
def test_a_token_is_acceptable_exactly_when_the_rules_hold(
    case: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    """For tokens built from random claims, the daemon accepts exactly those the contract's
    rules accept."""
    token, header, claims = case
    reasons = acceptability_reasons(token, town_id=TOWN, now=NOW)
    event("acceptable" if not reasons else f"refused: {len(reasons)} reason(s)")
    assert (reasons == []) == oracle(token, header, claims), (reasons, header, claims)


jwt_shaped = st.lists(
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1),
    min_size=3,
    max_size=3,
).map(".".join)
encoded_garbage = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=6,
        ).map(lambda value: json.dumps(value).encode()),
    ),
    min_size=3,
    max_size=3,
).map(lambda parts: ".".join(b64(part) for part in parts))


@settings(max_examples=300)
@given(st.one_of(st.text(), jwt_shaped, encoded_garbage))
@example("a.b.c")
@example("e30.e30.e30")
@example("W10.W10.c2ln")
@example("." * 3)
@example("\udcff.\udcff.\udcff")
def test_random_strings_never_raise(text: str) -> None:
    """Random text, JWT-shaped strings and encoded garbage get reasons, never an exception;
    decoding raises TokenError alone."""
    reasons = acceptability_reasons(text, town_id=TOWN, now=NOW)
    assert isinstance(reasons, list)
    with contextlib.suppress(TokenError):
        decode_unverified(text)
