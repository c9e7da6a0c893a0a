"""`gastown-cloud towns …` as real processes on the store a real `serve` uses."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from gastown_cloud.tokens import verify_gastown_token
from tests.fixtures.cloud import CloudServer

SECRET = "t" * 40


def towns(
    *args: str, secret: str | None = SECRET, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NEXTAUTH_SECRET", "INTERNAL_API_KEY")}
    if secret is not None:
        env["NEXTAUTH_SECRET"] = secret
    argv = [sys.executable, "-m", "gastown_cloud", "towns", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=cwd)


def ok(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("gastown-cloud: ")
    return done.stderr


def test_create_prints_town_and_a_token_the_running_server_honours(
    cloud: CloudServer,
) -> None:
    """`towns create` on the server's database prints the town and its first token; the running
    server sees the town at once and refreshes it with that token as Bearer."""
    created = ok(
        towns(
            "create", "--db", str(cloud.db), "--user-id", "u-cli", "--organization-id", "org-cli",
            "--name", "terminal town", "--sandbox-url", "http://127.0.0.1:9/",
            secret=cloud.secret,
        )
    )  # fmt: skip
    assert set(created) == {"town", "token"}
    town = created["town"]
    assert town == {
        "id": town["id"],
        "userId": "u-cli",
        "organizationId": "org-cli",
        "name": "terminal town",
        "status": "active",
        "sandboxUrl": "http://127.0.0.1:9/",
    }
    claims = verify_gastown_token(created["token"], secret=cloud.secret)
    assert (claims.sub, claims.town_id, claims.organization_id) == ("u-cli", town["id"], "org-cli")
    assert claims.lifetime == 86400
    with httpx.Client(base_url=cloud.url, headers=cloud.headers, timeout=10) as api:
        assert api.get(f"/api/gastown/towns/{town['id']}").json() == {"town": town}
        bearer = {"authorization": f"Bearer {created['token']}"}
        answer = api.post("/api/gastown/refresh-token", json={"townId": town["id"]}, headers=bearer)
    assert answer.status_code == 200, answer.text
    assert verify_gastown_token(answer.text, secret=cloud.secret).town_id == town["id"]


def test_create_takes_the_servers_token_options(tmp_path: Path) -> None:
    """--token-lifetime and --token-claims kilo shape the token as `serve` would."""
    db = str(tmp_path / "cloud.db")
    args = ("create", "--db", db, "--user-id", "u", "--name", "n")
    created = ok(towns(*args, "--token-lifetime", "60", "--token-claims", "kilo"))
    payload = jwt.decode(created["token"], SECRET, algorithms=["HS256"])
    assert payload["exp"] - payload["iat"] == 60
    assert (payload["kiloUserId"], payload["version"]) == ("u", 3)
    assert payload["organization_id"] is None
    assert "kiloUserId" not in jwt.decode(ok(towns(*args))["token"], SECRET, algorithms=["HS256"])


def test_stop_start_destroy_show_drive_the_running_server(cloud: CloudServer) -> None:
    """stop, start, destroy change what the running server answers; show prints the town."""
    town, token = cloud.create_town()
    db, town_id = str(cloud.db), town["id"]

    def refresh() -> int:
        headers = {**cloud.headers, "authorization": f"Bearer {token}"}
        url = f"{cloud.url}/api/gastown/refresh-token"
        return httpx.post(url, json={"townId": town_id}, headers=headers, timeout=10).status_code

    assert ok(towns("stop", "--db", db, town_id))["town"]["status"] == "stopped"
    assert refresh() == 409
    assert ok(towns("show", "--db", db, town_id))["town"]["status"] == "stopped"
    assert ok(towns("start", "--db", db, town_id))["town"]["status"] == "active"
    assert refresh() == 200
    assert ok(towns("destroy", "--db", db, town_id))["town"]["status"] == "destroyed"
    assert refresh() == 410
    shown = ok(towns("show", "--db", db, town_id, secret=None))
    assert shown == {"town": {**town, "status": "destroyed"}}


def test_refused_actions_exit_1_with_one_line(cloud: CloudServer) -> None:
    """An unknown id, or starting or stopping a destroyed town, exits 1 and changes nothing."""
    town, _ = cloud.create_town()
    db = str(cloud.db)
    for action in ("show", "stop", "start", "destroy"):
        assert "no town has the id nope" in one_line_error(towns(action, "--db", db, "nope"), 1)
    ok(towns("destroy", "--db", db, town["id"]))
    before = cloud.rows()
    for action in ("start", "stop"):
        line = one_line_error(towns(action, "--db", db, town["id"]), 1)
        assert "destroyed" in line
    assert cloud.rows() == before


@pytest.mark.parametrize(
    ("args", "secret", "names"),
    [
        (("--user-id", "u", "--name", "n"), None, "NEXTAUTH_SECRET"),
        (("--user-id", "u", "--name", "n"), "s3cr3t", "NEXTAUTH_SECRET"),
        (("--user-id", "", "--name", "n"), SECRET, "--user-id"),
        (("--user-id", "u", "--name", "n" * 201), SECRET, "--name"),
        (("--user-id", "u", "--name", "n", "--sandbox-url", "ftp://x"), SECRET, "--sandbox-url"),
        (("--user-id", "u", "--name", "n", "--token-lifetime", "0"), SECRET, "--token-lifetime"),
    ],
)
def test_bad_create_settings_exit_2_and_create_nothing(
    tmp_path: Path, args: tuple[str, ...], secret: str | None, names: str
) -> None:
    """A missing or short secret or a bad flag exits 2 naming it; no database is created."""
    db = tmp_path / "cloud.db"
    line = one_line_error(towns("create", "--db", str(db), *args, secret=secret), 2)
    assert names in line
    if secret:
        assert secret not in line
    assert not db.exists()


@pytest.mark.parametrize("kind", ["missing file", "missing folder", "not a database"])
@pytest.mark.parametrize("action", ["create", "show"])
def test_a_database_that_cannot_be_opened_is_named(tmp_path: Path, kind: str, action: str) -> None:
    """A database that cannot be opened exits 2 with one line naming its path, untouched."""
    db = tmp_path / "cloud.db"
    if kind == "missing folder":
        db = tmp_path / "no-such-folder" / "cloud.db"
    elif kind == "not a database":
        db.write_text("plain text, not SQLite\n" * 50)
    if kind == "missing file" and action == "create":
        ok(towns("create", "--db", str(db), "--user-id", "u", "--name", "n"))
        return  # create makes a new database, as serve does
    before = db.read_bytes() if db.exists() else None
    args = ("--user-id", "u", "--name", "n") if action == "create" else ("some-id",)
    line = one_line_error(towns(action, "--db", str(db), *args), 2)
    assert str(db) in line
    assert (db.read_bytes() if db.exists() else None) == before


def _made(db: Path) -> str:
    """A database made by `towns create`: the new town's id."""
    town_id: str = ok(towns("create", "--db", str(db), "--user-id", "u", "--name", "n"))["town"][
        "id"
    ]
    return town_id


