"""packaging/refresh-token.sh, run for real (bash, curl, python3) against clouds on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.fixtures.cloud import CloudServer, launch_cloud
from tests.fixtures.net import unused_port

from .conftest import StandInCloud

SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "refresh-token.sh"
TOWN = "town-7f3a9c"
KEY = "internal-key-for-tests-0123456789"
SECRET = "stand-in-signing-secret-" + "s" * 48  # 64+ bytes, so HS512 raises no warning
# Any JWT starts with base64url('{"'): nothing the script prints may hold one.
JWT_MARK = re.compile(rb"eyJ[A-Za-z0-9_-]{4,}")
DROP = object()

ENV_TEXT = (
    "# gateway settings, sourced by agents\n"
    "KILO_API_URL=https://api.example.test\n"
    'export MODEL="anthropic/claude sonnet"\n'
    "\n"
    "KILO_JWT=not-yet-a-token\n"
    "# KILO_JWT=a comment that stays\n"
    "  export KILO_JWT=duplicate\n"
    "KILO_JWT_EXTRA=kept\n"
    "LAST=no newline at the end"
)


def env_with(token: str) -> str:
    """ENV_TEXT as the daemon writes it: first KILO_JWT line replaced, the others dropped."""
    return (
        "# gateway settings, sourced by agents\n"
        "KILO_API_URL=https://api.example.test\n"
        'export MODEL="anthropic/claude sonnet"\n'
        "\n"
        f"KILO_JWT={token}\n"
        "# KILO_JWT=a comment that stays\n"
        "KILO_JWT_EXTRA=kept\n"
        "LAST=no newline at the end"
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(
    town: str = TOWN, *, lifetime: int = 86400, ahead: int = 0, **changes: Any
) -> dict[str, Any]:
    """Claims as the cloud mints them, `ahead` seconds in the future, with `changes` applied."""
    iat = int(time.time()) + ahead
    payload: dict[str, Any] = {
        "sub": "user-1",
        "type": "gastown_sandbox",
        "town_id": town,
        "organization_id": None,
        "iat": iat,
        "exp": iat + lifetime,
    }
    for name, value in changes.items():
        if value is DROP:
            del payload[name]
        else:
            payload[name] = value
    return payload


def mint(town: str = TOWN, **kwargs: Any) -> str:
    """An HS256 token like the cloud's (see `claims`)."""
    return jwt.encode(claims(town, **kwargs), SECRET, algorithm="HS256")


# As long as an HS256 signature (32 bytes), so that only the header and payload are judged.
SIGNATURE = b64(b"not-a-real-hmac-sha256-signature")


def craft(header: Mapping[str, Any], payload: Mapping[str, Any], signature: str = SIGNATURE) -> str:
    """A token with any header, unsigned: the script checks structure and claims only."""
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), signature]
    )


@dataclass(frozen=True)
class FileState:
    """What `leaving the env file as it was` means: same bytes, mode, inode and mtime."""

    data: bytes | None
    mode: int | None
    inode: int | None
    mtime_ns: int | None

    @classmethod
    def of(cls, path: Path) -> FileState:
        try:
            info = path.stat()
        except FileNotFoundError:
            return cls(None, None, None, None)
        return cls(path.read_bytes(), stat.S_IMODE(info.st_mode), info.st_ino, info.st_mtime_ns)


