"""`token_helper.sh`, Claude Code's apiKeyHelper: the token itself when it is plainly
acceptable, and `gastown-sandboxd token` in every other case; never a token the rules refuse.

The script runs under the real shells (dash as /bin/sh, and bash), with a stand-in for Python
that records how it was called: a run that printed the token never started Python.
"""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gastown_sandboxd.agents import claude as claude_module
from gastown_sandboxd.agents.claude import HELPER_SCRIPT, helper_command, is_daemon_helper
from gastown_sandboxd.agents.exec import usable
from gastown_sandboxd.token import claims
from tests.daemon.minting import SIGNATURE, TOWN, forge, mint

SHELLS = [shell for shell in ("/bin/sh", "bash") if shutil.which(shell)]
HEADER = {"alg": "HS256", "typ": "JWT"}
# The stand-in for Python: what `gastown-sandboxd token` would have been asked.
RECORDER = """#!/bin/sh
printf '%s\\n' "$@" > "$0.args"
"""


class Helper:
    """The script with an env file and a recording stand-in for Python, in `folder`."""

    def __init__(self, folder: Path, shell: str = "/bin/sh") -> None:
        self.env_file, self.socket = folder / ".env.gateway", folder / "d.sock"
        self.python = folder / "python"
        self.python.write_text(RECORDER)
        self.python.chmod(0o755)
        self.shell = shell

    def run(
        self, env_text: str | None, *, town: str | None = None, **env: str
    ) -> tuple[str, list[str] | None]:
        """(stdout, the arguments Python got or None when it never ran); `town`: the town the
        line carries, as the keeper writes it."""
        if env_text is not None:
            self.env_file.write_text(env_text)
        args = Path(f"{self.python}.args")
        args.unlink(missing_ok=True)
        argv = [self.shell, HELPER_SCRIPT, str(self.env_file), str(self.socket), str(self.python)]
        argv += [town] if town is not None else []
        done = subprocess.run(
            [shutil.which(argv[0]) or argv[0], *argv[1:]],
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stderr == ""
        called = args.read_text().splitlines() if args.exists() else None
        return done.stdout, called

    def full_argv(self, town: str | None = None) -> list[str]:
        """What `gastown-sandboxd token` gets: the same paths and town, the light entry."""
        return [
            *("-I", "-m", "gastown_sandboxd.agents", "token"),
            *("--env-file", str(self.env_file), "--socket", str(self.socket)),
            *(("--town-id", town) if town is not None else ()),
        ]


@pytest.fixture(params=SHELLS)
def helper(request: pytest.FixtureRequest, tmp_path: Path) -> Helper:
    return Helper(tmp_path, request.param)


def test_a_fresh_token_is_printed_without_python(helper: Helper) -> None:
    """The daemon's own env file with a fresh token: the token and a newline, nothing else,
    and Python never started; the same with the token's town named in TOWN_ID."""
    token = mint(time.time())
    text = f"# gateway for agents\nKILO_BASE=https://api.kilo.ai\nKILO_JWT={token}\n"
    assert helper.run(text) == (f"{token}\n", None)
    assert helper.run(text, TOWN_ID=TOWN) == (f"{token}\n", None)


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _raw(payload: bytes, signature: str = SIGNATURE) -> str:
    """A token whose header is the usual HS256 one and whose payload encodes `payload`."""
    return f"{_segment(_compact(HEADER))}.{_segment(payload)}.{signature}"


NOW = int(time.time())
GOOD = {"sub": "u", "type": "gastown_sandbox", "town_id": TOWN, "iat": NOW, "exp": NOW + 3600}
GOOD_TEXT = _compact(GOOD)
FRESH = mint(NOW)


def _with(**claims: Any) -> str:
    return _raw(_compact({**GOOD, **claims}))


def _replaced(old: bytes, new: bytes) -> str:
    assert old in GOOD_TEXT
    return _raw(GOOD_TEXT.replace(old, new))


def test_the_cases_below_differ_from_an_acceptable_token_only_where_they_say() -> None:
    """The base of the hand-made cases is acceptable and plainly so: the script prints it,
    so each case below falls back for its own reason, not for the base's."""
    assert usable(_raw(GOOD_TEXT), TOWN)
    assert _raw(GOOD_TEXT).split(".")[0] == FRESH.split(".")[0]  # pyjwt's header, as the cloud's


def _line(token: str) -> str:
    return f"KILO_JWT={token}\n"


@pytest.mark.parametrize(
    ("case", "env_text"),
    [
        ("no env file", None),
        ("expired", _line(mint(NOW - 2 * 86400))),
        ("within the expiry margin", _line(mint(NOW - 86400 + 30))),
        ("issued ahead", _line(mint(NOW + 600))),
        ("lifetime too long", _line(mint(NOW, lifetime=8 * 86400))),
        ("lifetime too short", _line(_with(exp=NOW + 5))),
        ("another type", _line(_with(type="gastown_api"))),
        ("no sub", _line(_with(sub=""))),
        ("exp a string", _line(_with(exp=str(NOW + 3600)))),
        ("exp a fraction", _line(_with(exp=NOW + 3600.5))),
        ("exp true", _line(_with(exp=True))),
        ("exported", "export " + _line(FRESH)),
        ("quoted", f'KILO_JWT="{FRESH}"\n'),
        ("a comment naming it after", _line(FRESH) + "# KILO_JWT was set above\n"),
        ("CRLF", _line(FRESH)[:-1] + "\r\n"),
        ("empty", "KILO_JWT=\n"),
        ("another header", _line(forge({"alg": "HS256"}, GOOD))),
        ("a short signature", _line(_raw(GOOD_TEXT, SIGNATURE[:-1]))),
        ("a signature not canonical", _line(_raw(GOOD_TEXT, SIGNATURE[:-1] + "B"))),
        ("four segments", _line(FRESH + ".x")),
        ("a payload with spaces", _line(_raw(json.dumps(GOOD).encode()))),
        ("exp twice", _line(_replaced(b"}", b',"exp":1}'))),
        ("a leading zero", _line(_replaced(b'"iat":', b'"iat":0'))),
        ("an escape", _line(_with(sub='a"b'))),
        ("a control byte", _line(_replaced(b'"u"', b'"u\x01"'))),
        ("a NUL byte", _line(_replaced(b'"u"', b'"u\x00"'))),
        ("a trailing newline", _line(_raw(GOOD_TEXT + b"\n"))),
        ("nested", _line(_with(x={}))),
        ("not UTF-8", _line(_replaced(b'"u"', b'"\xff"'))),
        # Python's json refuses an integer of more than 4,300 digits, in any field (the
        # script printed it: wider than the rules).
        ("a long number elsewhere", _line(_replaced(b"}", b',"n":' + b"1" * 4301 + b"}"))),
        ("a 16-digit number elsewhere", _line(_replaced(b"}", b',"n":' + b"1" * 16 + b"}"))),
    ],
)
def test_anything_not_plainly_acceptable_goes_to_python(
    helper: Helper, case: str, env_text: str | None
) -> None:
    """Each case becomes `gastown-sandboxd token` with the same paths (which judges it in
    full and asks the daemon to refresh), and prints nothing of its own."""
    assert helper.run(env_text) == ("", helper.full_argv()), case


@pytest.mark.parametrize(
    ("tool", "prints"),
    [("date", "%s"), ("date", "0999999999999"), ("date", "9" * 20), ("base64", None)],
    ids=["date without %s", "date with a leading zero", "date of 20 digits", "no base64"],
)
def test_a_missing_or_odd_tool_goes_to_python(
    helper: Helper, tmp_path: Path, tool: str, prints: str | None
) -> None:
    """A `date` that prints no number (no `%s`) or an odd one (a leading zero is octal to
    the shell: bash went on past the error and printed an expired token, dash stopped), or
    no `base64` on PATH: the script hands over to Python rather than fail or guess; it never
    exits without an answer."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("date", "base64"):
        if name == tool and tool == "date":
            (tools / name).write_text(f"#!/bin/sh\necho {prints}\n")
            (tools / name).chmod(0o755)
        elif name != tool:
            (tools / name).symlink_to(shutil.which(name) or name)
    text = f"KILO_JWT={mint(time.time() - 2 * 86400)}\n"  # expired: only python may judge
    assert helper.run(text, PATH=str(tools)) == ("", helper.full_argv())


def test_another_town_goes_to_python(helper: Helper) -> None:
    """TOWN_ID set to another town: not this sandbox's token; Python is told the town."""
    text = f"KILO_JWT={mint(time.time())}\n"
    assert helper.run(text, TOWN_ID="town-2") == ("", helper.full_argv("town-2"))


def test_the_town_the_line_carries_is_checked_without_town_id(helper: Helper) -> None:
    """The keeper's line carries the daemon's town: a token of another town goes to Python
    (which refuses it) though the agent's environment has no TOWN_ID, and the line's town
    wins over a TOWN_ID the agent inherited. Before, with no TOWN_ID, the script printed
    another town's token (a copied env file), and its usage was billed to that town."""
    text = f"KILO_JWT={mint(time.time())}\n"
    assert helper.run(text, town="town-2") == ("", helper.full_argv("town-2"))
    assert helper.run(text, town="town-2", TOWN_ID=TOWN) == ("", helper.full_argv("town-2"))
    token = mint(time.time())
    assert helper.run(f"KILO_JWT={token}\n", town=TOWN) == (f"{token}\n", None)


# Claims drawn near every boundary the rules draw, values of the wrong kind, and often a
# token acceptable with room to spare (so that both outcomes are drawn many times).
_CLAIMS = st.fixed_dictionaries(
    {
        "iat": st.one_of(
            st.integers(-3600, 0),
            st.integers(-700_000, 700_000),
            st.sampled_from([-86_400, -86_340, -1, 1, 299, 300, 301]),
        ),
        "lifetime": st.one_of(
            st.sampled_from([86_400, 3600, 600, 604_800]),
            st.integers(-5, 700_000),
            st.sampled_from([9, 10, 11, 59, 61, 599, 601, 604_801]),
        ),
        "type": st.sampled_from(["gastown_sandbox"] * 4 + ["gastown_api", 5]),
        "town_id": st.sampled_from([TOWN, TOWN, TOWN, "town-2", None, 7]),
        "sub": st.sampled_from(["user-1", "user-1", "user-1", "", None, 3]),
        "extra": st.sampled_from([{}, {"organization_id": None}, {"jti": "x"}, {"n": True}]),
    }
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(claims=_CLAIMS, town_set=st.booleans())
def test_the_script_never_prints_a_token_the_rules_refuse(
    tmp_path_factory: pytest.TempPathFactory, claims: dict[str, Any], town_set: bool
) -> None:
    """Whatever the claims, a token the script prints is acceptable by the daemon's rules
    (`usable`, as `gastown-sandboxd token` judges it) both before and after the run; any
    other is handed to `gastown-sandboxd token`. And the script is not merely cautious: a
    token acceptable with seconds to spare, whose claims are of the kinds the rules name,
    is printed."""
    helper = Helper(tmp_path_factory.mktemp("helper"))
    now = int(time.time())
    iat, lifetime = now + claims["iat"], claims["lifetime"]
    payload = {"sub": claims["sub"], "type": claims["type"], "iat": iat, "exp": iat + lifetime}
    payload = {key: value for key, value in payload.items() if value is not None}
    if claims["town_id"] is not None:
        payload["town_id"] = claims["town_id"]
    payload.update(claims["extra"])
    token = _raw(_compact(payload))
    town = TOWN if town_set else None
    before = usable(token, town)
    out, called = helper.run(_line(token), **({"TOWN_ID": TOWN} if town_set else {}))
    after = usable(token, town)
    event("printed" if out else "handed on")
    if out:
        assert (out, called) == (f"{token}\n", None)
        assert before
        assert after
        return
    assert called == helper.full_argv(town)
    margin = min(60, max(lifetime, 0) / 10)
    spare = claims["iat"] + lifetime > margin + 5 and claims["iat"] <= 295
    kinds = isinstance(claims["town_id"], str | None)
    assert not (before and after and spare and kinds)


def test_the_helper_line_runs_the_script_by_absolute_paths(tmp_path: Path) -> None:
    """The line the daemon writes: /bin/sh, the script, the env file, the socket, Python;
    recognised as the daemon's, as is the line of earlier releases."""
    line = helper_command(python="/venv/bin/python", env_file=tmp_path / "e", socket=tmp_path / "s")
    assert shlex.split(line) == [
        "/bin/sh",
        HELPER_SCRIPT,
        str(tmp_path / "e"),
        str(tmp_path / "s"),
        "/venv/bin/python",
    ]
    assert is_daemon_helper(line)
    earlier = "/venv/bin/python -I -m gastown_sandboxd.agents token --env-file /e --socket /s"
    assert is_daemon_helper(earlier)
    assert not is_daemon_helper("/bin/sh /elsewhere/helper.sh /e /s /p")


def test_without_the_script_on_disk_the_line_runs_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package imported from a zip has no script a shell can read: the helper line is then
    `gastown-sandboxd token` itself, which prints the same token, and is still the daemon's."""
    monkeypatch.setattr(
        claude_module, "HELPER_SCRIPT", str(tmp_path / "zipped" / "token_helper.sh")
    )
    env_file = tmp_path / ".env.gateway"
    token = mint(time.time())
    env_file.write_text(f"KILO_JWT={token}\n")
    line = helper_command(python=sys.executable, env_file=env_file, socket=tmp_path / "s")
    assert shlex.split(line)[1:5] == ["-I", "-m", "gastown_sandboxd.agents", "token"]
    assert is_daemon_helper(line)
    done = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, check=True)
    assert done.stdout == f"{token}\n"


def test_the_script_draws_its_lines_where_the_rules_do() -> None:
    """The numbers and the type the script checks are those of `token/claims.py`, so the
    two cannot drift apart unseen (the property test above checks the decisions)."""
    text = Path(HELPER_SCRIPT).read_text()
    expected = [
        f'[ "${{#token}}" -le {claims.MAX_TOKEN_BYTES} ]',
        f'[ "${{type}}" = {claims.TOKEN_TYPE} ]',
        f'[ "${{#signature}}" -eq {(claims.SIGNATURE_BYTES * 8 + 5) // 6} ]',
        f'[ "${{lifetime}}" -ge {claims.MIN_LIFETIME} ]',
        f'[ "${{lifetime}}" -le {claims.MAX_LIFETIME} ]',
        f"margin={claims.MAX_EXPIRY_MARGIN}",
        f'[ "${{lifetime}}" -ge {claims.MAX_EXPIRY_MARGIN * 10} ] || margin=',
        f"[ $((iat - now)) -le {claims.MAX_IAT_AHEAD - 1} ]",
    ]
    assert [line for line in expected if line not in text] == []
    assert claims.ALGORITHM == "HS256"
    assert _segment(_compact(HEADER)) in text


def test_the_script_is_posix_and_shellcheck_clean() -> None:
    """dash and bash parse it; shellcheck (as sh, every optional check but brace style)
    finds nothing."""
    for shell in SHELLS:
        subprocess.run([shell, "-n", HELPER_SCRIPT], check=True)
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        [tool, "--shell=sh", "--enable=all", "--exclude=SC2250", HELPER_SCRIPT],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