@pytest.mark.parametrize("kind", ["newer schema", "damaged", "read-only"])
def test_a_database_that_cannot_serve_is_one_line_for_towns_and_serve(
    tmp_path: Path, kind: str
) -> None:
    """A database of a newer schema, with its header overwritten, or write-protected:
    `towns show`, `towns stop` and `serve` exit 2 with one
    line naming it (before: a 50-60 line traceback and exit 1 from `towns`; `serve` took the
    read-only file and answered every write 500), and the file is left as it was."""
    db = tmp_path / "cloud.db"
    town_id = _made(db)
    prefix: list[str] = []
    if kind == "newer schema":
        connection = sqlite3.connect(db, isolation_level=None)
        connection.execute("PRAGMA user_version = 99")
        connection.close()
    elif kind == "damaged":
        with db.open("r+b") as handle:
            handle.seek(16)
            handle.write(b"\xff" * 84)  # the page size and the rest of the header
    else:
        db.chmod(0o444)
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("root writes any file; setpriv would drop that right")
            caps = "-dac_override,-dac_read_search,-fowner"
            prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    before = db.read_bytes()
    try:
        for action in (["show", town_id], ["stop", town_id]):
            argv = [*prefix, sys.executable, "-m", "gastown_cloud", "towns", *action]
            done = subprocess.run(
                [*argv, "--db", str(db)], env={**os.environ, "NEXTAUTH_SECRET": SECRET},
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert str(db) in one_line_error(done, 2)
        serve = [*prefix, sys.executable, "-m", "gastown_cloud", "serve", "--port", "0"]
        env = {**os.environ, "NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": "k" * 32}
        done = subprocess.run(
            [*serve, "--db", str(db)], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert str(db) in line
    finally:
        db.chmod(0o644)
    assert db.read_bytes() == before


@pytest.mark.parametrize("action", ["create", "show", "stop", "start", "destroy"])
def test_every_towns_command_has_help(action: str) -> None:
    """`towns ACTION --help` exits 0 and lists the command's flags."""
    done = towns(action, "--help", secret=None)
    assert done.returncode == 0
    assert "--db" in done.stdout
    if action == "create":
        for flag in ("--user-id", "--organization-id", "--name", "--sandbox-url",
                     "--token-lifetime", "--token-claims", "NEXTAUTH_SECRET"):  # fmt: skip
            assert flag in done.stdout
    else:
        assert "ID" in done.stdout


@pytest.mark.parametrize("args", [[], ["launch"], ["show", "--db", "x"], ["create", "--db", "x"]])
def test_bad_towns_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    """No action, an unknown one, or a missing argument exits 2 with nothing on stdout."""
    done = towns(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""


def test_closed_pipe_ends_quietly(
    tmp_path: Path, cloud_factory: Callable[..., CloudServer]
) -> None:
    """Output into a pipe whose reader has gone ends quietly (exit 0, nothing on stderr)."""
    db = tmp_path / "cloud.db"
    ok(towns("create", "--db", str(db), "--user-id", "u", "--name", "n"))
    env = {**os.environ, "NEXTAUTH_SECRET": SECRET}
    argv = [sys.executable, "-m", "gastown_cloud", "towns", "create", "--db", str(db)]
    argv += ["--user-id", "u", "--name", "piped"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # the reader leaves before the command writes
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=60) == 0
    assert stderr == b""
    shell = f"{sys.executable} -m gastown_cloud towns show --db {db} nope | head -c 1"
    done = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, timeout=60)
    assert done.stdout == b""
    assert b"Traceback" not in done.stderr