@dataclass
class Sandbox:
    """A home folder with an env file, a private TMPDIR and the script's environment."""

    home: Path
    tmpdir: Path
    env: dict[str, str]
    secrets: list[str] = field(default_factory=lambda: [KEY])

    @property
    def env_file(self) -> Path:
        return self.home / ".env.gateway"

    def write_env(self, text: str, mode: int = 0o644) -> FileState:
        self.env_file.write_text(text)
        self.env_file.chmod(mode)
        return FileState.of(self.env_file)

    async def run(
        self, overrides: Mapping[str, str | None] | None = None, *, prefix: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the script with the sandbox's environment, `overrides` set (None unsets)."""
        env = dict(self.env)
        for name, value in (overrides or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return await anyio.run_process(
            [*prefix, "bash", str(SCRIPT)], env=env, cwd=self.home, check=False
        )

    def token(self) -> str:
        """The KILO_JWT a shell gets by sourcing the env file, as agents do."""
        shell = 'set -a; . "$1"; set +a; printf %s "$KILO_JWT"'
        out = subprocess.run(
            ["bash", "-c", shell, "_", str(self.env_file)], capture_output=True, check=True
        )
        return out.stdout.decode()


def make_sandbox(tmp_path: Path, url: str, town: str = TOWN, key: str = KEY) -> Sandbox:
    home = tmp_path / "home"
    tmpdir = tmp_path / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    # The venv's python3 first: the script needs only a python3 with the standard library.
    path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
    )
    env = {
        "PATH": path,
        "HOME": str(home),
        "TMPDIR": str(tmpdir),
        "TOWN_ID": town,
        "CLOUD_API_URL": url,
        "INTERNAL_API_KEY": key,
    }
    return Sandbox(home=home, tmpdir=tmpdir, env=env, secrets=[key])


@pytest.fixture
def sandbox(tmp_path: Path, standin_cloud: StandInCloud) -> Sandbox:
    """A sandbox whose cloud is the stand-in."""
    return make_sandbox(tmp_path, standin_cloud.url)


def assert_quiet_about_secrets(
    result: subprocess.CompletedProcess[bytes], sandbox: Sandbox
) -> None:
    for stream in (result.stdout, result.stderr):
        assert not JWT_MARK.search(stream)
        for secret in sandbox.secrets:
            assert secret.encode() not in stream


def assert_no_leftovers(sandbox: Sandbox) -> None:
    assert list(sandbox.tmpdir.iterdir()) == []
    assert [p.name for p in sandbox.home.iterdir() if p.name.startswith(".env.gateway.")] == []


def assert_failed(
    result: subprocess.CompletedProcess[bytes], sandbox: Sandbox, before: FileState, code: int = 1
) -> str:
    """Exit `code`, one line on stderr, nothing on stdout, the env file untouched; the line."""
    assert result.returncode == code, result.stderr
    assert result.stdout == b""
    assert result.stderr.endswith(b"\n")
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("refresh-token: ")
    assert FileState.of(sandbox.env_file) == before
    assert_quiet_about_secrets(result, sandbox)
    assert_no_leftovers(sandbox)
    return lines[0]


def assert_refreshed(
    result: subprocess.CompletedProcess[bytes], sandbox: Sandbox, token: str
) -> None:
    """Exit 0, one line on stdout, the env file holds `token` once, mode 0600."""
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert len(result.stdout.decode().splitlines()) == 1
    lines = sandbox.env_file.read_text().splitlines()
    assert lines.count(f"KILO_JWT={token}") == 1
    assert [line for line in lines if "KILO_JWT=" in line and not line.startswith("#")] == [
        f"KILO_JWT={token}"
    ]
    assert stat.S_IMODE(sandbox.env_file.stat().st_mode) == 0o600
    assert sandbox.token() == token
    assert_quiet_about_secrets(result, sandbox)
    assert_no_leftovers(sandbox)


# --- success ---------------------------------------------------------------------------------


async def test_writes_token_and_keeps_every_other_line(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """An acceptable token replaces KILO_JWT once, every other line and comment stays, mode 0600."""
    sandbox.write_env(ENV_TEXT)
    token = mint()
    standin_cloud.answer_text(token)
    result = await sandbox.run()
    assert_refreshed(result, sandbox, token)
    assert sandbox.env_file.read_text() == env_with(token)
    assert b"refreshed" in result.stdout
    assert TOWN.encode() in result.stdout


async def test_sends_the_contract_request(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """The request is a JSON POST with the town id and the key header, no Bearer without a token."""
    standin_cloud.answer_text(mint())
    result = await sandbox.run()
    assert result.returncode == 0, result.stderr
    [request] = standin_cloud.requests
    assert request.path == "/api/gastown/refresh-token"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {"townId": TOWN}
    assert request.headers["x-internal-api-key"] == KEY
    assert "authorization" not in request.headers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1", "A=1\nKILO_JWT={}\n"),
        ("A=1\n", "A=1\nKILO_JWT={}\n"),
        ("", "KILO_JWT={}\n"),
        ("KILO_JWT=old", "KILO_JWT={}\n"),
        ("\tKILO_JWT=old\r\nB=2\r\n", "KILO_JWT={}\nB=2\r\n"),
        ("A='x\\'\nKILO_JWT=1\nKILO_JWT=2\n", "A='x\\'\nKILO_JWT={}\n"),
    ],
    ids=["no-final-newline", "final-newline", "empty", "only-token", "crlf", "backslash"],
)
async def test_line_endings_are_kept(
    sandbox: Sandbox, standin_cloud: StandInCloud, text: str, expected: str
) -> None:
    """Lines other than KILO_JWT keep their bytes and endings, as the daemon's writer keeps them."""
    sandbox.write_env(text)
    token = mint()
    standin_cloud.answer_text(token)
    assert_refreshed(await sandbox.run(), sandbox, token)
    assert sandbox.env_file.read_bytes() == expected.format(token).encode()


async def test_creates_a_missing_env_file(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """A sandbox without an env file gets one holding only the token line, mode 0600."""
    token = mint()
    standin_cloud.answer_text(token)
    result = await sandbox.run()
    assert_refreshed(result, sandbox, token)
    assert sandbox.env_file.read_text() == f"KILO_JWT={token}\n"


async def test_second_run_binds_with_the_current_token(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """A run with a token on disk sends it as Bearer, and the next token replaces it."""
    first, second = mint(), mint(sub="user-1", lifetime=86000)
    standin_cloud.answer_text(first)
    assert_refreshed(await sandbox.run(), sandbox, first)
    standin_cloud.answer_text(second)
    assert_refreshed(await sandbox.run(), sandbox, second)
    assert standin_cloud.requests[1].headers["authorization"] == f"Bearer {first}"


@pytest.mark.parametrize(
    "line",
    [
        "KILO_JWT={} ",
        "KILO_JWT={} # from createTown",
        "KILO_JWT='{}'  ",
        'export KILO_JWT="{}"\r',
        "KILO_JWT={}; export KILO_JWT",
    ],
)
async def test_the_token_binds_whatever_follows_it_on_its_line(
    sandbox: Sandbox, standin_cloud: StandInCloud, line: str
) -> None:
    """Lines bash and the daemon read as the token: trailing blanks, a comment, quotes, a CR,
    `; export KILO_JWT`. The script cut only a CR and one quote each side, sent no Bearer,
    and the cloud's 401 came back on every run."""
    old = mint(ahead=-600)
    sandbox.write_env("A=1\n" + line.format(old) + "\n", mode=0o600)
    new = mint()
    standin_cloud.answer_text(new)
    assert_refreshed(await sandbox.run(), sandbox, new)
    assert standin_cloud.requests[0].headers["authorization"] == f"Bearer {old}"


async def test_a_symlinked_env_file_is_written_where_it_leads(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """The env file a link to a file elsewhere: the new token goes into that file and the link
    stays (the rename had replaced the link with a file of its own)."""
    old = mint(ahead=-600)
    target = sandbox.env_file.parent / "volume" / "env.gateway"
    target.parent.mkdir()
    target.write_text(f"A=1\nKILO_JWT={old}\n")
    target.chmod(0o600)
    sandbox.env_file.unlink(missing_ok=True)
    sandbox.env_file.symlink_to(target)
    new = mint()
    standin_cloud.answer_text(new)
    assert_refreshed(await sandbox.run(), sandbox, new)
    assert sandbox.env_file.is_symlink()
    assert target.read_text() == f"A=1\nKILO_JWT={new}\n"


async def test_an_expired_token_still_binds(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """An expired token of this town is still sent as Bearer (the cloud accepts expired ones)."""
    old = mint(ahead=-7200, lifetime=3600)
    sandbox.write_env(f"KILO_JWT={old}\n", mode=0o600)
    new = mint()
    standin_cloud.answer_text(new)
    assert_refreshed(await sandbox.run(), sandbox, new)
    assert standin_cloud.requests[0].headers["authorization"] == f"Bearer {old}"


@pytest.mark.parametrize(
    "current",
    [mint("another-town"), "garbage", "a.b.c\r\nx-injected: 1", ""],
    ids=["other-town", "garbage", "header-injection", "empty"],
)
async def test_no_bearer_without_a_token_of_this_town(
    sandbox: Sandbox, standin_cloud: StandInCloud, current: str
) -> None:
    """A KILO_JWT that is not a token of this town is not sent: the cloud would refuse it."""
    sandbox.write_env(f"KILO_JWT={current}\n")
    token = mint()
    standin_cloud.answer_text(token)
    assert_refreshed(await sandbox.run(), sandbox, token)
    assert "authorization" not in standin_cloud.requests[0].headers
    assert "x-injected" not in standin_cloud.requests[0].headers


async def test_no_bearer_with_a_cut_signature(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """A token of this town whose signature was cut is not sent: the cloud would answer 403."""
    sandbox.write_env(f"KILO_JWT={mint()[:-3]}\n")
    token = mint()
    standin_cloud.answer_text(token)
    assert_refreshed(await sandbox.run(), sandbox, token)
    assert "authorization" not in standin_cloud.requests[0].headers


async def test_unchanged_token_writes_nothing(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """When the cloud answers the token already on disk, the env file is not rewritten."""
    token = mint()
    before = sandbox.write_env(f"# mine\nKILO_JWT={token}\n", mode=0o600)
    standin_cloud.answer_text(token)
    result = await sandbox.run()
    assert result.returncode == 0, result.stderr
    assert b"unchanged" in result.stdout
    assert FileState.of(sandbox.env_file) == before
    assert_no_leftovers(sandbox)


async def test_a_newer_token_written_meanwhile_is_kept(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """While the cloud is asked, the daemon renames a token expiring later into the env file:
    the script's answer, acceptable but expiring sooner, is not put over it. A token written
    meanwhile that expires sooner than the answer is replaced as usual."""
    sandbox.write_env(ENV_TEXT, mode=0o600)
    newer, answered = mint(lifetime=86400 + 600), mint()

    def written_meanwhile(token: str) -> None:
        part = sandbox.env_file.with_name("daemon.part")
        part.write_text(env_with(token))
        part.chmod(0o600)
        part.replace(sandbox.env_file)

    async def answer(request: Request) -> Response:
        written_meanwhile(newer)
        return PlainTextResponse(answered)

    standin_cloud.answer = answer
    result = await sandbox.run()
    assert result.returncode == 0, result.stderr
    assert b"unchanged" in result.stdout
    assert b"meanwhile" in result.stdout
    assert sandbox.token() == newer
    assert_quiet_about_secrets(result, sandbox)
    assert_no_leftovers(sandbox)

    older, answered = mint(lifetime=3600), mint()

    async def answer_later(request: Request) -> Response:
        written_meanwhile(older)
        return PlainTextResponse(answered)

    standin_cloud.answer = answer_later
    assert_refreshed(await sandbox.run(), sandbox, answered)


@pytest.mark.parametrize(
    "shape",
    ["plain", "token", "trpc", "trpc-json", "padded"],
)
async def test_reads_every_answer_shape_of_the_contract(
    sandbox: Sandbox, standin_cloud: StandInCloud, shape: str
) -> None:
    """text/plain, {"token"}, and both tRPC envelopes all deliver the token."""
    token = mint()
    bodies: dict[str, Response] = {
        "plain": PlainTextResponse(token),
        "token": JSONResponse({"token": token, "expiresAt": "2030-01-01T00:00:00Z"}),
        "trpc": JSONResponse({"result": {"data": token}}),
        "trpc-json": JSONResponse({"result": {"data": {"json": token}}}),
        "padded": PlainTextResponse(f"\n  {token}\r\n"),
    }

    async def answer(request: Request) -> Response:
        return bodies[shape]

    standin_cloud.answer = answer
    assert_refreshed(await sandbox.run(), sandbox, token)


# Factories, not values: a token's age must start when its test runs, not at collection.
EDGE_TOKENS: dict[str, Callable[[], str]] = {
    "lifetime-10s": lambda: mint(lifetime=10),
    "lifetime-7d": lambda: mint(lifetime=7 * 86400),
    "iat-290s-ahead": lambda: mint(ahead=290),
    "65s-left": lambda: mint(lifetime=86400, ahead=-86400 + 65),
    "organization": lambda: mint(organization_id="org-1"),
}


@pytest.mark.parametrize("name", list(EDGE_TOKENS))
async def test_accepts_tokens_at_the_edges(
    sandbox: Sandbox, standin_cloud: StandInCloud, name: str
) -> None:
    """Tokens just inside the §3 limits are accepted."""
    token = EDGE_TOKENS[name]()
    standin_cloud.answer_text(token)
    assert_refreshed(await sandbox.run(), sandbox, token)


async def test_prefers_cloud_api_url_over_kilo_api_url(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """CLOUD_API_URL wins over KILO_API_URL; KILO_API_URL alone (the seed's name) works too."""
    token = mint()
    standin_cloud.answer_text(token)
    dead = f"http://127.0.0.1:{unused_port()}"
    assert_refreshed(await sandbox.run({"KILO_API_URL": dead}), sandbox, token)
    other = mint(lifetime=80000)
    standin_cloud.answer_text(other)
    result = await sandbox.run({"CLOUD_API_URL": None, "KILO_API_URL": standin_cloud.url + "/"})
    assert_refreshed(result, sandbox, other)


async def test_key_and_token_never_in_a_process_argv(
    sandbox: Sandbox, standin_cloud: StandInCloud, proc_cmdlines: Callable[[], list[bytes]]
) -> None:
    """While curl talks to the cloud, no process's command line holds the key or the token."""
    old = mint(lifetime=3600)
    sandbox.write_env(f"KILO_JWT={old}\n")
    new = mint()
    seen: list[list[bytes]] = []

    async def answer(request: Request) -> Response:
        seen.append(proc_cmdlines())
        return PlainTextResponse(new)

    standin_cloud.answer = answer
    assert_refreshed(await sandbox.run(), sandbox, new)
    [cmdlines] = seen
    # The scan ran while curl was alive, so it would have seen the key had it been there.
    assert any(b"curl" in line and standin_cloud.url.encode() in line for line in cmdlines)
    for line in cmdlines:
        assert KEY.encode() not in line
        assert old.encode() not in line
    assert standin_cloud.requests[0].headers["authorization"] == f"Bearer {old}"


async def test_help_and_arguments(sandbox: Sandbox) -> None:
    """--help prints usage and exits 0; any other argument is a usage error (exit 2)."""
    help_run = await anyio.run_process(
        ["bash", str(SCRIPT), "--help"], env=sandbox.env, check=False
    )
    assert help_run.returncode == 0
    assert b"TOWN_ID" in help_run.stdout
    bad = await anyio.run_process(["bash", str(SCRIPT), "now"], env=sandbox.env, check=False)
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 1


async def test_an_env_file_named_with_a_tilde_is_in_the_home(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """GASTOWN_ENV_FILE='~/.env.gateway', as a systemd EnvironmentFile or a Dockerfile ENV
    leave it: the file in HOME, as the daemon reads it (before: exit 2, "the folder of
    GASTOWN_ENV_FILE does not exist: ~")."""
    sandbox.write_env(ENV_TEXT)
    token = mint()
    standin_cloud.answer_text(token)
    assert_refreshed(await sandbox.run({"GASTOWN_ENV_FILE": "~/.env.gateway"}), sandbox, token)


# --- failures: settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"TOWN_ID": None}, "TOWN_ID"),
        ({"TOWN_ID": ""}, "TOWN_ID"),
        ({"TOWN_ID": 'x", "townId": "other'}, "TOWN_ID"),
        ({"TOWN_ID": "$(touch pwned)"}, "TOWN_ID"),
        ({"CLOUD_API_URL": None}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "ftp://cloud.example"}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "http://a b"}, "CLOUD_API_URL"),
        ({"INTERNAL_API_KEY": None}, "INTERNAL_API_KEY"),
        ({"INTERNAL_API_KEY": "short"}, "INTERNAL_API_KEY"),
        ({"INTERNAL_API_KEY": KEY + "\r\nx-evil: 1"}, "INTERNAL_API_KEY"),
        ({"GASTOWN_ENV_FILE": "/nonexistent-folder/.env.gateway"}, "GASTOWN_ENV_FILE"),
        ({"HOME": None}, "GASTOWN_ENV_FILE"),
        ({"REFRESH_TOKEN_MAX_TIME": "soon"}, "REFRESH_TOKEN_MAX_TIME"),
        ({"REFRESH_TOKEN_CONNECT_TIMEOUT": "-1"}, "REFRESH_TOKEN_CONNECT_TIMEOUT"),
    ],
    ids=lambda value: str(value) if isinstance(value, str) else None,
)
async def test_bad_settings_exit_2_before_asking(
    sandbox: Sandbox, standin_cloud: StandInCloud, overrides: dict[str, str | None], named: str
) -> None:
    """A missing or bad setting: exit 2, one line naming it, no request, env file untouched."""
    before = sandbox.write_env(ENV_TEXT)
    line = assert_failed(await sandbox.run(overrides), sandbox, before, code=2)
    assert named in line
    assert standin_cloud.requests == []
    assert not (sandbox.home / "pwned").exists()


async def test_env_file_that_is_a_folder(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """GASTOWN_ENV_FILE naming a folder is a settings error."""
    folder = sandbox.home / "folder"
    folder.mkdir()
    before = sandbox.write_env(ENV_TEXT)
    line = assert_failed(
        await sandbox.run({"GASTOWN_ENV_FILE": str(folder)}), sandbox, before, code=2
    )
    assert "folder" in line
    assert standin_cloud.requests == []


# --- failures: the cloud says no -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (401, "refused the key"),
        (403, "refused the key"),
        (404, "unknown or destroyed"),
        (410, "unknown or destroyed"),
        (409, "stopped"),
        (423, "stopped"),
        (429, "busy"),
        (503, "busy"),
        (500, "HTTP 500"),
        (400, "HTTP 400"),
    ],
)
async def test_refusals_leave_the_env_file(
    sandbox: Sandbox, standin_cloud: StandInCloud, status: int, words: str
) -> None:
    """Every refusal of the cloud fails with one line that says what it means (the env file
    holds a token of the town, so the refresh was bound)."""
    current = mint()
    sandbox.secrets.append(current)
    before = sandbox.write_env(env_with(current))
    # A token in an error body must not reach the env file nor the output either.
    standin_cloud.answer_text(mint(), status=status)
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert words in line
    assert str(status) in line


@pytest.mark.parametrize("status", [201, 202, 302])
async def test_a_token_in_an_answer_other_than_200_is_not_taken(
    sandbox: Sandbox, standin_cloud: StandInCloud, status: int
) -> None:
    """curl --fail passes 2xx and 3xx: a good token in a 302's body was written and reported
    refreshed, though the daemon takes only a 200. Now one line naming the status."""
    current = mint()
    sandbox.secrets.append(current)
    before = sandbox.write_env(env_with(current))
    standin_cloud.answer_text(mint(), status=status)
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert f"HTTP {status}, not 200" in line


async def test_a_write_cut_short_leaves_the_env_file_as_it_was(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """The disk takes 1 KiB and no more (a file-size limit, with SIGXFSZ ignored as a parent
    may leave it): the rewrite is cut short, and the script fails with the env file as it
    was (before: exit 0, 'refreshed', and the short file renamed over the env file)."""
    current = mint()
    sandbox.secrets.append(current)
    before = sandbox.write_env(env_with(current) + "# padding\n" * 200)
    standin_cloud.answer_text(mint(ahead=1))
    limited = ("bash", "-c", 'trap "" XFSZ; ulimit -f 1; exec "$@"', "_")
    line = assert_failed(await sandbox.run(prefix=limited), sandbox, before)
    assert "cannot write a file" in line


async def test_busy_reports_retry_after(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """A 503 with Retry-After reports the wait the cloud asked for."""

    async def answer(request: Request) -> Response:
        return PlainTextResponse("busy", status_code=503, headers={"Retry-After": "120"})

    standin_cloud.answer = answer
    before = sandbox.write_env(ENV_TEXT)
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert "Retry-After 120" in line


async def test_cloud_down(sandbox: Sandbox) -> None:
    """A closed port (connection refused) fails with one line naming the cloud."""
    url = f"http://127.0.0.1:{unused_port()}"
    before = sandbox.write_env(ENV_TEXT)
    line = assert_failed(await sandbox.run({"CLOUD_API_URL": url}), sandbox, before)
    assert f"cannot reach the cloud at {url}" in line


async def test_hung_cloud_times_out(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """A cloud that never answers is given up on after REFRESH_TOKEN_MAX_TIME."""

    async def answer(request: Request) -> Response:
        with anyio.move_on_after(30):
            await standin_cloud.release.wait()
        return PlainTextResponse(mint())

    standin_cloud.answer = answer
    before = sandbox.write_env(ENV_TEXT)
    line = assert_failed(await sandbox.run({"REFRESH_TOKEN_MAX_TIME": "0.5"}), sandbox, before)
    assert f"no answer in time from the cloud at {standin_cloud.url}" in line


# --- failures: the cloud answers 200 with something unacceptable ------------------------------

HS256 = {"alg": "HS256", "typ": "JWT"}
NO_TOKEN = "holds no token"
NOT_OBJECT = "not a base64url JSON object"
CUT = "signature is cut or malformed"
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def with_low_bit_set(segment: str) -> str:
    """The same bytes spelled with a non-zero unused bit in the last character."""
    return segment[:-1] + BASE64URL[BASE64URL.index(segment[-1]) | 1]


def payload_of_length_mod(length_mod: int) -> str:
    """The base64url of good claims whose length is `length_mod` modulo 4 (0, 2 or 3)."""
    for pad in range(3):
        segment = b64(json.dumps(claims(pad="x" * pad)).encode())
        if len(segment) % 4 == length_mod:
            return segment
    raise AssertionError(length_mod)


def with_payload(segment: str) -> str:
    return f"{b64(json.dumps(HS256).encode())}.{segment}.{SIGNATURE}"


# name: (a factory of the answer, what the one line on stderr must say)
BAD_ANSWERS: dict[str, tuple[Callable[[], bytes | str], str]] = {
    "garbage": (lambda: "garbage", NO_TOKEN),
    "empty": (lambda: "", NO_TOKEN),
    "html": (lambda: "<html><body><h1>502 Bad Gateway</h1></body></html>", NO_TOKEN),
    "command-substitution": (lambda: "$(touch pwned)", NO_TOKEN),
    "backticks": (lambda: "`touch pwned`", NO_TOKEN),
    "token-then-command": (lambda: mint() + "\n$(touch pwned)", NO_TOKEN),
    "token-then-line": (lambda: mint() + "\nEVIL=1", NO_TOKEN),
    "json-command": (lambda: json.dumps({"token": "$(touch pwned)"}), "not three base64url"),
    # A lone surrogate: the line was "Traceback (most recent call last):" before.
    "json-lone-surrogate": (lambda: '{"token": "\\ud800abc"}', "not three base64url"),
    "json-no-token": (lambda: json.dumps({"error": "nope"}), "JSON answer " + NO_TOKEN),
    "json-array": (lambda: json.dumps([mint()]), "JSON answer " + NO_TOKEN),
    "json-number-token": (lambda: json.dumps({"token": 7}), "JSON answer " + NO_TOKEN),
    "not-utf8": (lambda: b"\xff\xfe" + mint().encode(), "not text"),
    "other-town": (lambda: mint("another-town"), "another town"),
    "expired": (lambda: mint(ahead=-90000), "expired"),
    "about-to-expire": (lambda: mint(lifetime=86400, ahead=-86400 + 30), "about to expire"),
    "alg-none-unsigned": (lambda: jwt.encode(claims(), None, algorithm="none"), NO_TOKEN),
    "alg-none-signed": (lambda: craft({"alg": "none"}, claims()), "alg is not HS256"),
    "alg-hs512": (lambda: jwt.encode(claims(), SECRET, algorithm="HS512"), "alg is not HS256"),
    "no-alg": (lambda: craft({"typ": "JWT"}, claims()), "alg is not HS256"),
    "wrong-type": (lambda: mint(type="access"), "type is not gastown_sandbox"),
    "no-type": (lambda: mint(type=DROP), "type is not gastown_sandbox"),
    "empty-sub": (lambda: mint(sub=""), "sub is not"),
    "no-sub": (lambda: mint(sub=DROP), "sub is not"),
    "sub-number": (lambda: mint(sub=42), "sub is not"),
    "iat-string": (lambda: craft(HS256, claims(iat=str(int(time.time())))), "not integers"),
    "exp-float": (lambda: craft(HS256, claims(exp=time.time() + 3600.5)), "not integers"),
    "exp-bool": (lambda: craft(HS256, claims(iat=0, exp=True)), "not integers"),
    "lifetime-9s": (lambda: mint(lifetime=9), "lifetime"),
    "lifetime-8d": (lambda: mint(lifetime=8 * 86400), "lifetime"),
    "negative-lifetime": (lambda: mint(lifetime=-3600, ahead=7200), "lifetime"),
    "iat-600s-ahead": (lambda: mint(ahead=600), "300 s ahead"),
    "payload-not-json": (lambda: f"{b64(b'{}')}.{b64(b'not json')}.c2ln", NOT_OBJECT),
    "payload-list": (lambda: f"{b64(json.dumps(HS256).encode())}.{b64(b'[1]')}.c2ln", NOT_OBJECT),
    "bad-base64": (lambda: "eyJh.eyJh.c2ln", NOT_OBJECT),
    "two-segments": (lambda: ".".join(mint().split(".")[:2]), NO_TOKEN),
    "over-8KiB": (lambda: mint(padding="p" * 9000), "larger than 8 KiB"),
    # A close-delimited body cut inside the signature still matches the JWT pattern.
    "signature-cut-1": (lambda: mint()[:-1], CUT),
    "signature-cut-2": (lambda: mint()[:-2], CUT),
    "signature-cut-3": (lambda: mint()[:-3], CUT),
    "signature-cut-4": (lambda: mint()[:-4], CUT),
    "signature-cut-10": (lambda: mint()[:-10], CUT),
    "signature-too-long": (lambda: mint() + "AAAA", CUT),
    "signature-stray-bits": (lambda: with_low_bit_set(craft(HS256, claims())), CUT),
    "payload-stray-bits": (
        lambda: with_payload(with_low_bit_set(payload_of_length_mod(2))),
        NOT_OBJECT,
    ),
    "payload-4k+1": (lambda: with_payload(payload_of_length_mod(0) + "A"), NOT_OBJECT),
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
async def test_unacceptable_answers_are_never_written(
    sandbox: Sandbox, standin_cloud: StandInCloud, name: str
) -> None:
    """A 200 whose body is not an acceptable token of this town changes nothing and runs nothing."""
    before = sandbox.write_env(ENV_TEXT)
    answer, reason = BAD_ANSWERS[name]
    standin_cloud.answer_text(answer())
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert "the cloud's" in line
    assert reason in line
    assert not (sandbox.home / "pwned").exists()


async def test_oversized_body_with_length(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """A 1 MB answer announced by Content-Length is refused unread."""
    standin_cloud.answer_text("A" * 1_000_000)
    before = sandbox.write_env(ENV_TEXT)
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert "larger than" in line


async def test_oversized_body_streamed(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """A 1 MB answer streamed without Content-Length is cut off and refused."""

    async def chunks() -> Any:
        for _ in range(16):
            yield b"A" * 65536

    async def answer(request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="text/plain")

    standin_cloud.answer = answer
    before = sandbox.write_env(ENV_TEXT)
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert "larger than" in line


# --- failures: the env file cannot be written ------------------------------------------------


def unprivileged_prefix() -> tuple[str, ...]:
    """How to run so folder permissions apply: as root, without the capabilities that skip them."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is absent: permissions cannot bite")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


async def test_unwritable_folder_fails_before_asking(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """An env file whose folder is not writable fails at once, without asking the cloud."""
    prefix = unprivileged_prefix()
    standin_cloud.answer_text(mint())
    before = sandbox.write_env(ENV_TEXT)
    sandbox.home.chmod(0o555)
    try:
        result = await sandbox.run(prefix=prefix)
    finally:
        sandbox.home.chmod(0o755)
    line = assert_failed(result, sandbox, before)
    assert "not writable" in line
    assert standin_cloud.requests == []


async def test_unreadable_env_file(sandbox: Sandbox, standin_cloud: StandInCloud) -> None:
    """An env file the script cannot read fails without asking and without replacing it."""
    prefix = unprivileged_prefix()
    standin_cloud.answer_text(mint())
    before = sandbox.write_env(ENV_TEXT)
    sandbox.env_file.chmod(0o000)
    try:
        result = await sandbox.run(prefix=prefix)
    finally:
        sandbox.env_file.chmod(0o644)
    line = assert_failed(result, sandbox, before)
    assert "cannot read" in line
    assert standin_cloud.requests == []


async def test_bind_mounted_env_file_is_written_in_place(
    sandbox: Sandbox, standin_cloud: StandInCloud
) -> None:
    """A bind-mounted env file (rename refused with EBUSY) is rewritten in place, and says so."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to bind-mount a file in a private mount namespace")
    source = sandbox.home / "host-env"
    source.write_text("# from the host\nKILO_JWT=old\n")
    sandbox.write_env("")
    token = mint()
    standin_cloud.answer_text(token)
    mount_then_run = 'mount --bind "$1" "$2" && exec bash "$3"'
    result = await anyio.run_process(
        [
            "unshare",
            "-m",
            "bash",
            "-c",
            mount_then_run,
            "_",
            str(source),
            str(sandbox.env_file),
            str(SCRIPT),
        ],
        env=sandbox.env,
        check=False,
    )
    if (
        result.returncode != 0
        and b"mount" in result.stderr
        and b"refresh-token" not in result.stderr
    ):
        pytest.skip(f"cannot bind-mount here: {result.stderr.decode().strip()}")
    assert result.returncode == 0, result.stderr
    assert b"in place" in result.stdout
    assert source.read_text() == f"# from the host\nKILO_JWT={token}\n"
    assert stat.S_IMODE(source.stat().st_mode) == 0o600
    assert_quiet_about_secrets(result, sandbox)
    assert_no_leftovers(sandbox)


# --- the real cloud (gastown_cloud) ----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    """One real cloud for the refusal cases: each makes its own town, so they cannot collide."""
    server = launch_cloud(tmp_path_factory.mktemp("cloud"))
    yield server
    server.stop()


def cloud_sandbox(tmp_path: Path, cloud: CloudServer, town_id: str) -> Sandbox:
    return make_sandbox(tmp_path, cloud.url, town=town_id, key=cloud.internal_key)


def assert_refreshed_by(
    result: subprocess.CompletedProcess[bytes], sandbox: Sandbox, cloud: CloudServer
) -> dict[str, Any]:
    """The run wrote a token that the cloud signed for this town; its claims."""
    assert result.returncode == 0, result.stderr
    token = sandbox.token()
    sandbox.secrets.append(token)
    assert_refreshed(result, sandbox, token)
    claims_: dict[str, Any] = jwt.decode(token, cloud.secret, algorithms=["HS256"])
    assert claims_["town_id"] == sandbox.env["TOWN_ID"]
    return claims_


async def test_real_cloud_binds_with_the_provisioned_token(
    tmp_path: Path, cloud: CloudServer
) -> None:
    """Against gastown_cloud: with createTown's token in the env file (provisioning) a run
    refreshes, and the next run binds with the token the first one wrote."""
    town, initial = cloud.create_town(user_id="user-42", organization_id="org-7")
    sandbox = cloud_sandbox(tmp_path, cloud, town["id"])
    sandbox.secrets.append(initial)
    sandbox.write_env(f"# agents source this\nOTHER=1\nKILO_JWT={initial}\n", mode=0o600)
    claims_ = assert_refreshed_by(await sandbox.run(), sandbox, cloud)
    assert (claims_["sub"], claims_["organization_id"]) == ("user-42", "org-7")
    first = sandbox.token()
    assert sandbox.env_file.read_text() == f"# agents source this\nOTHER=1\nKILO_JWT={first}\n"
    # The cloud answers 401 without a Bearer and 403 to one it cannot bind, so success
    # proves the binding held.
    assert_refreshed_by(await sandbox.run(), sandbox, cloud)


async def test_real_cloud_refuses_a_run_without_a_token_and_says_why(
    tmp_path: Path, cloud: CloudServer
) -> None:
    """With no token of the town in the env file the key alone is refused (401): the env file
    stays as it was and the one line says to write the town's first token."""
    town, _ = cloud.create_town()
    sandbox = cloud_sandbox(tmp_path, cloud, town["id"])
    before = sandbox.write_env("# agents source this\nOTHER=1\n", mode=0o600)
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert "HTTP 401" in line
    assert "no token of town" in line
    assert "createTown" in line


async def test_unbound_cloud_issues_a_first_token_without_one(
    tmp_path: Path, cloud_factory: Callable[..., CloudServer]
) -> None:
    """A cloud run with --allow-unbound-refresh (the seed's key-only way) gives a first token
    to a run whose env file has none."""
    cloud = cloud_factory(flags=["--allow-unbound-refresh"])
    town, _ = cloud.create_town()
    sandbox = cloud_sandbox(tmp_path, cloud, town["id"])
    sandbox.write_env("OTHER=1\n")
    assert_refreshed_by(await sandbox.run(), sandbox, cloud)
    assert sandbox.env_file.read_text() == f"OTHER=1\nKILO_JWT={sandbox.token()}\n"


async def test_real_cloud_short_lifetime(
    tmp_path: Path, cloud_factory: Callable[..., CloudServer]
) -> None:
    """A cloud started with --token-lifetime 60 issues tokens the script accepts."""
    cloud = cloud_factory(token_lifetime=60)
    town, initial = cloud.create_town()
    sandbox = cloud_sandbox(tmp_path, cloud, town["id"])
    sandbox.secrets.append(initial)
    sandbox.write_env(f"KILO_JWT={initial}\n", mode=0o600)
    claims_ = assert_refreshed_by(await sandbox.run(), sandbox, cloud)
    assert claims_["exp"] - claims_["iat"] == 60


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("wrong-key", 401),
        ("unknown-town", 404),
        ("stopped", 409),
        ("destroyed", 410),
        ("bearer-of-another-owner", 403),
        ("bearer-of-another-secret", 403),
    ],
)
async def test_real_cloud_refusals(
    tmp_path: Path, shared_cloud: CloudServer, case: str, status: int
) -> None:
    """Each refusal of gastown_cloud leaves the env file byte-identical, with one line."""
    cloud = shared_cloud
    town, initial = cloud.create_town()
    town_id, key = town["id"], cloud.internal_key
    current = initial
    if case == "wrong-key":
        key = "not-the-internal-key-of-this-cloud"
    elif case == "unknown-town":
        town_id = "town-that-never-was"
        current = cloud.mint("user-1", town_id)
    elif case in ("stopped", "destroyed"):
        cloud.set_status(town_id, "stop" if case == "stopped" else "destroy")
    elif case == "bearer-of-another-owner":
        current = cloud.mint("someone-else", town_id)
    else:
        current = jwt.encode(claims(town_id, sub="user-1"), SECRET, algorithm="HS256")
    sandbox = make_sandbox(tmp_path, cloud.url, town=town_id, key=key)
    sandbox.secrets += [current, cloud.internal_key]
    before = sandbox.write_env(f"KEEP=me\nKILO_JWT={current}\n", mode=0o600)
    line = assert_failed(await sandbox.run(), sandbox, before)
    assert f"HTTP {status}" in line
