"""`gastown-cloud serve` as a real process: start-up checks, help, exit codes and signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fixtures.cloud import CloudServer
from tests.fixtures.entry import run_help

SECRET = "n" * 40
KEY = "k" * 24


def _run(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("NEXTAUTH_SECRET", "INTERNAL_API_KEY")}
    argv = [sys.executable, "-m", "gastown_cloud", *args]
    return subprocess.run(
        argv, env={**base, **env}, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"INTERNAL_API_KEY": KEY}, "NEXTAUTH_SECRET"),
        ({"NEXTAUTH_SECRET": "short", "INTERNAL_API_KEY": KEY}, "NEXTAUTH_SECRET"),
        ({"NEXTAUTH_SECRET": SECRET}, "INTERNAL_API_KEY"),
    ],
)
def test_bad_secrets_exit_2_with_one_line(
    tmp_path: Path, env: dict[str, str], setting: str
) -> None:
    """A missing or short secret, or a missing key, stops start-up: exit 2, one stderr line."""
    done = _run(["serve", "--port", "0", "--db", str(tmp_path / "c.db")], env, tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert setting in lines[0]
    assert SECRET not in lines[0]
    assert KEY not in lines[0]
    assert not (tmp_path / "c.db").exists()


def test_help_describes_every_flag_and_secret(tmp_path: Path) -> None:
    """`serve --help` lists every flag and both environment variables; exit 0."""
    done = _run(["serve", "--help"], {}, tmp_path)
    assert done.returncode == 0
    for word in ("--host", "--port", "--db", "--token-lifetime", "--token-claims",
                 "--allow-unbound-refresh", "--refresh-rate", "NEXTAUTH_SECRET",
                 "INTERNAL_API_KEY", "SIGTERM", "listening on", "Bearer"):  # fmt: skip
        assert word in done.stdout
    top = _run(["--help"], {}, tmp_path)
    assert top.returncode == 0
    assert "serve" in top.stdout
    assert "towns" in top.stdout


def test_console_script_is_installed() -> None:
    """The `gastown-cloud` console script runs the same command line."""
    script = Path(sys.executable).parent / "gastown-cloud"
    done = subprocess.run(
        [str(script), "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "--token-lifetime" in done.stdout


@pytest.mark.parametrize(
    "args", [[], ["serve"], ["serve", "--db", "x", "--port", "abc"], ["launch"]]
)
def test_bad_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    """No command, a missing --db, a bad port or an unknown command exit 2."""
    done = _run(args, {"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}, tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    """A port already bound gives exit 1 and one line saying why."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}
        done = _run(["serve", "--port", port, "--db", str(tmp_path / "c.db")], env, tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith("gastown-cloud: cannot serve: ")
    assert "in use" in done.stderr


@pytest.mark.parametrize("kind", ["missing folder", "not a database", "a folder"])
def test_unopenable_database_exits_2_naming_it(tmp_path: Path, kind: str) -> None:
    """A database that cannot be opened stops `serve` at once: exit 2, one line with the path."""
    env = {"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}
    db = tmp_path / "missing" / "c.db"
    if kind == "not a database":
        db = tmp_path / "notes.db"
        db.write_text("these are notes, not SQLite\n" * 100)
    elif kind == "a folder":
        db = tmp_path / "folder.db"
        db.mkdir()
    before = db.read_bytes() if db.is_file() else None
    done = _run(["serve", "--port", "0", "--db", str(db)], env, tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("gastown-cloud: setting --db: cannot open the database ")
    assert str(db) in done.stderr
    assert (db.read_bytes() if db.is_file() else None) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(cloud_factory: Callable[..., CloudServer], sig: int) -> None:
    """After its one listening line the server serves; SIGTERM or SIGINT ends it with exit 0."""
    server = cloud_factory()
    assert server.url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{server.url}/api/gastown/usage", timeout=10).status_code == 401
    server.process.send_signal(sig)
    assert server.process.wait(timeout=20) == 0
    assert server.process.stdout is not None
    assert server.process.stdout.read() == b""
    # stderr is JSON lines throughout, hypercorn's own included (its "Running on" line was
    # plain text, which broke `serve 2> >(jq .)`).
    records = [json.loads(line) for line in server.log_text().splitlines()]
    assert "cloud_stopped" in [record["event"] for record in records]
    assert any(record["event"].startswith("Running on") for record in records)


def test_logs_never_hold_secrets_or_tokens(cloud: CloudServer) -> None:
    """After creating, refreshing and spending, the log holds no token, secret or key."""
    town, token = cloud.create_town(organization_id="org")
    refreshed = httpx.post(
        f"{cloud.url}/api/gastown/refresh-token",
        json={"townId": town["id"]},
        headers={**cloud.headers, "authorization": f"Bearer {token}"},
        timeout=10,
    ).text
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    httpx.post(
        f"{cloud.url}/api/gateway/chat/completions",
        json=chat,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    ).raise_for_status()
    assert cloud.stop() == 0
    log = cloud.log_text()
    assert "token_refreshed" in log
    for secret in (token, refreshed, cloud.secret, cloud.internal_key):
        assert secret not in log


def test_factory_reports_a_server_that_cannot_start(
    cloud_factory: Callable[..., CloudServer],
) -> None:
    """A server that exits before listening makes the factory raise with its log."""
    with pytest.raises(RuntimeError, match=r"(?s)exited with 2.*NEXTAUTH_SECRET"):
        cloud_factory(NEXTAUTH_SECRET="too-short")


def test_the_entry_hides_what_the_cloud_never_uses() -> None:
    """`python -m gastown_cloud` runs through the entry, which keeps httpx from loading its
    own command line (click, rich, pygments) in a venv that has them, and imports with the
    garbage collector paused: the command runs with it on, the imports frozen."""
    run = run_help("gastown_cloud", "gastown-cloud")
    assert "usage:" in run.usage
    assert (run.gc_on, run.frozen > 10000, run.loaded) == (True, True, [])
